"""AsyncLossClient: the asyncio twin of :class:`~lossd_client.LossClient`.

Same methods, options and results; the methods are awaitables and ``evaluate_many`` is an async
iterator. Like the blocking client it only does I/O (``grpc.aio``): requests, routing and
answers come from :mod:`lossd_client.core`, the shared methods from
:class:`~lossd_client.base.ClientBase`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc

from . import compare, core
from ._proto.lossd.v1 import loss_pb2 as pb
from .base import ClientBase, Connection
from .compare import CompareResult
from .errors import LossdError, caller_fields, error_for, from_rpc_error
from .flight import AGAIN, Flight, deadline_exceeded, deadline_of, remaining
from .lanes import Lanes, connection_of, gave_way, status_gave_way
from .types import EvaluateResult, LoglikelihoodResult, LossRequest, PerplexityResult, ServerInfo

__all__ = ["AsyncLossClient"]


class AsyncLossClient(ClientBase[Awaitable[Any], Awaitable[PerplexityResult], Awaitable[LoglikelihoodResult], Awaitable[CompareResult]]):
    """asyncio twin of :class:`LossClient` (same methods, awaitable); ``async with`` it.

    Every option is a keyword, described on :class:`~lossd_client.base.ClientBase`.
    """

    _grpc = grpc.aio
    _closed = False

    async def __aenter__(self) -> AsyncLossClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels and unlink this client's shared-memory segments. Calls still in
        progress (in other tasks) raise :class:`~lossd_client.errors.CancelledError`."""
        self._closed = True
        for connection in self._connections:
            await connection.channel.close()
        self._segments.close()

    async def evaluate(self, request: LossRequest | None = None, *, timeout_s: float | None = None, **fields: Any) -> EvaluateResult:
        """Async twin of :meth:`LossClient.evaluate` (``timeout_s`` is one deadline for the whole call)."""
        req, timeout = core.request_of(request, fields), self._timeout(timeout_s)
        return await self._evaluate(req, deadline_of(timeout))

    async def _evaluate(self, req: LossRequest, deadline: float | None) -> EvaluateResult:
        """:meth:`evaluate` within ``deadline`` (``time.monotonic()``; None: none): each RPC gets what is left of it."""
        if self._needs_limit(req):
            await self._lookup(deadline, cached=True)
        with self._route(req) as call, self._errors(deadline):
            if call.chunked:
                responses = await _chunked(self._take(len(call.streams)), call.streams, deadline)
            else:
                responses = [await self._take(1)[0].evaluate(call.message, timeout=remaining(deadline))]
        return call.answer(responses)

    async def evaluate_many(
        self,
        requests: Iterable[Any] | AsyncIterable[Any],
        *,
        window: int = 64,
        pack: int | None = None,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> AsyncIterator[EvaluateResult | LossdError]:
        """Async twin of :meth:`LossClient.evaluate_many` (the requests may also be an async iterable);
        with ``connections=k`` each message goes to the open stream (one per connection) that carries
        the fewest requests unanswered. The source is read by a task on the event loop: a sync
        iterable's ``next()`` runs there, so one that blocks (waits for a result) blocks the loop;
        give such a source as an async iterable."""
        stream, connections = self._stream(window, pack, return_exceptions)
        deadline = deadline_of(self._timeout(timeout_s))
        if core.needs_limit_before_streams(self._server_max):
            await self._lookup(deadline, cached=True)
        lanes, inbox = Lanes(len(connections)), asyncio.Queue()
        streams = _Streams(connections, stream.method, lanes, inbox, deadline)
        for lane in range(len(connections)):
            streams.open(lane)
        slots = asyncio.Semaphore(window)
        write_task = asyncio.ensure_future(_write(streams, stream, requests, slots, _Alone(self, stream, deadline, inbox, streams)))
        try:
            async for message in streams.responses():
                answers = stream.answers(message)
                if answers:
                    lanes.answered(answers)
                    streams.changed.set()  # the writer waits for every answer before it ends
                for _ in answers:
                    slots.release()
                for result in stream.ready(answers):
                    yield result
            await write_task
            for result in stream.ready():
                yield result
            stream.finish()
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            failure = self._many_failure(exc, write_task, deadline)
            if failure is exc:
                raise
            raise failure from exc
        finally:
            write_task.cancel()
            streams.cancel()

    async def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        """The server's versions, device and limits (GetServerInfo); a call made while another
        task's is in progress takes its answer."""
        return await self._lookup(deadline_of(self._timeout(timeout_s)), cached=False)

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The server's health status name (SERVING, NOT_SERVING, ...)."""
        check, request = self._health_check(service)
        timeout = self._health_timeout(timeout_s)
        with self._errors(deadline_of(timeout)):
            return core.health_status(await check(request, timeout=timeout))

    async def _lookup(self, deadline: float | None, *, cached: bool) -> ServerInfo:
        """The server's info: the latest this client learnt (``cached``, once there is one) or a
        lookup's within ``deadline``, which the tasks that ask while it runs share (:mod:`lossd_client.flight`)."""
        flights = self._flights
        while True:  # again only after a flight failed by its leader's own doing (SingleFlight.answer)
            if cached and flights.last is not None:
                return flights.last
            flight, lead = flights.join(deadline, asyncio.get_running_loop().create_future)
            if lead:
                return await self._lead(flight)
            landed, _ = await asyncio.wait([flight.landed], timeout=remaining(deadline))  # never cancels the flight
            if not landed:
                raise deadline_exceeded()
            answer = flights.answer(flight, deadline)
            if answer is not AGAIN:
                return answer

    async def _lead(self, flight: Flight) -> ServerInfo:
        """Ask the server for ``flight`` (within its deadline) and land the answer or the failure
        (this task's cancellation too: a waiter then leads a new flight)."""
        info, error = None, None
        try:
            with self._errors(flight.deadline):
                info = core.server_info(await self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=remaining(flight.deadline)))
            return info
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._flights.land(flight, info, error)
            flight.landed.set_result(None)

    @contextmanager
    def _errors(self, deadline: float | None = None) -> Iterator[None]:
        """A failed call of the block (``deadline``: its calls' deadline) raised as its LossdError (see :meth:`_failure`)."""
        try:
            yield
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            failure = self._failure(exc, deadline)
            if failure is exc:
                raise
            raise failure from exc

    def _failure(self, exc: grpc.RpcError | asyncio.CancelledError, deadline: float | None) -> BaseException:
        """The LossdError for a failed call, as the blocking client raises it, where grpc.aio
        reports it otherwise. A call cancelled though its task was not raises asyncio's
        CancelledError: CancelledError, gRPC's "Channel closed!" when this client's :meth:`close`
        cancelled it, else DeadlineExceededError once the deadline passed (grpc.aio cancels a call
        whose half-close failed), else CancelledError; a task that is being cancelled stays
        cancelled. A stream whose write failed before grpc.aio read its status ends INTERNAL
        "Internal error from Core" (:data:`LOST_STATUS_DETAILS`, which lossd's server never
        sends): DeadlineExceededError once the deadline passed (written to after it), else
        UnavailableError (the server went away: what the blocking client raises)."""
        if isinstance(exc, asyncio.CancelledError):
            if _task_cancelling():
                return exc
            if self._closed:
                return error_for(grpc.StatusCode.CANCELLED, CLOSED_DETAILS)
            if _passed(deadline):
                return error_for(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_DETAILS)
            return error_for(grpc.StatusCode.CANCELLED, LOCALLY_CANCELLED_DETAILS)
        if _lost_status(exc):
            if _passed(deadline):
                return error_for(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_DETAILS)
            return error_for(grpc.StatusCode.UNAVAILABLE, LOST_CONNECTION_DETAILS)
        return from_rpc_error(exc)

    def _many_failure(
        self, exc: grpc.RpcError | asyncio.CancelledError, write_task: asyncio.Future, deadline: float | None
    ) -> BaseException:
        """What ``evaluate_many`` raises when a stream failed with ``exc``: the source's own error when
        the writer failed with one (not the call's); the write's error when ``exc`` is only a
        stream the writer cancelled because of it (its other streams, with ``connections=k``);
        otherwise :meth:`_failure`."""
        failed = write_task.exception() if write_task.done() and not write_task.cancelled() else None
        if failed is not None and not isinstance(failed, (grpc.RpcError, asyncio.InvalidStateError)):  # the source, not the call
            return failed
        cancelled_for_it = isinstance(exc, asyncio.CancelledError) and isinstance(failed, grpc.RpcError)
        if cancelled_for_it and not self._closed and not _task_cancelling():
            return self._failure(failed, deadline)
        return self._failure(exc, deadline)

    async def _run(
        self,
        build: Callable[[], LossRequest],
        timeout_s: float | None,
        finish: Callable[[EvaluateResult, LossRequest], Any],
        fields: Mapping[str, str] | None = None,
    ) -> Any:
        with caller_fields(fields):
            request = build()
            return finish(await self.evaluate(request, timeout_s=timeout_s), request)

    def _compare_call(self, inputs: compare.CompareInputs, progress: Callable[[int], None] | None) -> tuple[compare.Call, Any]:
        """ClientBase's, with CompareChunked's messages written by this client (:class:`_Writes`)."""
        call, rpc = super()._compare_call(inputs, progress)
        return call, (_Writes(rpc) if call.chunked else rpc)

    async def _compare(
        self, inputs: compare.CompareInputs, deadline: float | None, progress: Callable[[int], None] | None
    ) -> CompareResult:
        with caller_fields(compare.CALLER_FIELDS):
            inputs = compare.with_token_ids(inputs)
            if compare.needs_server_limit(inputs, self._server_max):
                await self._lookup(deadline, cached=True)
            call, rpc = self._compare_call(inputs, progress)
            with self._errors(deadline):
                if not call.chunked:
                    return call.parse(await rpc(call.request, timeout=remaining(deadline)))
                kept = _FirstKept(call.request)
                try:
                    return call.parse(await rpc(kept, timeout=remaining(deadline)))
                except grpc.aio.AioRpcError as exc:
                    raise await _header_verdict(exc, rpc, [kept.first], deadline) from None


#: What gRPC's blocking calls report when their channel is closed under them.
CLOSED_DETAILS = "Channel closed!"


#: What gRPC reports for a call whose deadline passed.
DEADLINE_DETAILS = "Deadline Exceeded"
#: What gRPC reports for a call its application cancelled.
LOCALLY_CANCELLED_DETAILS = "Locally cancelled by application!"


def _passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _task_cancelling() -> bool:
    """Whether the current task is being cancelled (always assumed before Python 3.11)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


#: What grpc.aio reports for a client stream whose write failed before the server's status was
#: read (``_write`` → ``set_internal_error``): the server's own status is lost.
LOST_STATUS_DETAILS = "Internal error from Core"
#: What a lost status before the deadline is raised as (UnavailableError).
LOST_CONNECTION_DETAILS = (
    f"a write failed before the call's status was read (grpc.aio: {LOST_STATUS_DETAILS}): the server went away or ended the call"
)


def _lost_status(exc: BaseException) -> bool:
    """Whether ``exc`` is grpc.aio's own INTERNAL for a call whose status it never read."""
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.INTERNAL and exc.details() == LOST_STATUS_DETAILS


async def _chunked(
    connections: Sequence[Connection], streams: Sequence[Iterator[bytes]], deadline: float | None
) -> list[pb.EvaluateResponse]:
    """One EvaluateChunked call per stream, all at once, each over its own connection and within the
    one ``deadline``; their answers in order.

    A server that refuses a call at its header answers while the client still writes its rows; when
    grpc.aio's next write fails before it has read that answer, it ends the call INTERNAL "Internal
    error from Core" (the blocking client gets the server's status). The header alone is then sent
    again and the server's verdict on it raised instead, when it refuses it."""
    firsts = [_FirstKept(s) for s in streams]
    calls = [_Writes(c.evaluate_chunked)(f, timeout=remaining(deadline)) for c, f in zip(connections, firsts, strict=True)]
    try:
        return list(await asyncio.gather(*calls))
    except grpc.aio.AioRpcError as exc:
        raise await _header_verdict(exc, _Writes(connections[0].evaluate_chunked), [f.first for f in firsts], deadline) from None
    finally:
        for call in calls:
            call.cancel()  # the others, when one failed


class _Writes:
    """A grpc.aio client-streaming method (EvaluateChunked, CompareChunked) called as grpc.aio calls
    it, ``rpc(messages, timeout=...)``, except that the messages are written here, not by grpc.aio's
    own writer task: that one cancels the call when the half-close fails, which it does when the
    call has ended (its deadline passed, or the server answered) before grpc.aio read its status;
    the caller then got asyncio's CancelledError, as if its task had been cancelled, instead of the
    call's status (and an ``asyncio.gather`` of such calls was torn down by it)."""

    def __init__(self, rpc: Callable[..., Any]) -> None:
        self._rpc = rpc

    def __call__(self, messages: Iterable[bytes], *, timeout: float | None) -> _Writing:
        return _Writing(self._rpc(timeout=timeout), messages)


class _Writing:
    """One call of :class:`_Writes`: awaiting it writes the messages, half-closes the call and
    returns its answer (or raises its status); ``cancel()`` cancels the call."""

    def __init__(self, call: Any, messages: Iterable[bytes]) -> None:
        self._call = call
        self._messages = messages

    def cancel(self) -> bool:
        return self._call.cancel()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._answer().__await__()

    async def _answer(self) -> Any:
        call = self._call
        # The writes run in a task of their own that the call's end cancels: grpc.aio's write and
        # half-close first wait for the call's headers to be sent, and a call cancelled before that
        # (the client closed) never sends them, so a write awaited here directly waited for ever.
        writing = asyncio.ensure_future(self._write_all())
        call.add_done_callback(lambda _call: writing.cancel())
        try:
            await writing
        except asyncio.CancelledError:
            if _task_cancelling():  # this task is cancelled: the call goes too
                writing.cancel()
                call.cancel()
                raise
            # else the call ended while a write waited: its status, awaited below, says how
        except BaseException:
            call.cancel()  # the messages failed: the call goes too
            raise
        return await call

    async def _write_all(self) -> None:
        call = self._call
        try:
            for message in self._messages:
                await call.write(message)
            await call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.InternalError, asyncio.InvalidStateError):
            pass  # the call has ended: its status, awaited by _answer, says how


class _FirstKept:
    """An iterator of a call's messages that keeps the first (the header)."""

    def __init__(self, messages: Iterator[bytes]) -> None:
        self._messages = iter(messages)
        self.first: bytes | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        message = next(self._messages)
        if self.first is None:
            self.first = message
        return message


async def _header_verdict(
    exc: grpc.aio.AioRpcError, rpc: Callable, headers: Sequence[bytes | None], deadline: float | None
) -> grpc.aio.AioRpcError:
    """What a chunked call that ended ``exc`` raises: ``exc``, unless it is grpc.aio's lost status
    (:data:`LOST_STATUS_DETAILS`) and the server refuses one of ``headers`` sent alone through
    ``rpc`` (a header it accepts only misses its rows there: not what failed the call), within
    what is left of the call's ``deadline``."""
    if not _lost_status(exc):
        return exc
    for header in headers:
        if header is None:
            continue
        try:
            await rpc(iter([header]), timeout=remaining(deadline))
        except grpc.aio.AioRpcError as verdict:
            missing_rows = verdict.code() == grpc.StatusCode.INVALID_ARGUMENT and " rows of the header's " in verdict.details()
            if not missing_rows and verdict.code() != grpc.StatusCode.INTERNAL:
                return verdict
    return exc


class _Streams:
    """The calls of an async ``evaluate_many``, one per stream (lane), each read by a task of its
    own into the inbox; the writer opens a new stream only when requests wait and no stream is
    open to take them (see :mod:`lossd_client.lanes`)."""

    def __init__(self, connections: Sequence[Any], method: str, lanes: Lanes, inbox: asyncio.Queue, deadline: float | None) -> None:
        self.lanes = lanes
        self.calls: dict[int, Any] = {}
        #: Set when the writer may have something to do: a request queued or put back, the source's end, answers.
        self.changed = asyncio.Event()
        self._connections = connections
        self._method = method
        self._inbox = inbox
        self._deadline = deadline
        self._readers: list[asyncio.Future] = []

    def open(self, lane: int) -> None:
        call = connection_of(lane, self._connections).streams[self._method](timeout=remaining(self._deadline))
        self.calls[lane] = call
        self._readers.append(asyncio.ensure_future(self._read(call, lane)))

    async def _read(self, call: Any, lane: int) -> None:
        inbox = self._inbox
        try:
            async for message in call:
                inbox.put_nowait(core.Merge.message(message))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            inbox.put_nowait(core.Merge.failed(exc, lane))
        inbox.put_nowait(core.Merge.end(lane))

    def put(self, request: core.Encoded) -> None:
        self.lanes.put(request)
        self.changed.set()

    def end(self) -> None:
        """The source has ended."""
        self.lanes.end()
        self.changed.set()
        self._inbox.put_nowait(core.Merge.WAKE)

    def pause(self, paused: bool) -> None:
        """:meth:`~lossd_client.lanes.Lanes.pause` (True: the writer half-closes each stream once
        nothing is queued) or resume (False)."""
        if paused:
            self.lanes.pause()
            self.changed.set()
        else:
            self.lanes.resume()

    async def write(self, lane: int, message: bytes) -> None:
        """Send ``message`` on stream ``lane``. A stream that gave way meanwhile takes no more: its
        reader hands what it carried back to the queue (the message included)."""
        call = self.calls[lane]
        try:
            await call.write(message)
        except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.InternalError):
            if not call.done():
                raise
            code = await call.code()
            if code == grpc.StatusCode.INTERNAL:
                if await call.details() != LOST_STATUS_DETAILS or _passed(self._deadline):
                    raise
            elif not status_gave_way(code, await call.trailing_metadata()):
                raise
            self.lanes.close(lane)

    def _resendable(self, exc: BaseException) -> bool:
        """Whether a stream's failure lets what it carried go again: it gave way; or grpc.aio lost
        its status (a write raced the call's end, and grpc.aio put its own INTERNAL in place of the
        server's status and trailing metadata: probe 28 saw 6 of 40 runs of clients pausing around
        give-ways fail UnavailableError on a busy machine), before the deadline. When the call ended for another
        reason (the server went away), the new stream meets it and raises it, named."""
        return gave_way(exc) or (_lost_status(exc) and not _passed(self._deadline))

    async def responses(self) -> AsyncIterator[Any]:
        """The responses of every stream as they come, until nothing is left to send or to wait
        for; a stream's error is raised here (a give-way only past MAX_RESENDS)."""
        merge, lanes = core.Merge(self.lanes, self._resendable), self.lanes
        try:
            while not lanes.done:
                if (message := merge.take(await self._inbox.get())) is not None:
                    yield message
                else:
                    self.changed.set()  # a stream ended or gave way: what it carried may wait to go again
        finally:
            for reader in self._readers:
                reader.cancel()

    def cancel(self) -> None:
        for call in self.calls.values():
            call.cancel()


class _Alone:
    """What evaluate_many does with an item too large for one message: routes it as ``evaluate()``
    does (EvaluateChunked), awaited by the producer, and settles its answer in the stream."""

    def __init__(
        self, client: AsyncLossClient, stream: core.Stream, deadline: float | None, inbox: asyncio.Queue, streams: _Streams
    ) -> None:
        self._client = client
        self._stream = stream
        self._deadline = deadline  # evaluate_many's, shared by its items
        self._inbox = inbox
        self._streams = streams

    @property
    def server_max(self) -> int | None:
        """The server's message limit, once known."""
        return self._client._server_max

    def needs_limit(self, req: LossRequest) -> bool:
        """Whether ``req`` is too large to be placed without the server's message limit."""
        return core.needs_server_limit(req, shared_memory=False, server_max=self._client._server_max)

    async def fetch_limit(self) -> None:
        """Ask the server for its message limit (once per client)."""
        await self._client._lookup(self._deadline, cached=True)

    async def evaluate(self, req: LossRequest) -> None:
        """Evaluate ``req`` alone, this call's streams half-closed meanwhile (Lanes.pause); its
        answer (or its LossdError) is settled in the stream."""
        self._streams.pause(True)
        try:
            answer: EvaluateResult | LossdError = await self._client._evaluate(req, self._deadline)
        except LossdError as exc:
            answer = exc
        finally:
            self._streams.pause(False)
        self._stream.settle(req.id, answer)
        self.settled()

    def settled(self) -> None:
        """Wake the reader: the client answered an item itself (evaluated alone, or rejected)."""
        self._inbox.put_nowait(core.Merge.message(core.SETTLED))


async def _items(requests: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if hasattr(requests, "__aiter__"):
        async for item in requests:  # type: ignore[union-attr]
            yield item
    else:
        for item in requests:  # type: ignore[union-attr]
            yield item


async def _write(
    streams: _Streams, stream: core.Stream, requests: Iterable[Any] | AsyncIterable[Any], slots: asyncio.Semaphore, alone: _Alone
) -> None:
    """The request side of ``evaluate_many``: a producer task takes an item while a window slot is
    free and queues its request (:func:`_produce`); a message goes out as soon as one request is
    queued, packed with the others queued by then (never waiting on the source for more), on the
    open stream that carries the fewest requests unanswered. A sync iterable is consumed on the
    event loop, so its items are queued together while slots are free and fill the packs. Each
    stream is half-closed once the source has ended and nothing is queued; the writer ends when
    every request is answered (a stream that gave way may hand requests back to send again). A
    failing item or source ends the writing (the stream raises it after the answers before it);
    anything else cancels the calls."""
    lanes, changed = streams.lanes, streams.changed
    producer = asyncio.ensure_future(_produce(stream, requests, slots, streams, alone))
    try:
        while True:
            lane = lanes.least_loaded()
            if lane is None and (lane := lanes.wanted()) is not None:
                streams.open(lane)
            batch = None if lane is None else lanes.take(lane, stream.full)
            if batch:
                await streams.write(lane, stream.message(batch))  # type: ignore[arg-type]
            elif batch is not None:  # nothing is queued, and the source has ended or the call is paused
                await _half_close(streams.calls[lane])  # type: ignore[index]
            elif lanes.source_ended and not lanes.queued and not lanes.carrying:
                break
            else:
                changed.clear()
                await changed.wait()
        await producer
    except BaseException:
        producer.cancel()
        streams.cancel()  # the reader must not wait for answers that will never come
        raise


async def _half_close(call: Any) -> None:
    """Half-close a stream. Its half-close fails (grpc.aio's InternalError, not an RpcError) when
    the call has already ended (its deadline passed, the server went away) but grpc.aio has not
    read its status yet: the stream's reader then raises that status."""
    try:
        await call.done_writing()
    except grpc.aio.InternalError:
        pass


async def _produce(
    stream: core.Stream, requests: Iterable[Any] | AsyncIterable[Any], slots: asyncio.Semaphore, streams: _Streams, alone: _Alone
) -> None:
    """Queue each item's request once it holds a window slot, then the end (source ended or failed)."""
    source = _items(requests)
    try:
        while True:
            await slots.acquire()
            msg = await _take(source, stream, alone)
            if msg is None:
                return
            streams.put(msg)
    finally:
        streams.end()


async def _take(source: AsyncIterator[Any], stream: core.Stream, alone: _Alone) -> core.Encoded | None:
    """The next item's request, numbered; None at the end of the source or after a failure. Items
    the client answers itself (rejected, or evaluated alone) need no message and keep the slot."""
    while (item := await _next(source, stream)) is not _END:
        try:
            msg = stream.request(item)
            if isinstance(msg, LossRequest):
                if alone.needs_limit(msg):
                    await alone.fetch_limit()
                msg = stream.place(msg, alone.server_max)
            if isinstance(msg, LossRequest):
                await alone.evaluate(msg)
            elif msg is core.REJECTED:
                alone.settled()
            else:
                return msg  # type: ignore[return-value]
        except Exception as exc:  # noqa: BLE001 - the limit's call failed: raised after the answers before it
            stream.fail(exc)
            return None
    return None


async def _next(source: AsyncIterator[Any], stream: core.Stream) -> Any:
    """The source's next item; _END at its end or when it fails (the failure goes to the stream)."""
    try:
        return await anext(source)
    except StopAsyncIteration:
        return _END
    except Exception as exc:  # noqa: BLE001 - the caller's iterable failed: raised after the answers before it
        stream.fail(exc)
        return _END


_END = object()
