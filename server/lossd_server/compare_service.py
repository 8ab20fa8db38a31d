"""The Compare and CompareChunked RPCs: read (within the memory budget) -> decode -> compute -> answer.

No comparison maths here (:mod:`.engine.comparison`), no wire parsing (:mod:`.wire`,
:mod:`.compare_convert`). Both RPCs run on the :class:`~lossd_server.service.LossServicer`'s
machinery: its one error-mapping path (``_rpc``: every failure is answered with its status,
INVALID_ARGUMENT naming the field for bad input), its memory budget (every message is read with
:meth:`~lossd_server.calls.Call.read`, so its bytes are reserved before gRPC hands them over; the
answer's size is reserved, and checked against ``max_send_message_bytes``, before anything is
computed) and, for CompareChunked, its chunk loop (``_stream_chunks``: at most
``max_chunks_in_flight`` chunks held, the idle timeout, the call's checkpoint between row ranges).
A comparison is computed on its own (on the event loop when it is small CPU work, else on an
engine thread), never batched with other requests.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import grpc
from lossd_client._proto.lossd.v1 import loss_pb2 as pb

from . import answers, codec, compare_convert, convert, engine, service, wire
from .budget import Reservation
from .calls import Call
from .compare_chunks import COMPARE_COST, CompareAssembler
from .engine import comparison
from .errors import RequestError

if TYPE_CHECKING:
    from .service import LossServicer


def _within(size: int, limit: int, what: str, setting: str, advice: str) -> int:
    """``size``, or RESOURCE_EXHAUSTED naming the setting it exceeds."""
    if size > limit:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what} takes {size} bytes, over this server's {setting} ({limit}); {advice}"
        )
    return size


def _answer_size(plan: comparison.ComparisonPlan, limit: int, id_nbytes: int) -> int:
    """The answer's size bound, its echoed id of ``id_nbytes`` included."""
    advice = "compare fewer positions per request, or ask for a smaller top_k"
    return _within(plan.answer_nbytes() + id_nbytes, limit, "the answer", "max_send_message_bytes", advice)


async def _first(call: Call, kind: str, field: str, missing: str) -> tuple[object, Reservation]:
    """The call's first message (unchecked) and its reservation; InvalidInput naming ``field`` when there is none."""
    got = await call.read(kind)
    if got is None:
        raise engine.InvalidInput(field, missing)
    return got


def _message(received: object):
    if isinstance(received, wire.Malformed):
        raise engine.InvalidInput("request", f"not a valid {received.kind} message: {received.error}")
    return received


class CompareRpcs:
    """Compare and CompareChunked, served with a LossServicer's budget, batcher and error mapping."""

    def __init__(self, servicer: LossServicer) -> None:
        self.servicer = servicer
        self.config = servicer.config

    # ---------------------------------------------------------------- Compare
    async def Compare(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.CompareResponse:
        return await self.servicer._rpc(context, "Compare", self._compare)

    async def _compare(self, call: Call) -> pb.CompareResponse:
        message, held = await _first(call, "CompareRequest", "request", "the call carried no CompareRequest message")
        try:
            response = await self._answer(call, _message(message), held)
            call.answered(held, held.nbytes)
            return response
        finally:
            held.release()

    async def _answer(self, call: Call, request: wire.WireCompareRequest, held: Reservation) -> pb.CompareResponse:
        """Decode, validate, reserve what the answer needs, compute; ``held`` then covers the answer."""
        cfg, servicer = self.config, self.servicer
        id_bytes = service.check_id("id", request.id, cfg.max_id_bytes)
        tensors = compare_convert.tensors(request)
        shm_bytes = codec.shm_nbytes({name: getattr(request, name) for name in ("reference", "candidate", "target")})
        if shm_bytes:
            held.resize(held.nbytes + shm_bytes, "shared-memory tensors")
        advice = "send comparisons this large with the client-streaming CompareChunked RPC, which lossd_client does by itself"
        size = id_bytes + sum(len(t.data) for t in tensors)
        nbytes = _within(size, cfg.max_message_bytes, "the request (its tensors and id)", "max_message_bytes", advice) - id_bytes
        decoding = convert.target_decode_nbytes(request.target, request.options.shift_targets)
        if decoding:  # the targets' int64 copy and masks, reserved before they are made (as Evaluate's)
            await held.grow(held.nbytes + decoding, "decoding the class-index targets", timeout_s=call.memory_wait_left_s())
        decode = functools.partial(compare_convert.decode_request, request, cfg.max_top_k, servicer.shm_reader)
        decoded = await held.run_in_thread(decode) if shm_bytes else decode()  # copying shared memory takes a while
        plan = decoded.plan
        answer = _answer_size(plan, cfg.max_send_message_bytes, id_bytes)
        await held.grow(
            held.nbytes + max(0, plan.plan_nbytes() - decoding) + plan.working_nbytes() + answers.ANSWER_COPIES * answer,
            "the comparison and its answer",
            timeout_s=call.memory_wait_left_s(),
        )
        work = functools.partial(
            plan.evaluate,
            decoded.reference,
            decoded.candidate,
            device=servicer.device,
            chunk_bytes=cfg.chunk_bytes,
            checkpoint=call.checkpoint,
        )
        del decoded
        result = await held.kept_until_done(servicer.batcher.compute_soon(work, COMPARE_COST * (nbytes + shm_bytes)))
        del work
        response = await answers.encode_answer(
            compare_convert.ANSWER, request.id, result, answer, cfg.inline_batch_bytes, held, call.checkpoint
        )
        held.resize(answers.ANSWER_COPIES * answer, "the answer")
        return response

    # ---------------------------------------------------------------- CompareChunked
    async def CompareChunked(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.CompareResponse:
        return await self.servicer._rpc(context, "CompareChunked", self._compare_chunked)

    async def _compare_chunked(self, call: Call) -> pb.CompareResponse:
        first, header_held = await _first(call, "CompareChunk", "header", "CompareChunked received no messages")
        try:
            assembler = await self._open(call, _message(first), header_held)
            parts = await self.servicer._stream_chunks(call, assembler, first, "CompareChunk")
            del first
            assembler.check_complete()
            result = await self.servicer.batcher.run_in_engine(assembler.finish, parts, held=header_held)
            parts.clear()
            answer = assembler.plan.answer_nbytes() + len(assembler.id.encode())
            response = await answers.encode_answer(
                compare_convert.ANSWER, assembler.id, result, answer, self.config.inline_batch_bytes, header_held, call.checkpoint
            )
            call.answered(header_held, answers.ANSWER_COPIES * answer)
            return response
        finally:
            header_held.release()

    async def _open(self, call: Call, first: wire.WireCompareChunk, held: Reservation) -> CompareAssembler:
        """Validate the header into an assembler; reserve its target, what the plan holds and what
        the answer needs (the first message's rows, if any, stay counted in its reservation),
        which the call keeps while it reads its chunks (Call.hold: refused when it leaves no room
        for one)."""
        if first.header is None:
            raise engine.InvalidInput("header", "the first CompareChunk must carry the header")
        id_bytes = service.check_id("header.id", first.header.id, self.config.max_id_bytes)
        decoding = convert.target_decode_nbytes(first.header.target, first.header.options.shift_targets)
        if decoding:
            await call.hold(held, held.nbytes + decoding, "decoding the header's class-index targets", "CompareChunk")
        shm = codec.shm_nbytes({"header.target": first.header.target})
        if shm:
            await call.hold(held, held.nbytes + shm, "a shared-memory header target", "CompareChunk")
        assembler = CompareAssembler(first.header, self.servicer.shm_reader, max_top_k=self.config.max_top_k)
        plan = assembler.plan
        answer = _answer_size(plan, self.config.max_send_message_bytes, id_bytes)
        extra = max(0, plan.plan_nbytes() - decoding) + plan.working_nbytes() + answers.ANSWER_COPIES * answer
        await call.hold(held, held.nbytes + extra, "the comparison header and its answer", "CompareChunk")
        return assembler


def handlers(servicer: LossServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The Compare RPCs' handlers, for :func:`lossd_server.service.add_to_server`. Both read their
    messages themselves (Call.read), so the unary Compare is registered as client-streaming too."""
    rpcs = CompareRpcs(servicer)
    answer = answers.serializer(pb.CompareResponse)
    return {
        "Compare": grpc.stream_unary_rpc_method_handler(
            rpcs.Compare, wire.deserializer(pb.CompareRequest, servicer.config.max_id_bytes), answer
        ),
        "CompareChunked": grpc.stream_unary_rpc_method_handler(
            rpcs.CompareChunked, wire.deserializer(pb.CompareChunk, servicer.config.max_id_bytes), answer
        ),
    }
