"""The client against a buggy or hostile server (probe 18): every answer is checked against its request.

A fake lossd server (this file run as a script: grpc.aio, generic handlers, answers crafted as
bytes) answers each call with a well-formed answer to the request it got, then spoils it as the
test asks (``mode``, read from a file on every call). The real LossClient and AsyncLossClient must
raise a lossd error naming what is wrong (a wrong shape, dtype or length, a missing or unrequested
field, a foreign id, a failed part of a split request), never return a wrong result or raise a bare
ValueError / KeyError / IndexError; server text in messages is cut; evaluate_many with
``return_exceptions`` goes on past a malformed answer, and refuses an id answered twice.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from lossd_client._proto.lossd.v1 import loss_pb2 as pb

SERVICE = "lossd.v1.LossService"
TIMEOUT_S = 30
#: Class of the first target of the part the fake server fails or spoils ("the second part"):
#: the tests' targets are 0 except at the first row of their second half.
MARKED = 1


# --------------------------------------------------------------------------- the fake server (child process)
def _tensor(dtype: int, shape: list[int], fill: float = 0.5) -> Any:
    n = math.prod(shape)
    kind = {pb.FLOAT32: "<f4", pb.FLOAT64: "<f8", pb.INT64: "<i8", pb.BOOL: "u1"}[dtype]
    return pb.Tensor(dtype=dtype, shape=shape, data=np.full(n, fill).astype(kind).tobytes())


def _answer(rid: str, options: Any, target_shape: list[int]) -> Any:
    """A well-formed answer to a float32 class-index request whose 'none' losses are shaped like its target."""
    r = pb.EvaluateResponse(id=rid, loss_sum=1.0, weight_sum=2.0, counted=2)
    r.loss.CopyFrom(_tensor(pb.FLOAT32, list(target_shape) if options.reduction == pb.NONE else []))
    names = {pb.TARGET_LOGPROB: "target_logprob", pb.ENTROPY: "entropy", pb.TARGET_RANK: "target_rank", pb.ARGMAX_CORRECT: "argmax_correct"}
    dtypes = {pb.TARGET_RANK: pb.INT64, pb.ARGMAX_CORRECT: pb.BOOL}
    for extra in options.extras:
        r.extras[names[extra]].CopyFrom(_tensor(dtypes.get(extra, pb.FLOAT32), list(target_shape), fill=-0.5))
    if options.sequence_stats:
        count = math.prod(target_shape[:-1])
        s = r.sequences
        s.nll_sum[:], s.tokens[:], s.mean_nll[:], s.perplexity[:], s.is_greedy[:] = ([v] * count for v in (1.0, 2, 0.5, 1.6, True))
    return r


def _spoiled(r: Any, mode: str) -> Any:
    """``r`` spoiled as ``mode`` says (a name of the defect)."""
    if mode == "loss_shape_1000":
        r.loss.CopyFrom(_tensor(pb.FLOAT32, [1000]))
    elif mode == "loss_float64":
        r.loss.CopyFrom(_tensor(pb.FLOAT64, list(r.loss.shape)))
    elif mode == "loss_0d":
        r.loss.CopyFrom(_tensor(pb.FLOAT32, []))
    elif mode == "loss_missing":
        r.ClearField("loss")
    elif mode == "loss_3_bytes":
        r.loss.data = b"\1\2\3"
    elif mode == "loss_shape_0_-1":
        r.loss.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[0, -1]))
    elif mode == "loss_shape_2**40":
        r.loss.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[2**40], data=bytes(4)))
    elif mode == "extra_unasked":
        r.extras["bogus"].CopyFrom(_tensor(pb.FLOAT32, [3]))
    elif mode == "extras_missing":
        r.ClearField("extras")
    elif mode == "logprob_one_row":
        shape = list(r.extras["target_logprob"].shape)
        r.extras["target_logprob"].CopyFrom(_tensor(pb.FLOAT32, [1, shape[-1]]))
    elif mode == "sequences_5":
        r.sequences.nll_sum[:] = [1.0] * 5
    elif mode == "sequences_missing":
        r.ClearField("sequences")
    elif mode == "id_evil":
        r.id = "evil"
    elif mode == "id_1MB":
        r.id = "x" * (1 << 20)
    elif mode.startswith("error_"):  # error_<code>[_long]
        code = int(mode.split("_")[1])
        r = pb.EvaluateResponse(id=r.id, error=pb.ItemError(code=code, message="m" * 100_000 if mode.endswith("_long") else "part failed"))
    elif mode != "good":
        raise ValueError(f"unknown mode {mode}")
    return r


class FakeLossd:
    """The fake server's handlers: a well-formed answer to each request, spoiled as the mode file says."""

    def __init__(self, mode_file: str) -> None:
        self.mode_file = mode_file

    def mode(self) -> dict[str, str]:
        with open(self.mode_file) as f:
            return json.load(f)

    async def evaluate(self, data: bytes, context: Any) -> bytes:
        q = pb.EvaluateRequest.FromString(data)
        return _spoiled(_answer(q.id, q.options, list(q.target.shape)), self.mode()["evaluate"]).SerializeToString()

    async def evaluate_chunked(self, chunks: Any, context: Any) -> bytes:
        """A part's answer, spoiled as ``part`` says for the part whose target starts with MARKED."""
        header = None
        async for data in chunks:
            header = header or pb.EvaluateChunk.FromString(data).header
        r = _answer(header.id, header.options, list(header.target.shape))
        marked = np.frombuffer(header.target.data[:8], "<i8")[0] == MARKED
        return _spoiled(r, self.mode()["part"] if marked else self.mode().get("other_parts", "good")).SerializeToString()

    def many(self, requests: list[Any]) -> list[Any]:
        """evaluate_many's answers, item "1"'s spoiled (or answered twice, before item 0's)."""
        out, spoil = [], self.mode()["many"]
        for q in requests:
            r = _answer(q.id, q.options, list(q.target.shape))
            if spoil == "duplicate" and q.id in ("0", "1"):  # item 1 answered twice (loss_sum 111, then 222) before item 0
                if q.id == "0":
                    out += [pb.EvaluateResponse(id="1", loss=r.loss, loss_sum=total, weight_sum=1.0, counted=1) for total in (111.0, 222.0)]
                    out.append(r)
                continue
            if q.id == "1" and spoil == "unknown_1MB_id":
                r.id = "y" * (1 << 20)
            elif q.id == "1":
                r = _spoiled(r, spoil)
            out.append(r)
        return out

    async def packed(self, messages: Any, context: Any) -> Any:
        async for data in messages:
            yield pb.EvaluateBatchResults(responses=self.many(list(pb.EvaluateBatch.FromString(data).requests))).SerializeToString()

    async def stream(self, messages: Any, context: Any) -> Any:
        async for data in messages:
            for r in self.many([pb.EvaluateRequest.FromString(data)]):
                yield r.SerializeToString()

    async def server_info(self, data: bytes, context: Any) -> bytes:
        return pb.ServerInfo(
            version="fake", max_receive_message_bytes=4 << 20, max_send_message_bytes=4 << 20, max_top_k=16
        ).SerializeToString()

    async def compare(self, data: bytes, context: Any) -> bytes:
        q = pb.CompareRequest.FromString(data)
        shape = list(q.reference.shape[:-1])
        r = pb.CompareResponse(id=q.id)
        for name in ("kl", "p_ref", "p_cand", "delta_p", "nll_ref", "nll_cand")[: 6 if q.HasField("target") else 1]:
            getattr(r, name).CopyFrom(_tensor(pb.FLOAT32, shape, fill=0.25))
        r.argmax_agree.CopyFrom(_tensor(pb.BOOL, shape, fill=1))
        r.counted.CopyFrom(_tensor(pb.BOOL, shape, fill=1))
        spoil = self.mode()["compare"]
        if spoil == "dense_shape_1":  # every dense output one element
            for field, value in r.ListFields():
                if field.message_type is pb.Tensor.DESCRIPTOR:
                    value.data = value.data[: len(value.data) // math.prod(shape)]
                    value.shape[:] = [1]
        elif spoil == "kl_missing":
            r.ClearField("kl")
        return r.SerializeToString()

    def handlers(self) -> Any:
        def raw(kind: Callable[..., Any], behaviour: Callable[..., Any]) -> Any:
            return kind(behaviour, request_deserializer=None, response_serializer=None)

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Evaluate": raw(grpc.unary_unary_rpc_method_handler, self.evaluate),
                "EvaluateChunked": raw(grpc.stream_unary_rpc_method_handler, self.evaluate_chunked),
                "EvaluatePacked": raw(grpc.stream_stream_rpc_method_handler, self.packed),
                "EvaluateStream": raw(grpc.stream_stream_rpc_method_handler, self.stream),
                "GetServerInfo": raw(grpc.unary_unary_rpc_method_handler, self.server_info),
                "Compare": raw(grpc.unary_unary_rpc_method_handler, self.compare),
            },
        )


async def _serve(mode_file: str, port: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    server.add_generic_rpc_handlers((FakeLossd(mode_file).handlers(),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on 127.0.0.1:{bound}\nSERVING", flush=True)  # what serverproc.start_server waits for
    await server.wait_for_termination()


if __name__ == "__main__":  # the fake server: this file --mode-file PATH --host 127.0.0.1 --port 0 ...
    asyncio.run(_serve(sys.argv[2], sys.argv[sys.argv.index("--port") + 1]))
    sys.exit(0)


# --------------------------------------------------------------------------- the tests
from lossd_client import AsyncLossClient, LossClient, LossRequest  # noqa: E402
from lossd_client.errors import InternalError, LossdError  # noqa: E402
from serverproc import start_server  # noqa: E402


class Fake:
    """The fake server's process and how it answers next (``set``)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.mode_file = tmp_path_factory.mktemp("fake") / "mode.json"
        self.set()
        self.server = start_server(program=(__file__, "--mode-file", str(self.mode_file)))
        self.address = self.server.address

    def set(self, **mode: str) -> None:
        defaults = {"evaluate": "good", "part": "good", "many": "good", "compare": "good"}
        self.mode_file.write_text(json.dumps({**defaults, **mode}))


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Fake:
    server = Fake(tmp_path_factory)
    yield server
    server.server.stop()  # by its PID: SIGTERM, then SIGKILL


def both(fake: Fake, use: Callable[[Any], Any], **options: Any) -> list[Any]:
    """``use(client)``'s outcome (its result or its exception) with a LossClient and (awaited) with
    an AsyncLossClient; an iterator's items are collected (an exception raised among them ends the list)."""

    def collect(items: Any) -> Any:
        out = []
        try:
            for item in items:
                out.append(item)
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            out.append(exc)
        return out

    outcomes = []
    with LossClient(fake.address, timeout_s=TIMEOUT_S, **options) as client:
        try:
            got = use(client)
            outcomes.append(collect(got) if hasattr(got, "__next__") else got)
        except Exception as exc:  # noqa: BLE001
            outcomes.append(exc)

    async def main() -> Any:
        async with AsyncLossClient(fake.address, timeout_s=TIMEOUT_S, **options) as client:
            got = use(client)
            if hasattr(got, "__aiter__"):
                out = []
                try:
                    async for item in got:
                        out.append(item)
                except Exception as exc:  # noqa: BLE001
                    out.append(exc)
                return out
            try:
                return await got
            except Exception as exc:  # noqa: BLE001
                return exc

    outcomes.append(asyncio.run(main()))
    return outcomes


def assert_malformed(outcomes: list[Any], text: str) -> None:
    """Both clients raised InternalError saying ``text`` of the server's answer."""
    for outcome in outcomes:
        assert isinstance(outcome, InternalError), outcome
        assert outcome.code == grpc.StatusCode.INTERNAL and str(outcome).startswith("the server's answer: " + text), str(outcome)


def ce(rows: int = 4, classes: int = 8, **options: Any) -> LossRequest:
    rng = np.random.default_rng(0)
    return LossRequest(rng.standard_normal((rows, classes), dtype=np.float32), rng.integers(0, classes, rows), **options)


def split_request(**options: Any) -> LossRequest:
    """64 rows (8 KB): cut into two parts of 32 rows by a client with chunked_above_bytes=1024 and
    connections=2; the second part's target starts with MARKED."""
    target = np.zeros(64, np.int64)
    target[32] = MARKED
    return LossRequest(np.zeros((64, 31), np.float32), target, **options)


def lm_split_request(**options: Any) -> LossRequest:
    """(B=4, T=8, V=32) logits (4 KB) and tokens, cut into two parts of two sequences."""
    tokens = np.zeros((4, 8), np.int64)
    tokens[2, 0] = MARKED
    return LossRequest(np.zeros((4, 8, 32), np.float32), tokens, class_axis=-1, **options)


SPLIT = {"connections": 2, "chunked_above_bytes": 1024}


# finding 1: a failed part of a split request failed the request silently (half the totals returned)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("others", ["good", "error_13"])
def test_a_failed_part_of_a_split_request_raises_its_error(fake: Fake, reduction: str, others: str) -> None:
    fake.set(part="error_13", other_parts=others)
    outcomes = both(fake, lambda c: c.evaluate(split_request(reduction=reduction)), **SPLIT)
    for outcome in outcomes:
        assert isinstance(outcome, InternalError) and str(outcome) == "part failed", repr(outcome)


# finding 2: answers that do not fit the request were returned as results
@pytest.mark.parametrize(
    ("mode", "request_", "text"),
    [
        ("loss_shape_1000", ce(), "loss has shape [1000], the request implies [] (reduction='mean')"),
        ("loss_float64", ce(reduction="sum"), "loss has dtype float64, the request implies float32"),
        (
            "loss_0d",
            ce(reduction="none"),
            "loss has shape [], the request implies [4] (reduction='none': the input's shape without its class axis)",
        ),
        ("extra_unasked", ce(), "extras has 'bogus', which the request does not ask for"),
    ],
    ids=["mean-as-1000", "float64-for-float32", "none-as-0d", "unasked-extra"],
)
def test_an_answer_of_another_shape_or_dtype_is_refused_naming_the_field(fake: Fake, mode: str, request_: LossRequest, text: str) -> None:
    fake.set()  # the fake server's own answer is a result
    assert all(r.loss.shape == (4,) for r in both(fake, lambda c: c.evaluate(ce(reduction="none"))))
    fake.set(evaluate=mode)
    assert_malformed(both(fake, lambda c: c.evaluate(request_)), text)


def test_perplexity_and_loglikelihood_refuse_values_they_would_broadcast_or_miscount(fake: Fake) -> None:
    logits, tokens = np.zeros((2, 5, 8), np.float32), np.ones((2, 5), np.int64)
    fake.set(evaluate="logprob_one_row")
    assert_malformed(
        both(fake, lambda c: c.perplexity(logits, tokens)), "extras['target_logprob'] has shape [1, 5], the request implies [2, 5]"
    )
    fake.set(evaluate="sequences_5")
    assert_malformed(both(fake, lambda c: c.loglikelihood(logits, tokens, 2)), "sequences.nll_sum has 5 values, the request implies 2")


def test_a_comparison_whose_outputs_are_not_shaped_like_the_tokens_is_refused(fake: Fake) -> None:
    rng = np.random.default_rng(0)
    ref, cand = rng.standard_normal((2, 5, 8), dtype=np.float32), rng.standard_normal((2, 5, 8), dtype=np.float32)
    fake.set(compare="dense_shape_1")
    assert_malformed(both(fake, lambda c: c.compare(ref, cand, np.ones((2, 5), np.int64))), "kl has shape [1], the request implies [2, 5]")


@pytest.mark.parametrize(
    ("mode", "request_", "text"),
    [
        ("loss_shape_1000", split_request(reduction="none"), "loss has shape [1000], the request implies [32]"),
        ("loss_float64", split_request(), "loss has dtype float64, the request implies float32"),
        (
            "sequences_missing",
            lm_split_request(sequence_stats=True),
            "sequences are missing, the request asks for sequence_stats (2 sequences)",
        ),
    ],
    ids=["part-rows", "part-dtype", "part-sequences"],
)
def test_a_part_that_does_not_fit_its_part_of_a_split_request_is_refused(fake: Fake, mode: str, request_: LossRequest, text: str) -> None:
    fake.set()  # the fake server's own answers are joined: what it spoils below is all that is refused
    request_none = lm_split_request(sequence_stats=True, extras="entropy", reduction="none")
    for joined in both(fake, lambda c: c.evaluate(request_none), **SPLIT):
        assert joined.loss.shape == joined.extras["entropy"].shape == (4, 8) and joined.sequences.nll_sum.shape == (4,), joined
    fake.set(part=mode)
    assert_malformed(both(fake, lambda c: c.evaluate(request_), **SPLIT), text)


# finding 3: malformed answers raised ValueError, TypeError, KeyError, RuntimeError, ... instead of a lossd error
@pytest.mark.parametrize(
    ("mode", "text"),
    [
        ("loss_missing", "loss is missing"),
        ("loss_3_bytes", "loss has 3 bytes of data, its shape [] of float32 holds 4"),
        ("loss_shape_0_-1", "loss has shape [0, -1], the request implies []"),
    ],
)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_an_answer_that_cannot_be_decoded_is_a_lossd_error(fake: Fake, mode: str, text: str, kind: str) -> None:
    request_ = ce()
    if kind == "torch":
        torch = pytest.importorskip("torch")
        request_ = LossRequest(torch.from_numpy(request_.input), torch.from_numpy(request_.target))
    fake.set(evaluate=mode)
    assert_malformed(both(fake, lambda c: c.evaluate(request_)), text)


def test_missing_fields_of_the_helpers_answers_are_lossd_errors(fake: Fake) -> None:
    logits, tokens = np.zeros((2, 5, 8), np.float32), np.ones((2, 5), np.int64)
    fake.set(evaluate="extras_missing")
    assert_malformed(both(fake, lambda c: c.perplexity(logits, tokens)), "extras['target_logprob'] is missing, the request asks for it")
    fake.set(evaluate="sequences_missing")
    assert_malformed(both(fake, lambda c: c.loglikelihood(logits, tokens, 2)), "sequences are missing")
    fake.set(compare="kl_missing")
    assert_malformed(both(fake, lambda c: c.compare(logits, logits)), "kl is missing")


# finding 4: evaluate_many(return_exceptions=True) stopped at one malformed answer
@pytest.mark.parametrize("pack", [None, 1])
def test_a_malformed_answer_of_one_item_is_its_error_and_the_others_are_answered(fake: Fake, pack: int | None) -> None:
    fake.set(many="loss_shape_2**40")
    for outcome in both(fake, lambda c: c.evaluate_many([ce() for _ in range(8)], pack=pack, return_exceptions=True)):
        assert len(outcome) == 8, outcome
        assert isinstance(outcome[1], InternalError) and str(outcome[1]).startswith("the server's answer: loss has shape [1099511627776]")
        assert all(r.loss.shape == () and r.loss_sum == 1.0 for i, r in enumerate(outcome) if i != 1), outcome


# findings 8 and 12: the answer's id is the request's; server text in messages is cut
def test_an_answer_with_another_id_is_refused(fake: Fake) -> None:
    fake.set(evaluate="id_evil")
    assert_malformed(both(fake, lambda c: c.evaluate(ce(id="mine"))), "id is 'evil', the request's is 'mine'")


def test_a_huge_id_or_error_message_is_cut_in_the_exception(fake: Fake) -> None:
    fake.set(evaluate="id_1MB")
    outcomes = both(fake, lambda c: c.evaluate(ce()))
    assert_malformed(outcomes, "id is 'xxx")
    assert all(len(str(o)) < 500 and str(o).endswith("(1048576 characters in all), the request's is ''") for o in outcomes)
    fake.set(many="unknown_1MB_id")
    for outcome in both(fake, lambda c: c.evaluate_many([ce() for _ in range(4)])):
        error = outcome[-1]
        assert isinstance(error, LossdError) and len(str(error)) < 500 and str(error).startswith("answer for unknown id 'yyy"), error
    fake.set(evaluate="error_13_long")
    for outcome in both(fake, lambda c: c.evaluate(ce())):
        assert isinstance(outcome, InternalError) and len(str(outcome)) < 5000 and str(outcome).endswith("(100000 characters in all)")


# finding 9: an id answered twice was taken silently, the last answer winning
@pytest.mark.parametrize("pack", [None, 1])
def test_an_id_answered_twice_is_an_error(fake: Fake, pack: int | None) -> None:
    fake.set(many="duplicate")
    for outcome in both(fake, lambda c: c.evaluate_many([ce() for _ in range(4)], pack=pack, return_exceptions=True)):
        assert all(getattr(r, "loss_sum", None) != 222.0 for r in outcome), outcome
        assert isinstance(outcome[-1], InternalError) and str(outcome[-1]) == "the server's answer: a second answer for id '1'", outcome


# finding 13: an item error with code 0 (OK) was an error carrying code OK
def test_an_item_error_with_code_ok_or_an_unknown_code_is_a_non_ok_error(fake: Fake) -> None:
    fake.set(evaluate="error_0")
    for outcome in both(fake, lambda c: c.evaluate(ce())):
        assert isinstance(outcome, InternalError) and outcome.code == grpc.StatusCode.INTERNAL, repr(outcome)
        assert "code 0 (OK)" in str(outcome) and "'part failed'" in str(outcome)
    fake.set(evaluate="error_9999")
    for outcome in both(fake, lambda c: c.evaluate(ce())):
        assert isinstance(outcome, LossdError) and outcome.code not in (grpc.StatusCode.OK, None) and str(outcome) == "part failed"
