"""Compare and CompareChunked through real servers on loopback: per-token values against torch in
float64, every summary statistic against the plain numpy formulas of tests/compare_reference.py,
chunked equal to unchunked (a server with a 64 KiB --max-message-bytes forces chunking), top-k
against torch.sort, bad input answered INVALID_ARGUMENT naming the field, and the CLI."""

from __future__ import annotations

import asyncio
import json
import math
import pathlib
import subprocess
import sys
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compare_reference import LLAMA_CPP_LABELS, assert_summary_matches, reference_summary
from lossd_client import AsyncLossClient, LossClient, compare, tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from lossd_client.compare_stats import combine_totals, format_table
from lossd_client.errors import InvalidArgumentError, ResourceExhaustedError
from serverproc import start_server

LIMIT = 65536
ANSWER_LIMIT = 400_000
TARGET_OUTPUTS = ("p_ref", "p_cand", "delta_p", "nll_ref", "nll_cand")
#: (rtol, atol) of float32-computed values against float64 torch.
TOLERANCES = {"kl": (1e-5, 1e-6), "p_ref": (1e-5, 1e-7), "p_cand": (1e-5, 1e-7), "delta_p": (1e-5, 2e-7), "nll_ref": (1e-6, 2e-6), "nll_cand": (1e-6, 2e-6)}  # fmt: skip


@pytest.fixture(scope="module")
def small_server():
    """Small messages (comparisons stream in chunks), top_k up to 8, a small answer limit."""
    flags = (
        "--max-message-bytes",
        str(LIMIT),
        "--max-chunks-in-flight",
        "2",
        "--max-top-k",
        "8",
        "--max-send-message-bytes",
        str(ANSWER_LIMIT),
    )
    with start_server(*flags) as proc:
        yield proc


@pytest.fixture(scope="module")
def small(small_server):
    with LossClient(small_server.address, timeout_s=120) as c:
        yield c


def model_logits(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0, noise: float = 0.3):
    """A reference and a candidate close to it (as a quantized copy would be), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    candidate = reference + noise * torch.randn(shape, generator=g, dtype=torch.float64)
    return reference.to(dtype), candidate.to(dtype)


def tokens_for(shape: tuple[int, ...], seed: int = 1, ignore_index: int = -100) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=g)
    tokens[torch.rand(shape[:-1], generator=g) < 0.1] = ignore_index
    return tokens


def torch_reference(reference, candidate, tokens, ignore_index: int = -100, shift: bool = False) -> dict[str, torch.Tensor]:
    """The per-token values in float64 with torch's own functions (F.kl_div, log_softmax)."""
    lr, lc = F.log_softmax(reference.double(), -1), F.log_softmax(candidate.double(), -1)
    out = {
        "kl": F.kl_div(lc, lr, log_target=True, reduction="none").sum(-1),
        "argmax_agree": reference.double().argmax(-1) == candidate.double().argmax(-1),
    }
    if tokens is None:
        out["counted"] = torch.ones(reference.shape[:-1], dtype=torch.bool)
        return out
    t = F.pad(tokens[..., 1:], (0, 1), value=ignore_index) if shift else tokens
    counted = t != ignore_index
    index = t.where(counted, 0).unsqueeze(-1)
    out.update(counted=counted, nll_ref=-lr.gather(-1, index).squeeze(-1), nll_cand=-lc.gather(-1, index).squeeze(-1))
    out.update(p_ref=out["nll_ref"].neg().exp(), p_cand=out["nll_cand"].neg().exp())
    out["delta_p"] = out["p_cand"] - out["p_ref"]
    return {name: v if name == "counted" else v.where(counted, torch.zeros((), dtype=v.dtype)) for name, v in out.items()}


def counted_values(result: compare.CompareResult, name: str) -> np.ndarray:
    mask = compare.as_numpy(result.counted).reshape(-1)
    return compare.as_numpy(getattr(result, name)).astype(np.float64).reshape(-1)[mask]


def assert_summary_is_the_numpy_formulas(result: compare.CompareResult) -> None:
    """Every statistic of the summary against the written-out formulas, over the dense values returned."""
    kl, agree = counted_values(result, "kl"), counted_values(result, "argmax_agree")
    if result.nll_ref is None:
        assert_summary_matches(result.summary, reference_summary(kl, agree, None, None, None))
        return
    nll_ref, nll_cand, dp = counted_values(result, "nll_ref"), counted_values(result, "nll_cand"), counted_values(result, "delta_p")
    assert_summary_matches(result.summary, reference_summary(kl, agree, nll_ref, nll_cand, dp))


def assert_totals_are_the_dense_sums(result: compare.CompareResult) -> None:
    t = result.totals
    kl = counted_values(result, "kl")
    assert t.tokens == kl.size and t.argmax_agree == int(counted_values(result, "argmax_agree").sum())
    pairs = [(t.sum_kl, kl), (t.sum_kl2, kl * kl)]
    if result.nll_ref is not None:
        a, b, d = counted_values(result, "nll_ref"), counted_values(result, "nll_cand"), counted_values(result, "delta_p")
        pairs += [(t.sum_nll_ref, a), (t.sum_nll_cand2, b * b), (t.sum_nll_ref_nll_cand, a * b), (t.sum_delta_p, d), (t.sum_delta_p4, d**4)]
    for total, values in pairs:
        assert total == pytest.approx(math.fsum(values), rel=1e-12, abs=1e-15 * float(np.abs(values).sum()) + 1e-300)


# ---------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    ("shape", "with_tokens", "shift", "ignore_index"),
    [((3, 40, 500), True, True, -100), ((120, 300), True, False, 7), ((2, 30, 200), False, False, -100)],
)
def test_per_token_values_match_float64_torch(client, dtype, shape, with_tokens, shift, ignore_index):
    reference, candidate = model_logits(shape, dtype)
    tokens = tokens_for(shape, ignore_index=ignore_index) if with_tokens else None
    result = client.compare(reference, candidate, tokens, ignore_index=ignore_index, shift_targets=shift)
    expected = torch_reference(reference, candidate, tokens, ignore_index, shift)
    assert torch.equal(result.counted, expected["counted"]) and torch.equal(result.argmax_agree, expected["argmax_agree"])
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    for name in ("kl", *TARGET_OUTPUTS):
        got = getattr(result, name)
        if name not in expected:
            assert got is None, name
            continue
        assert got.dtype == compute and got.shape == shape[:-1], name
        rtol, atol = (1e-12, 1e-13) if dtype == torch.float64 else TOLERANCES[name]
        torch.testing.assert_close(got.double(), expected[name], rtol=rtol, atol=atol, msg=name)
    assert_totals_are_the_dense_sums(result)
    assert_summary_is_the_numpy_formulas(result)


def test_a_model_against_itself(client):
    reference, _ = model_logits((2, 50, 100), torch.bfloat16)
    result = client.compare(reference, reference, tokens_for((2, 50, 100)))
    assert float(result.kl.abs().max()) <= 1e-6 and bool(result.argmax_agree[result.counted].all())
    assert result.summary.same_top_p.value == 1.0 and result.summary.ppl_ratio.value == pytest.approx(1.0, abs=1e-9)


def test_totals_combine_across_requests(client):
    reference, candidate = model_logits((6, 30, 80))
    tokens = tokens_for((6, 30, 80))
    whole = client.compare(reference, candidate, tokens, shift_targets=True)
    parts = [client.compare(reference[i : i + 2], candidate[i : i + 2], tokens[i : i + 2], shift_targets=True) for i in range(0, 6, 2)]
    combined = combine_totals([p.totals for p in parts])
    assert (combined.tokens, combined.argmax_agree) == (whole.totals.tokens, whole.totals.argmax_agree)
    for name in ("sum_kl", "sum_nll_ref", "sum_nll_ref_nll_cand", "sum_delta_p2"):
        assert getattr(combined, name) == pytest.approx(getattr(whole.totals, name), rel=1e-12)


def test_top_k_against_torch(client):
    reference, candidate = model_logits((3, 20, 64), torch.bfloat16)
    result = client.compare(reference, candidate, top_k=5)
    for logits, top in ((reference, result.reference_top_k), (candidate, result.candidate_top_k)):
        order = torch.sort(logits.double(), dim=-1, descending=True, stable=True).indices[..., :5]
        assert top.ids.dtype == torch.int64 and torch.equal(top.ids, order)
        want = F.log_softmax(logits.double(), -1).gather(-1, order)
        torch.testing.assert_close(top.logprobs.double(), want, rtol=1e-6, atol=2e-6)
    assert client.compare(reference, candidate).reference_top_k is None


def test_numpy_in_numpy_out_and_the_async_twin(server):
    rng = np.random.default_rng(2)
    reference = rng.standard_normal((4, 25, 40), dtype=np.float32)
    candidate = reference + 0.1 * rng.standard_normal((4, 25, 40), dtype=np.float32)
    tokens = rng.integers(0, 40, (4, 25))

    async def run():
        async with AsyncLossClient(server.address, timeout_s=60) as c:
            return await c.compare(reference, candidate, tokens, shift_targets=True, top_k=2)

    result = asyncio.run(run())
    assert isinstance(result.kl, np.ndarray) and result.kl.dtype == np.float32 and result.kl.shape == (4, 25)
    assert isinstance(result.reference_top_k.ids, np.ndarray) and result.reference_top_k.ids.shape == (4, 25, 2)
    expected = torch_reference(torch.from_numpy(reference), torch.from_numpy(candidate), torch.from_numpy(tokens), shift=True)
    np.testing.assert_allclose(result.nll_cand, expected["nll_cand"].numpy(), rtol=1e-6, atol=2e-6)
    assert not result.counted[:, -1].any() and result.summary.tokens == int(result.counted.sum())


# ---------------------------------------------------------------------------- large inputs
def test_chunked_equals_unchunked(client, small, small_server):
    reference, candidate = model_logits((4, 96, 500), torch.bfloat16)  # 768 KB of logits
    tokens = tokens_for((4, 96, 500))
    sent = []
    whole = client.compare(reference, candidate, tokens, shift_targets=True, top_k=5)
    chunked = small.compare(reference, candidate, tokens, shift_targets=True, top_k=5, progress=sent.append)
    assert len(sent) > 10 and sum(sent) >= 2 * reference.numel() * 2  # many messages: it was streamed
    for name in compare.DENSE_OUTPUTS:
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    for name in ("reference_top_k", "candidate_top_k"):
        assert torch.equal(getattr(chunked, name).ids, getattr(whole, name).ids)
        assert torch.equal(getattr(chunked, name).logprobs, getattr(whole, name).logprobs)
    assert chunked.totals.tokens == whole.totals.tokens and chunked.totals.sum_kl == pytest.approx(whole.totals.sum_kl, rel=1e-12)
    assert chunked.summary.kld == whole.summary.kld and chunked.summary.kld_percentiles == whole.summary.kld_percentiles
    with grpc.insecure_channel(small_server.address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.LossServiceStub(channel).Compare(compare.request(compare.CompareInputs(reference, candidate, tokens)), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "CompareChunked" in info.value.details()


def test_rows_bigger_than_the_clients_chunk_bytes_travel_one_per_message(client, small_server):
    """chunk_bytes is the client's send granularity, not a limit: a vocabulary row of both models
    (2 x 20 KB here) over it but within the server's max_message_bytes is sent alone."""
    reference, candidate = model_logits((3, 5000))
    tokens = tokens_for((3, 5000))
    sent = []
    with LossClient(small_server.address, timeout_s=120, chunk_bytes=4096) as c:
        chunked = c.compare(reference, candidate, tokens, progress=sent.append)
    assert len(sent) == 1 + 3  # the header, then one row of both models per message
    whole = client.compare(reference, candidate, tokens)
    for name in compare.DENSE_OUTPUTS:
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    with LossClient(small_server.address, timeout_s=120) as c, pytest.raises(InvalidArgumentError, match="max_message_bytes"):
        c.compare(*model_logits((2, 9000)))  # a row of both models: 72 KB, over the server's 64 KiB


def test_an_answer_over_the_send_limit_is_refused_before_compute(small):
    reference, candidate = model_logits((3, 2000, 16))  # 6000 positions, top 8 of both models: ~1.2 MB of answer
    with pytest.raises(ResourceExhaustedError, match="max_send_message_bytes"):
        small.compare(reference, candidate, top_k=8)
    assert small.compare(reference, candidate).totals.tokens == 6000


# ---------------------------------------------------------------------------- bad input
def _bad_cases() -> list[tuple[str, dict[str, Any], str]]:
    """(what, compare's arguments, the argument the error names: the same whether the client sent it
    through Compare or CompareChunked, whose own errors name its header's fields, and ``tokens``
    though they travel as the requests' ``target``)."""
    reference, candidate = model_logits((2, 60, 300))  # 144 KB per model: chunked on the small server
    tokens = tokens_for((2, 60, 300))
    out_of_range = tokens.clone()
    out_of_range[1, 3] = 300
    base = {"reference": reference, "candidate": candidate, "tokens": tokens}
    return [
        ("shape mismatch", {**base, "candidate": model_logits((2, 61, 300))[1]}, "candidate"),
        ("different vocabularies", {**base, "candidate": model_logits((2, 60, 301))[1]}, "candidate"),
        ("tokens out of range", {**base, "tokens": out_of_range}, "tokens"),
        ("tokens shape", {**base, "tokens": tokens[:, :59]}, "tokens"),
        ("k over the limit", {**base, "top_k": 21}, "options.top_k"),
        ("shift without targets", {**base, "tokens": None, "shift_targets": True}, "options.shift_targets"),
        ("integer logits", {**base, "reference": reference.to(torch.int32)}, "reference"),
        ("ignore_index past int64", {**base, "ignore_index": 2**63}, "options.ignore_index"),
        ("k past uint32", {**base, "top_k": 2**32}, "options.top_k"),
        ("sparse reference", {**base, "reference": reference.to_sparse()}, "reference"),
        ("sparse candidate", {**base, "candidate": candidate.to_sparse()}, "candidate"),
        ("sparse tokens", {**base, "tokens": tokens.to_sparse()}, "tokens"),
    ]


@pytest.mark.parametrize("path", ["unary", "chunked"])
@pytest.mark.parametrize(("what", "kwargs", "field"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_is_invalid_argument_naming_the_field(client, small, path, what, kwargs, field):
    kwargs = dict(kwargs)
    if path == "chunked" and kwargs.get("top_k") == 21:
        kwargs["top_k"] = 9  # the small server's limit is 8
    c = client if path == "unary" else small
    with pytest.raises(InvalidArgumentError) as info:
        c.compare(kwargs.pop("reference"), kwargs.pop("candidate"), kwargs.pop("tokens"), **kwargs)
    assert info.value.details.startswith(field + ":"), info.value.details
    assert c.health() == "SERVING"


TOKEN_DTYPES = [torch.uint16, torch.uint32, torch.uint64, torch.int32, np.uint16, np.uint32, np.uint64, np.int16]


def _as_token_dtype(tokens: torch.Tensor, dtype: Any) -> Any:
    return tokens.to(dtype) if isinstance(dtype, torch.dtype) else tokens.numpy().astype(dtype)


@pytest.mark.parametrize("path", ["unary", "chunked"])
@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=str)
def test_token_ids_of_any_integer_dtype_compare_as_int64_ones(client, small, path, dtype):
    """compare takes the token ids perplexity / loglikelihood take (uint16 as on disk, ...):
    it used to refuse every dtype outside the wire's (``target: unsupported torch dtype torch.uint16``)."""
    c = client if path == "unary" else small
    reference, candidate = model_logits((2, 60, 300))
    tokens = tokens_for((2, 60, 300), ignore_index=7)
    want = c.compare(reference, candidate, tokens, ignore_index=7, shift_targets=True, top_k=2)
    got = c.compare(reference, candidate, _as_token_dtype(tokens, dtype), ignore_index=7, shift_targets=True, top_k=2)
    assert got.totals == want.totals
    for name in ("kl", "counted", "nll_ref", "nll_cand", "delta_p"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.candidate_top_k.ids, want.candidate_top_k.ids)


def test_unsigned_token_ids_out_of_the_vocabulary_are_still_refused(client, server):
    reference, candidate = model_logits((2, 5, 7))
    tokens = torch.zeros(2, 5, dtype=torch.uint16)
    tokens[1, 2] = 7
    with pytest.raises(InvalidArgumentError, match="^tokens: Target 7 is out of bounds"):
        client.compare(reference, candidate, tokens)
    with pytest.raises(InvalidArgumentError, match=f"^tokens: token id {2**64 - 1} is out of int64 range"):
        client.compare(reference, candidate, np.full((2, 5), 2**64 - 1, dtype=np.uint64))

    async def run():
        async with AsyncLossClient(server.address, timeout_s=60) as c:
            return await c.compare(reference, candidate, ids.to(torch.uint32))

    ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(3))
    assert asyncio.run(run()).totals == client.compare(reference, candidate, ids).totals


@pytest.mark.parametrize("name", ["ignore_index", "top_k"])
@pytest.mark.parametrize("value", [3.7, 3.0, "3", True, None, np.float64(2.0)], ids=repr)
def test_integer_options_that_are_no_integers_are_refused_by_name(client, name, value):
    """ignore_index=3.7 was truncated to 3 (real tokens 3 dropped), "3" parsed, top_k=True taken as 1."""
    reference, candidate = model_logits((2, 5, 7))
    with pytest.raises(InvalidArgumentError, match=f"^options.{name}: argument '{name}' must be int, not {type(value).__name__}$"):
        client.compare(reference, candidate, tokens_for((2, 5, 7)), **{name: value})


@pytest.mark.parametrize("value", ["no", 2, None], ids=repr)
def test_shift_targets_must_be_a_bool(client, value):
    reference, candidate = model_logits((2, 5, 7))
    refused = f"^options.shift_targets: argument 'shift_targets' must be bool, not {type(value).__name__}$"
    with pytest.raises(InvalidArgumentError, match=refused):
        client.compare(reference, candidate, tokens_for((2, 5, 7)), shift_targets=value)
    assert client.compare(reference, candidate, tokens_for((2, 5, 7), ignore_index=0), shift_targets=np.bool_(True)).totals.tokens <= 8


def test_integer_options_take_numpy_and_torch_integers(client):
    reference, candidate = model_logits((2, 5, 7))
    tokens = tokens_for((2, 5, 7), ignore_index=3)
    want = client.compare(reference, candidate, tokens, ignore_index=3, top_k=2)
    for ignore_index, top_k in ((np.int64(3), np.uint32(2)), (np.int8(3), torch.tensor(2))):
        got = client.compare(reference, candidate, tokens, ignore_index=ignore_index, top_k=top_k)
        assert got.totals == want.totals and torch.equal(got.reference_top_k.ids, want.reference_top_k.ids)


def _chunked_status(address: str, messages: list[pb.CompareChunk]) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        channel.stream_unary("/lossd.v1.LossService/CompareChunked", response_deserializer=pb.CompareResponse.FromString)(
            iter([m.SerializeToString() for m in messages]), timeout=30
        )
    return info.value


def test_chunk_stream_mistakes_name_the_field(small_server):
    header = pb.CompareHeader(reference_dtype=pb.FLOAT32, reference_shape=[4, 8], candidate_dtype=pb.FLOAT32, candidate_shape=[4, 8])
    rows = {"reference_rows": b"\0" * 64, "candidate_rows": b"\0" * 64}  # 2 rows of each
    cases = [
        ([], "header"),
        ([pb.CompareChunk(**rows)], "header"),
        ([pb.CompareChunk(header=header), pb.CompareChunk(reference_rows=b"\0" * 64, candidate_rows=b"\0" * 32)], "candidate_rows"),
        ([pb.CompareChunk(header=header), pb.CompareChunk(**rows)], "reference_rows"),  # 2 of 4 rows
        ([pb.CompareChunk(header=header, **rows), pb.CompareChunk(header=header, **rows)], "header"),
    ]
    for messages, field in cases:
        err = _chunked_status(small_server.address, messages)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(field + ":"), err.details()


def _header_cases() -> list[tuple[str, dict[str, Any], str, str]]:
    """(what, CompareRequest fields, the field Compare's error names, the field CompareChunked's header error names)."""
    logits = np.zeros((3, 4, 11), np.float32)
    tokens = np.zeros((3, 4), np.int64)
    base = {"reference": logits, "candidate": logits, "target": tokens}
    return [
        ("target shape", {**base, "target": tokens.T.copy()}, "target", "header.target"),
        ("target out of range", {**base, "target": np.full((3, 4), 11)}, "target", "header.target"),
        ("floating target", {**base, "target": tokens.astype(np.float32)}, "target", "header.target"),
        ("candidate shape", {**base, "candidate": np.zeros((12, 11), np.float32)}, "candidate", "header.candidate_shape"),
        ("candidate vocabulary", {**base, "candidate": np.zeros((3, 4, 12), np.float32)}, "candidate", "header.candidate_shape"),
        ("int32 reference", {**base, "reference": logits.astype(np.int32)}, "reference", "header.reference_dtype"),
        ("int64 candidate", {**base, "candidate": logits.astype(np.int64)}, "candidate", "header.candidate_dtype"),
        ("0-d reference", {**base, "reference": np.float32(0), "candidate": np.float32(0), "target": None}, "reference", "header.reference_shape"),
        ("empty vocabulary", {**base, "reference": np.zeros((3, 0), np.float32), "target": None}, "reference", "header.reference_shape"),
        ("top_k over the vocabulary", {**base, "top_k": 12}, "options.top_k", "header.options.top_k"),
        ("top_k over the limit", {**base, "top_k": 21}, "options.top_k", "header.options.top_k"),
        ("shift without targets", {**base, "target": None, "shift_targets": True}, "options.shift_targets", "header.options.shift_targets"),
    ]


@pytest.mark.parametrize(("what", "fields", "field", "header_field"), _header_cases(), ids=[c[0] for c in _header_cases()])
def test_a_bad_compare_header_names_the_headers_field(server, what, fields, field, header_field):
    """CompareChunked refuses what Compare refuses, with the same message, naming the header's
    field (header.target, header.candidate_shape, header.reference_dtype, header.options.top_k),
    not the CompareRequest's, which the chunked call does not have."""
    fields = dict(fields)
    options = pb.CompareOptions(top_k=fields.pop("top_k", 0), shift_targets=fields.pop("shift_targets", False))
    request = pb.CompareRequest(id="bad", options=options, **{k: tensors.to_proto(v) for k, v in fields.items() if v is not None})
    header = pb.CompareHeader(id="bad", options=options, target=request.target if request.HasField("target") else None)
    for name in ("reference", "candidate"):
        setattr(header, f"{name}_dtype", getattr(request, name).dtype)
        getattr(header, f"{name}_shape")[:] = getattr(request, name).shape
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.LossServiceStub(channel).Compare(request, timeout=30)
    unary = info.value
    chunked = _chunked_status(server.address, [pb.CompareChunk(header=header)])
    assert unary.code() == chunked.code() == grpc.StatusCode.INVALID_ARGUMENT, (unary.details(), chunked.details())
    assert unary.details().startswith(field + ": "), unary.details()
    assert chunked.details() == header_field + unary.details().removeprefix(field), chunked.details()


@pytest.mark.parametrize("rows", [2**29, 2**50])
def test_a_header_of_billions_of_positions_without_targets_builds_nothing(small_server, rows):
    """Without targets every position counts: the plan used to build a mask of every position
    before the answer's size was checked (2**50 positions: INTERNAL, failing to allocate 1 PB;
    2**29: 512 MiB outside the budget for a header of a few bytes)."""
    header = pb.CompareHeader(reference_dtype=pb.FLOAT32, reference_shape=[rows, 1], candidate_dtype=pb.FLOAT32, candidate_shape=[rows, 1])
    before = small_server.status_kib("VmHWM")
    err = _chunked_status(small_server.address, [pb.CompareChunk(header=header)])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_send_message_bytes" in err.details(), err.details()
    assert small_server.status_kib("VmHWM") - before < 64 * 1024  # KiB


@pytest.mark.parametrize("path", ["unary", "chunked"])
@pytest.mark.parametrize("shape", [(0, 2**40), (2, 0, 2**40)], ids=["(0, 2^40)", "(2, 0, 2^40)"])
@pytest.mark.parametrize("with_tokens", [False, True], ids=["without tokens", "with tokens"])
def test_no_positions_of_a_huge_vocabulary_compare_as_torch_does(server, path, shape, with_tokens):
    """Positions of 2**40 classes, none of them: no bytes, and torch's values are empty. They were
    refused RESOURCE_EXHAUSTED ("needs 52776507813891 bytes of server memory ... split it into
    smaller requests") for the 4 TiB working rows that comparing a row makes (probe 13 F4); they
    are answered as the same positions of 7 classes are."""

    def compared(vocab: int) -> compare.CompareResult:
        logits = pb.Tensor(dtype=pb.FLOAT32, shape=[*shape[:-1], vocab])  # no data: no elements
        target = pb.Tensor(dtype=pb.INT64, shape=shape[:-1]) if with_tokens else None
        options = pb.CompareOptions(top_k=3)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            if path == "unary":
                reply = stub.Compare(pb.CompareRequest(reference=logits, candidate=logits, target=target, options=options), timeout=30)
            else:
                header = pb.CompareHeader(options=options, reference_dtype=pb.FLOAT32, candidate_dtype=pb.FLOAT32, target=target)
                header.reference_shape[:] = header.candidate_shape[:] = logits.shape
                reply = stub.CompareChunked(iter([pb.CompareChunk(header=header)]), timeout=30)
        return compare.result(reply, as_torch=True)

    got, seven = compared(2**40), compared(7)
    logits = torch.empty(shape)
    want = torch_reference(logits, logits, torch.empty(shape[:-1], dtype=torch.int64) if with_tokens else None)
    assert sorted(name for name in ("kl", "counted", *TARGET_OUTPUTS, "argmax_agree") if getattr(got, name) is not None) == sorted(want)
    for name, value in want.items():
        assert getattr(got, name).shape == value.shape and getattr(got, name).dtype == (torch.bool if value.dtype == torch.bool else torch.float32)
        assert torch.equal(getattr(got, name), getattr(seven, name)), name
    for top in (got.reference_top_k, got.candidate_top_k):
        assert top.ids.shape == top.logprobs.shape == torch.topk(logits, 3).indices.shape
    assert got.totals == seven.totals and got.totals.tokens == 0


def test_server_info_names_the_top_k_limit(client, small):
    assert client.server_info().max_top_k == 20 and small.server_info().max_top_k == 8


# ---------------------------------------------------------------------------- the CLI
def lossd_client(address: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lossd_client.cli", "--target", address, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    reference, candidate = model_logits((3, 64, 200), torch.float32, seed=5)
    tokens = tokens_for((3, 64, 200), seed=6)
    d = tmp_path_factory.mktemp("compare")
    np.savez(d / "base.npz", logits=reference.numpy(), tokens=tokens.numpy())
    torch.save({"logits": candidate.to(torch.bfloat16)}, d / "quantized.pt")
    np.savez(d / "tokens.npz", input_ids=tokens.numpy())
    return d, reference, candidate.to(torch.bfloat16), tokens


def test_cli_prints_llama_cpps_table(server, client, saved):
    d, reference, candidate, tokens = saved
    out = lossd_client(server.address, "compare", str(d / "base.npz"), str(d / "quantized.pt"), "--shift")
    assert out.returncode == 0, out.stderr
    expected = client.compare(reference.numpy(), candidate, tokens.numpy(), shift_targets=True)  # torch in: a bf16 candidate
    table = out.stdout.split("\n", 3)[3]
    assert table == format_table(expected.summary)
    labels = [line for line in table.splitlines() if ":" in line and not line.startswith("Tokens")]
    assert [line[: len(label)] for line, label in zip(labels, LLAMA_CPP_LABELS, strict=True)] == LLAMA_CPP_LABELS
    assert "%|" in out.stderr  # the progress bar


def test_cli_json_tokens_file_and_output(server, client, saved, tmp_path):
    d, reference, candidate, tokens = saved
    args = ["compare", str(d / "base.npz"), str(d / "quantized.pt"), "--tokens", str(d / "tokens.npz"), "--ignore-index", "-100"]
    out = lossd_client(server.address, *args, "--json", "--no-progress", "--output", str(tmp_path / "t.npz"), "--top-k", "3")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    expected = client.compare(reference.numpy(), candidate, tokens.numpy(), top_k=3)
    assert doc["shape"] == [3, 64, 200] and doc["summary"]["tokens"] == expected.summary.tokens
    assert doc["summary"]["kld"] == expected.summary.kld.to_dict()
    assert doc["summary"]["ppl_ratio"] == expected.summary.ppl_ratio.to_dict()
    assert doc["totals"]["sum_kl"] == expected.totals.sum_kl
    saved_arrays = np.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(saved_arrays["kl"], compare.as_numpy(expected.kl))
    np.testing.assert_array_equal(saved_arrays["candidate_top_k_ids"], compare.as_numpy(expected.candidate_top_k.ids))


def test_cli_without_tokens_and_its_errors(server, saved, tmp_path):
    d, reference, candidate, _ = saved
    np.savez(tmp_path / "plain.npz", logits=reference.numpy())
    out = lossd_client(server.address, "compare", str(tmp_path / "plain.npz"), str(d / "quantized.pt"), "--no-progress")
    assert out.returncode == 0 and "Perplexity statistics" not in out.stdout and "Same top p" in out.stdout
    missing = lossd_client(server.address, "compare", str(tmp_path / "nope.npz"), str(d / "quantized.pt"))
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    np.savez(tmp_path / "other.npz", logits=reference[:, :10].numpy())
    bad = lossd_client(server.address, "compare", str(tmp_path / "other.npz"), str(d / "quantized.pt"), "--no-progress")
    assert bad.returncode == 1 and "INVALID_ARGUMENT: candidate:" in bad.stderr


def test_cli_takes_token_ids_of_any_integer_dtype(server, client, saved, tmp_path):
    """nanoGPT-style uint16 ids: the CLI refused them at load (``target 'input_ids': unsupported numpy dtype uint16``)."""
    d, reference, candidate, tokens = saved
    ids = tokens.clamp(min=0).numpy()
    np.savez(tmp_path / "ids_u16.npz", input_ids=ids.astype(np.uint16))
    args = ["compare", str(d / "base.npz"), str(d / "quantized.pt"), "--tokens", str(tmp_path / "ids_u16.npz")]
    out = lossd_client(server.address, *args, "--shift", "--json", "--no-progress")
    assert out.returncode == 0, out.stderr
    expected = client.compare(reference.numpy(), candidate, ids, shift_targets=True)
    assert json.loads(out.stdout)["totals"]["sum_kl"] == expected.totals.sum_kl
    np.savez(tmp_path / "ids_u64.npz", input_ids=np.full(ids.shape, 2**64 - 1, dtype=np.uint64))
    bad = lossd_client(server.address, "compare", str(d / "base.npz"), str(d / "quantized.pt"), "--tokens", str(tmp_path / "ids_u64.npz"))
    assert bad.returncode == 2 and f"ids_u64.npz: target 'input_ids': token id {2**64 - 1} is out of int64 range" in bad.stderr, bad.stderr


def test_the_example_compares_a_model_with_its_rounded_copy_and_agrees_with_torch(server):
    example = pathlib.Path(__file__).resolve().parents[2] / "examples" / "compare_models.py"
    cmd = [sys.executable, str(example), "--target", server.address, "--train-steps", "20"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Mean    KLD:" in out.stdout and "Same top p:" in out.stdout and "agrees with local torch" in out.stdout


def test_the_example_prints_the_same_figures_on_every_run(server):
    """It trained for a wall-clock time: the step count, and every figure the README quotes, varied with the machine's load."""
    example = pathlib.Path(__file__).resolve().parents[2] / "examples" / "compare_models.py"
    cmd = [sys.executable, str(example), "--target", server.address, "--train-steps", "5"]
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert all(out.returncode == 0 for out in runs), runs[0].stdout + runs[0].stderr
    assert "(5 steps," in runs[0].stdout and runs[0].stdout == runs[1].stdout


def test_the_async_client_raises_the_servers_refusal_of_a_compare_header_as_the_blocking_one_does(small_server):
    """As for EvaluateChunked: CompareChunked refused at its header (a token out of the vocabulary)
    while the client still writes rows could end INTERNAL "Internal error from Core" in grpc.aio.
    The refusal names the caller's argument, ``tokens`` (CompareChunked's own names ``header.target``)."""
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((4, 600, 50), dtype=np.float32)
    tokens = rng.integers(0, 50, (4, 600))
    tokens[1, 7] = 77

    async def main():
        async with AsyncLossClient(small_server.address, timeout_s=60) as client:
            for _ in range(20):
                with pytest.raises(InvalidArgumentError, match=r"^tokens: Target 77 is out of bounds"):
                    await client.compare(reference, reference, tokens)

    asyncio.run(main())
    with LossClient(small_server.address) as client, pytest.raises(InvalidArgumentError, match=r"^tokens: Target 77 is out of bounds"):
        client.compare(reference, reference, tokens)
