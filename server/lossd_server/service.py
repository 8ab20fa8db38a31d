"""Thin gRPC servicer: read (within the memory budget) -> decode -> batcher -> answer.

No loss maths here. Every RPC goes through the same steps:

* **Reading** (:class:`_Call`): a message is read only after the worst case of its size has
  been reserved from the :class:`~lossd_server.budget.MemoryBudget`: twice gRPC's receive limit,
  for the transport's buffer and its Python copy (until then the transport holds at most
  ``transport_window_bytes`` of the call); then the reservation shrinks to the real size and
  grows by what the answer will need. A caller that sends (or reads) nothing for
  ``stream_idle_timeout_s`` is answered DEADLINE_EXCEEDED. ``Evaluate`` is registered as a
  client-streaming handler (the wire is the same) so that its one message is read this way too.
* **Errors**: one mapping, :func:`classify`, for every RPC. Errors are answered with
  ``set_code``/``set_details`` rather than ``context.abort`` (whose stored exception and
  traceback kept failed requests' bytes alive until the cycle collector ran), and tracebacks
  are dropped before the handler returns.
* **Streams** (EvaluateStream, EvaluatePacked): at most ``max_stream_in_flight`` messages read
  and not yet answered per stream; past that the stream is not read (flow control), and answers
  wait to be sent with their bytes counted.
* **Drain** (:class:`CallTracker`): every call is counted from its first step to its last, so
  the server stops only when every call it received has been answered (see app.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import torch
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc

from . import __version__, codec, convert, engine, wire
from .batcher import Abandoned, Batcher, BatcherClosed, DeadlineExpired, QueueFull
from .budget import BudgetExceeded, MemoryBudget, Reservation
from .chunks import ChunkAssembler
from .config import ServerConfig

log = logging.getLogger("lossd.service")

#: Copies of an answer alive at once: the result tensors, the encoded message, gRPC's buffer.
ANSWER_COPIES = 3
#: Copies of a class-index target in a ChunkHeader: the message, the int64 view or copy, masks.
HEADER_TARGET_COPIES = 3


class RequestError(Exception):
    """A request that must be answered with ``code``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_message_size(request: wire.WireRequest, max_message_bytes: int) -> None:
    """RESOURCE_EXHAUSTED for a unary request whose inline tensors exceed --max-message-bytes
    (before anything is decoded)."""
    size = sum(len(t.data) for t in (request.input, request.target) if t is not None)
    if size > max_message_bytes:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request tensors take {size} bytes, over this server's max_message_bytes ({max_message_bytes}); "
            "send requests this large with the client-streaming EvaluateChunked RPC (a ChunkHeader, then row chunks "
            "of at most max_message_bytes each), which lossd_client does by itself",
        )


def check_answer_size(plan: engine.Plan, max_send_message_bytes: int) -> int:
    """The answer's size bound; RESOURCE_EXHAUSTED before any compute when it cannot be sent."""
    size = plan.answer_nbytes()
    if size > max_send_message_bytes:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the answer would take up to {size} bytes, over this server's max_send_message_bytes ({max_send_message_bytes}); "
            "ask for a reduction other than 'none' or fewer extras, or split the request",
        )
    return size


def classify(exc: BaseException) -> RequestError | None:
    """Map an exception to the status it must be answered with (None: a server bug)."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, (engine.InvalidInput, codec.TensorError)):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, (QueueFull, BudgetExceeded)):
        return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, (DeadlineExpired, StreamIdle)):
        return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline expired before compute")
    if isinstance(exc, BatcherClosed):
        return RequestError(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, Abandoned):
        return RequestError(grpc.StatusCode.CANCELLED, str(exc))
    return None


def status_of(exc: BaseException, what: str) -> RequestError:
    """classify(), logging server bugs as INTERNAL; drops the tracebacks so nothing they
    reference (request tensors, futures, frames) outlives the call."""
    err = classify(exc)
    if err is None:
        log.error("%s failed: %s: %s", what, type(exc).__name__, exc, exc_info=exc)
        err = RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    drop_tracebacks(exc)
    return err


def drop_tracebacks(exc: BaseException | None) -> None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


class StreamIdle(Exception):
    """The client sent (or read) nothing for stream_idle_timeout_s."""


class CallTracker:
    """Calls in progress, for the drain: the server stops once none is left."""

    def __init__(self) -> None:
        self.active = 0
        self.last_start = 0.0

    def start(self) -> None:
        self.active += 1
        self.last_start = time.monotonic()

    def end(self) -> None:
        self.active -= 1

    async def wait_quiet(self, deadline: float, quiet_s: float = 0.25, poll_s: float = 0.02) -> bool:
        """Until no call is in progress and none started for ``quiet_s`` (calls that gRPC's
        transport received are picked up by the idle event loop within that time), or
        ``deadline`` (time.monotonic()). True when quiet."""
        while time.monotonic() < deadline:
            if self.active == 0 and time.monotonic() - self.last_start >= quiet_s:
                return True
            await asyncio.sleep(poll_s)
        return self.active == 0


class _Call:
    """One RPC's reading, budget and liveness."""

    def __init__(self, servicer: LossServicer, context: grpc.aio.ServicerContext) -> None:
        self.servicer = servicer
        self.context = context
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic() + remaining
        self.alive = True
        self.last_activity = time.monotonic()

    def checkpoint(self) -> None:
        """For the engine between chunks: stop once the call is over or past its deadline."""
        if not self.alive or (self.deadline is not None and time.monotonic() >= self.deadline):
            raise Abandoned("the call ended or passed its deadline; evaluation stopped")

    def _wait_s(self) -> float:
        idle = self.servicer.config.stream_idle_timeout_s
        return idle if self.deadline is None else max(0.0, min(idle, self.deadline - time.monotonic()))

    async def read(self, what: str, waiting_for_us: Callable[[], bool] | None = None) -> tuple[object, Reservation] | None:
        """The next message with its bytes reserved; None at the end of the stream.

        ``waiting_for_us``: while it returns True the client may rightly send nothing (it waits
        for answers), so the idle timeout does not run.
        """
        servicer = self.servicer
        held = await servicer.budget.reserve(servicer.read_reservation, f"reading a {what} message", timeout_s=self._wait_s())
        try:
            received = await self._idle_bounded(self.context.read(), f"sent no {what} message", waiting_for_us)
            if received is grpc.aio.EOF:
                held.release()
                return None
            held.resize(received.nbytes, f"a {what} message")
        except BaseException:
            held.release()
            raise
        self.last_activity = time.monotonic()
        return received.message, held

    async def write(self, message) -> None:
        await self._idle_bounded(self.context.write(message), "read no answer")
        self.last_activity = time.monotonic()

    async def _idle_bounded(self, operation: Awaitable, doing: str, waiting_for_us: Callable[[], bool] | None = None):
        idle = self.servicer.config.stream_idle_timeout_s
        if waiting_for_us is None:
            try:
                async with asyncio.timeout(idle):
                    return await operation
            except TimeoutError:
                raise StreamIdle(f"the client {doing} for stream_idle_timeout_s={idle:g}s") from None
        task = asyncio.ensure_future(operation)
        try:
            while True:
                done, _ = await asyncio.wait((task,), timeout=max(0.01, self.last_activity + idle - time.monotonic()))
                if done:
                    return task.result()
                if waiting_for_us is not None and waiting_for_us():
                    self.last_activity = time.monotonic()
                elif time.monotonic() - self.last_activity >= idle:
                    raise StreamIdle(f"the client {doing} for stream_idle_timeout_s={idle:g}s")
        finally:
            if not task.done():
                task.cancel()


def _message(received: object):
    if isinstance(received, wire.Malformed):
        raise engine.InvalidInput("request", f"not a valid {received.kind} message: {received.error}")
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
        self.read_reservation = config.read_reservation_bytes

    # ---------------------------------------------------------------- one path for every RPC
    async def _rpc(self, context: grpc.aio.ServicerContext, what: str, body: Callable[[_Call], Awaitable]):
        call = _Call(self, context)
        self.calls.start()
        try:
            return await body(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered with its status
            err = status_of(exc, what)
            del exc
            context.set_code(err.code)
            context.set_details(err.message)
            return None
        finally:
            call.alive = False
            self.calls.end()

    # ---------------------------------------------------------------- evaluation of one request
    async def _evaluate(self, call: _Call, request: wire.WireRequest, held: Reservation) -> pb.EvaluateResponse:
        """Decode, validate, reserve what the answer needs, compute; ``held`` then covers the answer."""
        shm_bytes = _shm_nbytes(request)
        if shm_bytes:
            held.resize(held.nbytes + shm_bytes, "shared-memory tensors")
        check_message_size(request, self.config.max_message_bytes)
        if shm_bytes:  # copying a shared-memory segment takes a while: not on the event loop
            decoded = await asyncio.to_thread(convert.decode_request, request, self.shm_reader)
        else:
            decoded = convert.decode_request(request, self.shm_reader)
        plan = decoded.plan
        answer = check_answer_size(plan, self.config.max_send_message_bytes)
        held.resize(held.nbytes + plan.working_nbytes() + ANSWER_COPIES * answer, "the request and its answer")
        result = await self.batcher.submit(plan, decoded.input, decoded.target, deadline=call.deadline)
        del decoded, plan
        response = convert.encode_result(request.id, result)
        held.resize(ANSWER_COPIES * answer, "the answer")
        return response

    async def Evaluate(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        async def body(call: _Call) -> pb.EvaluateResponse:
            got = await call.read("EvaluateRequest")
            if got is None:
                raise engine.InvalidInput("request", "the call carried no EvaluateRequest message")
            message, held = got
            try:
                return await self._evaluate(call, _message(message), held)
            finally:
                held.release()

        return await self._rpc(context, "Evaluate", body)

    # ---------------------------------------------------------------- streams
    async def _answer_item(self, call: _Call, request: wire.WireRequest, held: Reservation) -> pb.EvaluateResponse:
        """One stream item: its response, or its failure as an ItemError (never raises)."""
        try:
            return await self._evaluate(call, request, held)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported per item
            err = status_of(exc, "stream item")
            del exc
            held.resize(0, "an item error")
            return convert.error_response(request.id, err.code.value[0], err.message)

    async def _answer_message(self, call: _Call, message: object, held: Reservation, packed: bool):
        if isinstance(message, wire.Malformed):
            err = status_of(_message_error(message), "stream message")
            failed = convert.error_response("", err.code.value[0], err.message)
            return pb.EvaluateBatchResults(responses=[failed]) if packed else failed
        if not packed:
            return await self._answer_item(call, message, held)
        # each item reserves its own answer; the message's reservation keeps the request bytes
        shares = [self.budget.empty() for _ in message]
        try:
            responses = await asyncio.gather(*(self._answer_item(call, r, s) for r, s in zip(message, shares, strict=True)))
            held.resize(0, "packed answers")
            for share in shares:
                held.absorb(share)
        finally:
            for share in shares:
                share.release()
        return pb.EvaluateBatchResults(responses=responses)

    async def _serve_stream(self, call: _Call, kind: str, packed: bool) -> None:
        """Answer messages concurrently, at most max_stream_in_flight read and unanswered; send each
        answer as soon as it is ready (answers are matched by id)."""
        window = asyncio.Semaphore(self.config.max_stream_in_flight)
        done: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        pending = 0
        end = object()

        async def one(message: object, held: Reservation) -> None:
            try:
                answer = await self._answer_message(call, message, held, packed)
            except asyncio.CancelledError:
                held.release()
                raise
            except Exception as exc:  # noqa: BLE001 - a stream must never wait for an answer that never comes
                err = status_of(exc, "stream message")
                del exc
                failed = convert.error_response("", err.code.value[0], err.message)
                answer = pb.EvaluateBatchResults(responses=[failed]) if packed else failed
            del message
            done.put_nowait((answer, held))

        async def reader() -> None:
            nonlocal pending

            def answers_pending() -> bool:
                return pending > 0

            try:
                while True:
                    await window.acquire()
                    got = await call.read(kind, waiting_for_us=answers_pending)
                    if got is None:
                        return
                    pending += 1
                    task = asyncio.ensure_future(one(*got))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                done.put_nowait(end)

        reader_task = asyncio.ensure_future(reader())
        reading = True
        try:
            while reading or pending:
                item = await done.get()
                if item is end:
                    reading = False
                    if reader_task.exception() is not None:
                        raise reader_task.exception()
                    continue
                answer, held = item
                try:
                    await call.write(answer)
                finally:
                    held.release()
                    del answer, item
                pending -= 1
                window.release()
        finally:
            reader_task.cancel()
            for task in list(tasks):
                task.cancel()
            while not done.empty():
                item = done.get_nowait()
                if item is not end:
                    item[1].release()

    async def EvaluateStream(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        """Answers each item as soon as it is computed; items are matched by id."""
        await self._rpc(context, "EvaluateStream", lambda call: self._serve_stream(call, "EvaluateRequest", packed=False))

    async def EvaluatePacked(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        """EvaluateStream with several items per message; each message is answered as a whole."""
        await self._rpc(context, "EvaluatePacked", lambda call: self._serve_stream(call, "EvaluateBatch", packed=True))

    # ---------------------------------------------------------------- chunked requests
    async def EvaluateChunked(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        return await self._rpc(context, "EvaluateChunked", self._evaluate_chunked)

    async def _evaluate_chunked(self, call: _Call) -> pb.EvaluateResponse:
        got = await call.read("EvaluateChunk")
        if got is None:
            raise engine.InvalidInput("header", "EvaluateChunked received no messages")
        first, header_held = got
        inflight: list[tuple[asyncio.Future, Reservation]] = []
        partials: list[engine.Partial] = []
        try:
            first = _message(first)
            if first.header is None:
                raise engine.InvalidInput("header", "the first EvaluateChunk must carry the header")
            if first.header.target is not None and first.header.target.shm is not None:
                header_held.resize(header_held.nbytes + int(first.header.target.shm.length), "a shared-memory header target")
            assembler = ChunkAssembler(first.header, self.shm_reader)
            plan = assembler.plan
            answer = check_answer_size(plan, self.config.max_send_message_bytes)
            target_bytes = len(first.header.target.data) if first.header.target is not None else 0
            header_held.resize(
                header_held.nbytes + HEADER_TARGET_COPIES * target_bytes + plan.working_nbytes() + ANSWER_COPIES * answer,
                "the chunk header and its answer",
            )

            async def drain(limit: int) -> None:
                while len(inflight) > limit:
                    future, held = inflight.pop(0)
                    try:
                        partials.append(await future)
                    finally:
                        held.release()

            def schedule(message: wire.WireChunk, held: Reservation, first: bool = False) -> None:
                rows = assembler.rows(message, first=first)
                if rows is None:
                    held.release()
                    return
                run = self.batcher.run_in_engine(
                    lambda: assembler.evaluate(rows, device=self.device, chunk_bytes=self.config.chunk_bytes, checkpoint=call.checkpoint)
                )
                inflight.append((asyncio.ensure_future(run), held))

            # the first message's rows (if any) stay counted in the header's reservation
            schedule(first, self.budget.empty(), first=True)
            del first
            while True:
                await drain(self.config.max_chunks_in_flight - 1)
                got = await call.read("EvaluateChunk")
                if got is None:
                    break
                message, held = got
                try:
                    schedule(_message(message), held)
                except BaseException:
                    held.release()
                    raise
                del message, got
            await drain(0)
            assembler.check_complete()
            result = await self.batcher.run_in_engine(assembler.finish, partials)
            partials.clear()
            return convert.encode_result(assembler.id, result)
        finally:
            for future, held in inflight:
                future.cancel()
                held.release()
            header_held.release()

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
        )


def _message_error(message: wire.Malformed) -> engine.InvalidInput:
    return engine.InvalidInput("request", f"not a valid {message.kind} message: {message.error}")


def _shm_nbytes(request: wire.WireRequest) -> int:
    """Bytes the request's shared-memory references will copy into the server."""
    tensors = [request.input, request.target]
    return sum(int(t.shm.length) for t in tensors if t is not None and t.shm is not None)


def add_to_server(servicer: LossServicer, server: grpc.aio.Server) -> None:
    """Register the servicer. Every method reads its messages itself (see _Call.read), so the
    unary Evaluate is registered as client-streaming: same wire, but the read waits for budget."""
    handlers = {
        "Evaluate": grpc.stream_unary_rpc_method_handler(
            servicer.Evaluate, wire.deserializer(pb.EvaluateRequest), pb.EvaluateResponse.SerializeToString
        ),
        "EvaluateStream": grpc.stream_stream_rpc_method_handler(
            servicer.EvaluateStream, wire.deserializer(pb.EvaluateRequest), pb.EvaluateResponse.SerializeToString
        ),
        "EvaluatePacked": grpc.stream_stream_rpc_method_handler(
            servicer.EvaluatePacked, wire.deserializer(pb.EvaluateBatch), pb.EvaluateBatchResults.SerializeToString
        ),
        "EvaluateChunked": grpc.stream_unary_rpc_method_handler(
            servicer.EvaluateChunked, wire.deserializer(pb.EvaluateChunk), pb.EvaluateResponse.SerializeToString
        ),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(servicer.GetServerInfo, lambda data: None, pb.ServerInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("lossd.v1.LossService", handlers),))


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
