"""Thin gRPC servicer: read (within the memory budget) -> decode -> batcher -> answer.

No loss maths here. Every RPC runs through :meth:`LossServicer._rpc`: a :class:`~.calls.Call`
for its reading (budget, idle timeout, liveness), one error mapping (:mod:`.errors`) answered
with ``set_code``/``set_details`` rather than ``context.abort`` (whose stored exception and
traceback kept failed requests' bytes alive until the cycle collector ran), and the
:class:`~.calls.CallTracker` the drain waits on. ``Evaluate`` is registered as a
client-streaming handler (the wire is the same) so that its one message is read within the
budget too. Streams (EvaluateStream, EvaluatePacked) are served with flow control by
:func:`~.calls.serve_stream`; EvaluateChunked feeds a :class:`~.chunks.ChunkAssembler`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

import grpc
import torch
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc

from . import __version__, batch_engine, codec, compare_service, convert, endings, engine, unary_reads, wire
from .answers import ANSWER_COPIES, encode_answer, serializer
from .batcher import Batcher
from .budget import MemoryBudget, Reservation
from .calls import Call, CallTracker, Reads, serve_stream
from .chunks import ChunkAssembler
from .config import ServerConfig
from .errors import OversizedId, RequestError, drop_tracebacks, status_of
from .packed import PackedMessages, item_failed


def check_id(field: str, request_id: str, max_id_bytes: int) -> int:
    """The id's UTF-8 bytes, which its answer echoes; OversizedId naming ``field`` when they are
    over --max-id-bytes (a long id is measured without a copy: each character is a byte or more;
    one the deserializer left undecoded, a wire.LongText, by its size on the wire)."""
    if isinstance(request_id, wire.LongText):
        nbytes, exact = request_id.nbytes, True
    else:
        nbytes, exact = len(request_id), request_id.isascii()
    if not exact and nbytes <= max_id_bytes:
        nbytes, exact = len(request_id.encode()), True
    if nbytes > max_id_bytes:
        size = f"{nbytes} bytes" if exact else f"at least {nbytes} bytes"
        raise OversizedId(
            field,
            f"takes {size} (UTF-8), over this server's max_id_bytes ({max_id_bytes}); the id is echoed in the answer: use a shorter one",
        )
    return nbytes


def check_message_size(request: wire.WireRequest, max_message_bytes: int, id_nbytes: int = 0) -> int:
    """RESOURCE_EXHAUSTED for a unary request whose inline tensors (class weights included) and id
    (``id_nbytes``) exceed --max-message-bytes (before anything is decoded); else their size."""
    size = id_nbytes + sum(len(t.data) for t in (request.input, request.target) if t is not None)
    options = request.options
    if options.HasField("weight") or options.HasField("pos_weight"):
        size += options.ByteSize()  # the weights' bytes, counted without copying them out of protobuf
    if size > max_message_bytes:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request tensors and id take {size} bytes, over this server's max_message_bytes ({max_message_bytes}); "
            "send requests this large with the client-streaming EvaluateChunked RPC (a ChunkHeader, then row chunks "
            "of at most max_message_bytes each), which lossd_client does by itself",
        )
    return size


def check_answer_size(plan: engine.Plan, max_send_message_bytes: int, id_nbytes: int = 0) -> int:
    """The answer's size bound (its echoed id of ``id_nbytes`` included); RESOURCE_EXHAUSTED before
    any compute when it cannot be sent."""
    size = plan.answer_nbytes() + id_nbytes
    if size > max_send_message_bytes:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the answer would take up to {size} bytes, over this server's max_send_message_bytes ({max_send_message_bytes}); "
            "ask for a reduction other than 'none' or fewer extras, or split the request",
        )
    return size


def check_broadcast(plan: engine.Plan | engine.KlDivLossPlan, max_broadcast_elements: int) -> None:
    """RESOURCE_EXHAUSTED before any compute for a request whose broadcast output has more than
    --max-broadcast-elements elements and more than its larger operand (kl_div's [2**20, 1]
    against [1, 2**20]: 1.1e12 elements of the engine thread's time from 8 MiB)."""
    elements = plan.broadcast_elements
    if elements > max_broadcast_elements:
        shapes = f"the input {list(plan.call.input_shape)} against the target {list(plan.call.target_shape)}"
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{plan.spec.loss}'s broadcast of {shapes} makes {elements} elements, over this server's max_broadcast_elements "
            f"({max_broadcast_elements}); send fewer rows per request (lossd_client.combine joins their results exactly)",
        )


def call_over(call: Call, context: grpc.aio.ServicerContext, exc: BaseException) -> RequestError | None:
    """The status of a call that failed because it was already over (:func:`.endings.over_status`,
    the rule the metrics count by too). Past its deadline, gRPC ends its reads (an end of stream:
    "no message", "0 of N rows") and refuses its writes, and the client sees DEADLINE_EXCEEDED
    whatever the handler says; so does the server's status (metrics, logs), and a write refused
    after a cancel is CANCELLED, not INTERNAL. (A client's cancel reaches a waiting read as a plain
    end of stream before gRPC cancels the handler: see endings.CANCEL_SETTLE_S.)"""
    code = endings.over_status(_left_s(call), context.cancelled())
    if code is None:
        return None
    drop_tracebacks(exc)
    return RequestError(code, endings.OVER_DETAILS[code])


async def _answer_failure(call: Call, context: grpc.aio.ServicerContext, exc: Exception, what: str) -> None:
    """Set the status of a call whose handler failed with ``exc``."""
    if call.read_end:
        # a client's cancel reaches a waiting read as an end of stream a moment before gRPC
        # cancels this handler: let it land, so that the call counts CANCELLED (or, near its
        # deadline, DEADLINE_EXCEEDED), not as the client's mistake (see endings)
        await asyncio.sleep(endings.failure_settle_s(_left_s(call)))
    err = call_over(call, context, exc) or status_of(exc, what)
    context.set_code(err.code)
    context.set_details(err.message)
    if err.trailing:
        context.set_trailing_metadata(err.trailing)


def _left_s(call: Call) -> float | None:
    """Seconds to the call's deadline (None: it has none)."""
    return None if call.deadline is None else call.deadline - time.monotonic()


def _message(received: object):
    if isinstance(received, wire.Malformed):
        raise _message_error(received)
    return received


class LossServicer(pb_grpc.LossServiceServicer):
    def __init__(
        self, config: ServerConfig, device: torch.device, batcher: Batcher, budget: MemoryBudget | None = None, shm_reader=None
    ) -> None:
        self.config = config
        self.device = device
        self.batcher = batcher
        self.budget = budget or MemoryBudget(config.memory_budget_bytes)
        self.shm_reader = shm_reader
        self.calls = CallTracker()
        self.reads = Reads.of(config, self.budget)
        self._packed = PackedMessages(self.budget, self.batcher, self._prepare, sole_call=lambda: self.calls.active == 1)

    # ---------------------------------------------------------------- one path for every RPC
    async def _rpc(self, context: grpc.aio.ServicerContext, what: str, body: Callable[[Call], Awaitable]):
        call = self.reads.call(context)
        self.calls.start(context)
        try:
            result = await body(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered with its status
            await _answer_failure(call, context, exc, what)
            result = None
        finally:
            call.alive = False
            self.calls.end()
        await self.calls.may_answer(call.deadline)  # held while the drain lets the calls gRPC received start
        return result

    # ---------------------------------------------------------------- evaluation of one request
    async def _prepare(self, request: wire.WireRequest, held: Reservation, wait_s: float | None = None) -> tuple[batch_engine.Job, int]:
        """Decode and validate; reserve what computing it and its answer need in ``held``, waiting in line for up to ``wait_s``
        when it does not fit now (None: at once or refused). Returns the batch engine job and the bytes its answer holds."""
        id_bytes = check_id("id", request.id, self.config.max_id_bytes)
        shm_bytes = _shm_nbytes(request)
        if shm_bytes:
            held.resize(held.nbytes + shm_bytes, "shared-memory tensors")
        size = check_message_size(request, self.config.max_message_bytes, id_bytes)
        decoding = convert.target_decode_nbytes(request.target, request.options.shift_targets, request.options.HasField("weight"))
        if decoding:  # the int64 copy of narrower class targets (8x a uint8 target) and their masks
            await _reserve(held, held.nbytes + decoding, "decoding the class-index targets", wait_s)
        if shm_bytes or size + decoding > self.config.inline_batch_bytes:
            # copying a shared-memory segment, validating millions of targets (2.4 ms of the event
            # loop per MB of request: 0.88 s with six 60 MB requests at once) go to a thread
            job = await held.run_in_thread(convert.decode_request, request, self.shm_reader)
        else:
            job = convert.decode_request(request, self.shm_reader)
        plan = job.plan
        check_broadcast(plan, self.config.max_broadcast_elements)
        answer = check_answer_size(plan, self.config.max_send_message_bytes, id_bytes)
        need = held.nbytes + plan.working_nbytes() + ANSWER_COPIES * answer
        await _reserve(held, need, "the request and its answer", wait_s)
        return job, ANSWER_COPIES * answer

    async def _evaluate(self, call: Call, request: wire.WireRequest, held: Reservation, *, wait: bool = False) -> pb.EvaluateResponse:
        """Decode, validate, reserve what the answer needs, compute; ``held`` then covers the answer.

        ``wait``: a unary call waits in line for its answer's bytes. A stream's item does not: its stream has already posted its next
        read, whose reservation it would wait behind (one 12 MB item on a 140 MiB budget waited max_memory_wait_s for itself)."""
        job, answer_bytes = await self._prepare(request, held, call.memory_wait_left_s() if wait else None)
        result = await self.batcher.submit(
            job.plan, job.input, job.target, deadline=call.deadline, sole_call=self.calls.active == 1, caller=call.context.peer
        )
        del job
        response = await encode_answer(
            convert.ANSWER, request.id, result, answer_bytes // ANSWER_COPIES, self.config.inline_batch_bytes, held, call.checkpoint
        )
        held.resize(answer_bytes, "the answer")
        return response

    async def Evaluate(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        async def body(call: Call) -> pb.EvaluateResponse:
            got = await call.read("EvaluateRequest")
            if got is None:
                raise engine.InvalidInput("request", "the call carried no EvaluateRequest message")
            message, held = got
            try:
                response = await self._evaluate(call, _message(message), held, wait=True)
                call.answered(held, held.nbytes)
                return response
            finally:
                held.release()

        return await self._rpc(context, "Evaluate", body)

    # ---------------------------------------------------------------- streams
    async def _answer_item(self, call: Call, request: wire.WireRequest, held: Reservation) -> pb.EvaluateResponse:
        """One stream item: its response, or its failure as an ItemError (never raises)."""
        try:
            return await self._evaluate(call, request, held)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported per item
            return item_failed(request, held, exc)

    def _stream_answer(self, call: Call, packed: bool):
        """The answer function of a stream: never raises, a malformed message is an item error."""

        async def answer(message: object, held: Reservation):
            try:
                if isinstance(message, wire.Malformed):
                    raise _message_error(message)
                if packed:
                    return await self._packed.answer(call, message, held)
                return await self._answer_item(call, message, held)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a stream must never wait for an answer that never comes
                err = status_of(exc, "stream message")
                del exc
                failed = convert.error_response("", err.code.value[0], err.message)
                return pb.EvaluateBatchResults(responses=[failed]) if packed else failed

        return answer

    async def EvaluateStream(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        """Answers each item as soon as it is computed; items are matched by id."""

        async def body(call: Call) -> None:
            await serve_stream(call, "EvaluateRequest", self.config.max_stream_in_flight, self._stream_answer(call, packed=False))

        await self._rpc(context, "EvaluateStream", body)

    async def EvaluatePacked(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        """EvaluateStream with several items per message; each message is answered as a whole."""

        async def body(call: Call) -> None:
            await serve_stream(call, "EvaluateBatch", self.config.max_stream_in_flight, self._stream_answer(call, packed=True))

        await self._rpc(context, "EvaluatePacked", body)

    # ---------------------------------------------------------------- chunked requests
    async def EvaluateChunked(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        return await self._rpc(context, "EvaluateChunked", self._evaluate_chunked)

    async def _evaluate_chunked(self, call: Call) -> pb.EvaluateResponse:
        got = await call.read("EvaluateChunk")
        if got is None:
            raise engine.InvalidInput("header", "EvaluateChunked received no messages")
        first, header_held = got
        try:
            assembler = await self._open_chunked(call, _message(first), header_held)
            partials = await self._stream_chunks(call, assembler, first)
            del first
            assembler.check_complete()
            result = await self.batcher.run_in_engine(assembler.finish, partials, held=header_held)
            partials.clear()
            answer = assembler.plan.answer_nbytes() + len(assembler.id.encode())
            response = await encode_answer(
                convert.ANSWER, assembler.id, result, answer, self.config.inline_batch_bytes, header_held, call.checkpoint
            )
            call.answered(header_held, ANSWER_COPIES * answer)
            return response
        finally:
            header_held.release()

    async def _open_chunked(self, call: Call, first: wire.WireChunk, header_held: Reservation) -> ChunkAssembler:
        """Validate the header into an assembler; reserve its target and what the answer needs
        (the first message's rows, if any, stay counted in the header's reservation), which the
        call keeps while it reads its chunks (Call.hold: refused when it leaves no room for one)."""
        if first.header is None:
            raise engine.InvalidInput("header", "the first EvaluateChunk must carry the header")
        id_bytes = check_id("header.id", first.header.id, self.config.max_id_bytes)
        target, options = first.header.target, first.header.options
        decoding = convert.target_decode_nbytes(target, options.shift_targets, options.HasField("weight"))
        if decoding:  # as a unary request's (see _prepare), reserved before they are made
            await call.hold(header_held, header_held.nbytes + decoding, "decoding the header's class-index targets", "EvaluateChunk")
        shm = codec.shm_nbytes(
            {"header.target": target, "header.options.weight": options.weight, "header.options.pos_weight": options.pos_weight}
        )
        if shm:  # reserved before they are copied
            await call.hold(header_held, header_held.nbytes + shm, "shared-memory header tensors", "EvaluateChunk")
        make = functools.partial(ChunkAssembler, first.header, self.shm_reader)
        off_loop = shm or decoding > self.config.inline_batch_bytes  # copying or converting many targets
        assembler = await header_held.run_in_thread(make) if off_loop else make()
        plan = assembler.plan
        check_broadcast(plan, self.config.max_broadcast_elements)
        answer = check_answer_size(plan, self.config.max_send_message_bytes, id_bytes)
        extra = plan.working_nbytes() + ANSWER_COPIES * answer
        await call.hold(header_held, header_held.nbytes + extra, "the chunk header and its answer", "EvaluateChunk")
        return assembler

    async def _stream_chunks(
        self, call: Call, assembler: ChunkAssembler, first: wire.WireChunk, what: str = "EvaluateChunk"
    ) -> list[engine.Partial]:
        """Read and evaluate the row chunks, at most max_chunks_in_flight held at once, in order
        (also CompareChunked's, whose assembler has the same interface)."""
        inflight: list[tuple[asyncio.Future, Reservation]] = []
        partials: list[engine.Partial] = []

        def schedule(message: wire.WireChunk, held: Reservation, first: bool = False) -> None:
            rows = assembler.rows(message, first=first)
            if rows is None:
                held.release()
                return
            work = self.batcher.compute_soon(
                lambda: assembler.evaluate(rows, device=self.device, chunk_bytes=self.config.chunk_bytes, checkpoint=call.checkpoint),
                assembler.work_nbytes(message),
            )
            # A computed chunk's bytes go back at once, not when its partial is collected: a call
            # waiting in line to read its next chunk must not hold chunks it is done with (32
            # calls doing so filled the budget and waited for each other: a deadlock).
            work.add_done_callback(lambda _: held.release())
            inflight.append((work, held))

        try:
            schedule(first, self.budget.empty(), first=True)
            while True:
                while len(inflight) >= self.config.max_chunks_in_flight:
                    partials.append(await _finished(inflight.pop(0)))
                got = await call.read(what)
                if got is None:
                    break
                try:
                    schedule(_message(got[0]), got[1])
                except BaseException:
                    got[1].release()
                    raise
                del got
            while inflight:
                partials.append(await _finished(inflight.pop(0)))
            return partials
        finally:
            for future, held in inflight:
                future.cancel()
                held.release()

    # ---------------------------------------------------------------- info
    async def GetServerInfo(self, request, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        cfg = self.config
        return pb.ServerInfo(
            version=__version__,
            torch_version=torch.__version__,
            device=str(self.device),
            device_name=device_name(self.device),
            max_receive_message_bytes=cfg.max_message_bytes,
            max_send_message_bytes=cfg.max_send_message_bytes,
            max_batch_rows=cfg.max_batch_rows,
            max_batch_bytes=cfg.max_batch_bytes,
            max_wait_ms=cfg.max_wait_ms,
            max_queue_requests=cfg.max_queue_requests,
            max_queue_bytes=cfg.max_queue_bytes,
            input_dtypes=convert.INPUT_DTYPES,
            target_dtypes=convert.TARGET_DTYPES,
            allow_client_shm=cfg.allow_client_shm,
            max_top_k=cfg.max_top_k,
            max_id_bytes=cfg.max_id_bytes,
            max_broadcast_elements=cfg.max_broadcast_elements,
        )


async def _finished(work: tuple[asyncio.Future, Reservation]) -> engine.Partial:
    """The partial of a scheduled chunk (its bytes were released when it was computed)."""
    future, held = work
    try:
        return await future
    finally:
        held.release()


def _message_error(message: wire.Malformed) -> engine.InvalidInput:
    if message.field is not None:
        return engine.InvalidInput(message.field, message.error)
    return engine.InvalidInput("request", f"not a valid {message.kind} message: {message.error}")


async def _reserve(held: Reservation, nbytes: int, what: str, wait_s: float | None) -> None:
    """``held`` grown to ``nbytes``: at once or refused (``wait_s`` None), else waiting in line up to ``wait_s``."""
    if wait_s is None:
        held.resize(nbytes, what)
    else:
        await held.grow(nbytes, what, timeout_s=wait_s)


def _shm_nbytes(request: wire.WireRequest) -> int:
    """Bytes the request's shared-memory references will copy into the server (class weights included)."""
    o = request.options
    weights = {f"options.{name}": getattr(o, name) for name in ("weight", "pos_weight") if o.HasField(name)}
    return codec.shm_nbytes({"input": request.input, "target": request.target, **weights})


def add_to_server(servicer: LossServicer, server: grpc.aio.Server) -> None:
    """Register the servicer. Every method reads its messages itself (see Call.read), so the
    unary Evaluate is registered as client-streaming: same wire, but the read waits for budget;
    GetServerInfo reads its (empty) request through :mod:`.unary_reads`, within the same budget."""
    max_id = servicer.config.max_id_bytes
    handlers = {
        "Evaluate": grpc.stream_unary_rpc_method_handler(
            servicer.Evaluate, wire.deserializer(pb.EvaluateRequest, max_id), serializer(pb.EvaluateResponse)
        ),
        "EvaluateStream": grpc.stream_stream_rpc_method_handler(
            servicer.EvaluateStream, wire.deserializer(pb.EvaluateRequest, max_id), serializer(pb.EvaluateResponse)
        ),
        "EvaluatePacked": grpc.stream_stream_rpc_method_handler(
            servicer.EvaluatePacked, wire.deserializer(pb.EvaluateBatch, max_id), serializer(pb.EvaluateBatchResults)
        ),
        "EvaluateChunked": grpc.stream_unary_rpc_method_handler(
            servicer.EvaluateChunked, wire.deserializer(pb.EvaluateChunk, max_id), serializer(pb.EvaluateResponse)
        ),
        "GetServerInfo": unary_reads.reading(
            grpc.unary_unary_rpc_method_handler(servicer.GetServerInfo, unary_reads.ignored, pb.ServerInfo.SerializeToString),
            "GetServerInfoRequest",
            servicer.reads,
            servicer.calls,
        ),
        **compare_service.handlers(servicer),  # Compare, CompareChunked
    }
    # registered methods (gRPC core queues each one's calls apart, see unary_reads.add_health)
    server.add_registered_method_handlers("lossd.v1.LossService", handlers)


def device_name(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CUDA device's name, or the CPU model ("model name" in /proc/cpuinfo; the machine type where there is none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"
