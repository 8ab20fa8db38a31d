"""One large request over parallel streams equals the same request over one stream, bit for bit.

A client with ``connections=4`` cuts a chunked request along its rows into up to 4 EvaluateChunked
calls (lossd_client.split) and joins the answers; a client with one connection sends it whole.
Both talk to the same two-worker server; every reduction and target kind is compared (loss,
float64 totals, extras, per-sequence statistics), and the server's own counters show how many
calls each request became.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import AsyncLossClient, LossClient, LossRequest, split
from serverproc import start_server
from workerprocs import stop_everything

SMALL = {"chunked_above_bytes": 1024, "chunk_bytes": 4096, "timeout_s": 120}  # small requests take the chunked path
CHUNKED_OK = 'lossd_requests_total{code="OK",method="EvaluateChunked"}'
REDUCTIONS = ("mean", "sum", "none")


@pytest.fixture(scope="module")
def server():
    proc = start_server("--workers", "2", "--drain-s", "0.2", metrics=True)
    try:
        yield proc
    finally:
        assert stop_everything(proc) == 0, proc.log()


@pytest.fixture(scope="module")
def clients(server):
    with LossClient(server.address, **SMALL) as one, LossClient(server.address, connections=4, **SMALL) as four:
        yield one, four


def _g(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def class_indices(reduction: str) -> LossRequest:
    g = _g(1)
    t = g.integers(0, 23, 37)
    t[::5] = -100
    return LossRequest(g.standard_normal((37, 23), dtype=np.float32), t, weight=g.uniform(0.5, 2, 23).astype(np.float32), reduction=reduction)


def class_indices_kdim_nll(reduction: str) -> LossRequest:
    g = _g(2)
    logp = F.log_softmax(torch.from_numpy(g.standard_normal((9, 13, 5), dtype=np.float32)), 1).numpy()
    return LossRequest(logp, g.integers(0, 13, (9, 5)), loss="nll_loss", reduction=reduction)


def language_model(reduction: str) -> LossRequest:
    g = _g(3)
    t = g.integers(0, 17, (6, 11))
    t[2, 4:] = -100
    extras = ("target_logprob", "entropy", "target_rank", "argmax_correct")
    x = g.standard_normal((6, 11, 17), dtype=np.float32)
    return LossRequest(x, t, class_axis=-1, shift_targets=True, extras=extras, sequence_stats=True, reduction=reduction)


def label_smoothing(reduction: str) -> LossRequest:
    g = _g(4)
    return LossRequest(g.standard_normal((33, 21), dtype=np.float32), g.integers(0, 21, 33), label_smoothing=0.1, reduction=reduction)


def probabilities(reduction: str) -> LossRequest:
    g = _g(5)
    p = F.softmax(torch.from_numpy(g.standard_normal((29, 19), dtype=np.float32)), 1).numpy()
    return LossRequest(g.standard_normal((29, 19), dtype=np.float32), p, label_smoothing=0.05, reduction=reduction)


def probabilities_kdim(reduction: str) -> LossRequest:
    g = _g(6)
    p = F.softmax(torch.from_numpy(g.standard_normal((7, 6, 4), dtype=np.float32)), 1).numpy()
    return LossRequest(g.standard_normal((7, 6, 4), dtype=np.float32), p, reduction=reduction)


def bce(reduction: str) -> LossRequest:
    g = _g(7)
    return LossRequest(
        g.standard_normal((31, 12), dtype=np.float32),
        g.random((31, 12), dtype=np.float32),
        loss="binary_cross_entropy_with_logits",
        weight=g.uniform(0.1, 2, (31, 12)).astype(np.float32),
        pos_weight=g.uniform(0.5, 3, 12).astype(np.float32),
        reduction=reduction,
    )


def bfloat16_torch(reduction: str) -> LossRequest:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(41, 31, generator=gen).to(torch.bfloat16)
    return LossRequest(x, torch.randint(0, 31, (41,), generator=gen), reduction=reduction)


def float16_numpy(reduction: str) -> LossRequest:
    g = _g(9)
    return LossRequest(g.standard_normal((27, 35)).astype(np.float16), g.integers(0, 35, 27), reduction=reduction)


KINDS = [class_indices, class_indices_kdim_nll, language_model, label_smoothing, probabilities, probabilities_kdim, bce, bfloat16_torch, float16_numpy]


def same(a, b) -> bool:
    """Equal values, dtype and shape (NaN equal to NaN), torch or numpy."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()))
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True)


def assert_same_result(one, par) -> None:
    assert same(one.loss, par.loss), (one.loss, par.loss)
    assert (one.loss_sum, one.weight_sum, one.counted) == (par.loss_sum, par.weight_sum, par.counted)
    assert one.extras.keys() == par.extras.keys()
    for name in one.extras:
        assert same(one.extras[name], par.extras[name]), name
    assert (one.sequences is None) == (par.sequences is None)
    if one.sequences is not None:
        for name in ("nll_sum", "tokens", "mean_nll", "perplexity", "is_greedy"):
            assert np.array_equal(getattr(one.sequences, name), getattr(par.sequences, name), equal_nan=True), name


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_parallel_streams_equal_one_stream(server, clients, kind, reduction):
    one, four = clients
    req = kind(reduction)
    cut = split.splittable(req)
    assert cut == (kind is not label_smoothing or reduction != "mean")  # the smoothed class-index mean keeps two sums
    before = server.metrics().get(CHUNKED_OK, 0.0)
    single = one.evaluate(req)
    middle = server.metrics().get(CHUNKED_OK, 0.0)
    parallel = four.evaluate(req)
    after = server.metrics().get(CHUNKED_OK, 0.0)
    assert middle - before == 1
    assert after - middle == (min(4, np.shape(req.input)[0]) if cut else 1)
    assert_same_result(single, parallel)


@pytest.mark.parametrize("kind", [language_model, bce, bfloat16_torch], ids=lambda k: k.__name__)
def test_async_client_parallel_streams_equal_one_stream(server, kind):
    async def both():
        async with AsyncLossClient(server.address, **SMALL) as one, AsyncLossClient(server.address, connections=3, **SMALL) as three:
            return await one.evaluate(kind("none")), await three.evaluate(kind("none")), await three.evaluate(kind("mean"))

    single, parallel, mean = asyncio.run(both())
    assert_same_result(single, parallel)
    with LossClient(server.address, **SMALL) as one:
        assert_same_result(one.evaluate(kind("mean")), mean)


def test_perplexity_of_a_large_batch_over_parallel_streams_matches_torch(server):
    """Defaults (1 MiB chunks, 4 MiB chunked threshold): (8, 64, 4096) float32 logits are 8 MiB."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(8, 64, 4096, generator=gen)
    tokens = torch.randint(0, 4096, (8, 64), generator=gen)
    tokens[3, 50:] = -100
    with LossClient(server.address, timeout_s=120) as one, LossClient(server.address, connections=2, timeout_s=120) as two:
        before = server.metrics().get(CHUNKED_OK, 0.0)
        ppl_one = one.perplexity(logits, tokens)
        ppl_two = two.perplexity(logits, tokens)
        assert server.metrics().get(CHUNKED_OK, 0.0) - before == 3  # one whole, then two parts
    assert torch.equal(ppl_one.token_nll, ppl_two.token_nll)
    assert (ppl_one.nll_sum, ppl_one.tokens) == (ppl_two.nll_sum, ppl_two.tokens)
    assert np.array_equal(ppl_one.sequence_perplexity, ppl_two.sequence_perplexity)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 4096), tokens[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(torch.tensor(ppl_two.nll_sum, dtype=torch.float32), want, rtol=1e-5, atol=1e-3)


def _rows_of_big_losses(dtype: torch.dtype, rows: int = 1024) -> dict[str, tuple[str, dict, dict]]:
    """Requests over the chunked threshold whose per-element losses are 3/4 of the dtype's largest
    value: their total overflows the dtype torch sums in, each part's does not."""
    b = 0.75 * torch.finfo(dtype).max
    pair = torch.tensor([[0.0, b], [b, 0.0]], dtype=torch.float64).repeat(rows // 2, 1).to(dtype)
    one_hot = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=dtype).repeat(rows // 2, 1)
    column = torch.full((rows, 1), -b, dtype=torch.float64).to(dtype)
    return {
        "cross_entropy": ("cross_entropy", {"input": pair, "target": torch.tensor([0, 1]).repeat(rows // 2)}, {}),
        "probabilities": ("cross_entropy", {"input": -pair, "target": one_hot}, {}),
        "bce": ("binary_cross_entropy_with_logits", {"input": column, "target": torch.ones(rows, 1, dtype=dtype)}, {}),
        "kl_div": ("kl_div", {"input": column, "target": torch.ones(rows, 1, dtype=dtype)}, {"reduction": "batchmean"}),
    }


def assert_torchs_special_value(got: torch.Tensor, want: torch.Tensor) -> None:
    """inf (with its sign), nan or a signed zero where torch has one; finite values within rounding."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.isnan() or got.isnan():
        assert want.isnan() and got.isnan(), (got, want)
    elif want.isinf() or want == 0:
        assert got.item() == want.item() and got.signbit() == want.signbit(), (got, want)
    else:
        torch.testing.assert_close(got, want)


def _torch_or_its_float32(fn: str, tensors: dict, options: dict) -> torch.Tensor:
    """torch's result; for 16-bit tensors torch's float32 result cast to them (lossd's half rule)."""
    own = getattr(F, fn)(**tensors, **options)
    if own.dtype not in (torch.float16, torch.bfloat16):
        return own
    as_float32 = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return getattr(F, fn)(**as_float32, **options).to(own.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["cross_entropy", "probabilities", "bce", "kl_div"])
def test_parts_joined_overflow_as_torchs_totals_do(server, clients, name, dtype):
    """The join divides as the server does (lossd_client.reduction.quotient): a mean whose total
    overflows torch's dtype is torch's inf, though no part's total overflows (probe 14 F2); a 16-bit
    one is torch's float32 mean, cast."""
    one, four = clients
    fn, tensors, options = _rows_of_big_losses(dtype)[name]
    want = _torch_or_its_float32(fn, tensors, options)
    assert split.splittable(LossRequest(tensors["input"], tensors["target"], loss=fn, **options))
    before = server.metrics().get(CHUNKED_OK, 0.0)
    for client in (one, four):
        assert_torchs_special_value(getattr(client, fn)(**tensors, **options), want)
    assert server.metrics().get(CHUNKED_OK, 0.0) - before == 5  # whole, then four parts


@pytest.mark.parametrize("value", [-1.0, -0.5])
def test_parts_joined_over_a_float16_count_are_torchs_float32_mean(clients, value):
    """torch's float16 nll_loss divides by the count cast to float16, inf for 70000 rows (a mean
    of nan or 0); lossd's, whole or joined from parts, is torch's float32 mean, cast."""
    logp, target = torch.full((70_000, 2), value, dtype=torch.float16), torch.zeros(70_000, dtype=torch.long)
    want = _torch_or_its_float32("nll_loss", {"input": logp, "target": target}, {})
    assert want.item() == -value
    for client in clients:
        assert_torchs_special_value(client.nll_loss(logp, target), want)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_parts_joined_keep_torchs_sign_of_a_zero_total(server, clients, dtype, reduction):
    """cross_entropy with probabilities is ``-(input * target).sum()``: all-zero targets give -0.0,
    joined from parts or not; the other losses' zero totals are +0.0 (probe 14 F4)."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(1024, 3, generator=gen).to(dtype)
    requests = [
        ("cross_entropy", {"input": x, "target": torch.zeros(1024, 3, dtype=dtype)}),
        ("nll_loss", {"input": torch.zeros(1024, 3, dtype=dtype), "target": torch.zeros(1024, dtype=torch.long)}),
        ("binary_cross_entropy_with_logits", {"input": torch.full((1024, 1), 1000.0, dtype=dtype), "target": torch.ones(1024, 1, dtype=dtype)}),
    ]
    one, four = clients
    for fn, tensors in requests:
        want = _torch_or_its_float32(fn, tensors, {"reduction": reduction})
        assert want == 0
        before = server.metrics().get(CHUNKED_OK, 0.0)
        for client in (one, four):
            assert_torchs_special_value(getattr(client, fn)(**tensors, reduction=reduction), want)
        assert server.metrics().get(CHUNKED_OK, 0.0) - before == 5  # whole, then four parts


@pytest.mark.parametrize(("size_average", "reduce"), [(False, None), (None, False), (True, True)])
@pytest.mark.parametrize("loss", ["cross_entropy", "kl_div"])
def test_a_request_with_torchs_legacy_keywords_is_sent_whole_and_equals_torch(server, clients, loss, size_average, reduce):
    """size_average / reduce decide the reduction (and kl_div's 'batchmean' beside them divides by the
    batch): a split summed request came back as its mean (3.96 for 253.17), so such a request is never cut."""
    g = _g(15)
    x = torch.from_numpy(g.standard_normal((40, 12), dtype=np.float32))
    if loss == "cross_entropy":
        t, reduction = torch.from_numpy(g.integers(0, 12, 40)), "mean"
        want = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    else:
        x, t, reduction = F.log_softmax(x, 1), F.softmax(torch.from_numpy(g.standard_normal((40, 12), dtype=np.float32)), 1), "batchmean"
        want = F.kl_div(x, t, size_average=size_average, reduce=reduce, reduction=reduction)
    req = LossRequest(x.numpy(), t.numpy(), loss, reduction=reduction, size_average=size_average, reduce=reduce)
    assert not split.splittable(req)
    one, four = clients
    before = server.metrics().get(CHUNKED_OK, 0.0)
    single, whole = one.evaluate(req), four.evaluate(req)
    assert server.metrics().get(CHUNKED_OK, 0.0) - before == 2  # one call each
    assert_same_result(single, whole)
    torch.testing.assert_close(torch.from_numpy(np.asarray(whole.loss)), want, rtol=1e-5, atol=1e-6)
