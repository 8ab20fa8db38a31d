"""LossClient: the blocking client. Remote calls that feel like torch.nn.functional.

Inputs may be numpy arrays or torch tensors in any layout; results come back as the kind of the
input (torch in -> torch out) with torch's shape and dtype. Transport errors become the
exceptions in :mod:`lossd_client.errors`, chosen by status code. The request building, routing
and answer parsing live in :mod:`lossd_client.core` and the shared methods in
:class:`~lossd_client.base.ClientBase`: this module only does the blocking I/O.
:class:`~lossd_client.aio.AsyncLossClient` is its asyncio twin (also importable from here).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from . import compare, core
from ._proto.lossd.v1 import loss_pb2 as pb
from .base import ClientBase, Connection
from .channel import normalise_target, service_config
from .compare import CompareResult
from .errors import LossdError, caller_fields, rpc_errors
from .flight import AGAIN, Flight, deadline_exceeded, deadline_of, remaining
from .lanes import Lanes, connection_of
from .types import EvaluateResult, LoglikelihoodResult, LossRequest, PerplexityResult, ServerInfo

__all__ = ["AsyncLossClient", "LossClient", "normalise_target", "service_config"]


class LossClient(ClientBase[Any, PerplexityResult, LoglikelihoodResult, CompareResult]):
    """Blocking client. ``LossClient("127.0.0.1:50051")``; use as a context manager.

    ``target`` may be one ``host:port``, a ``dns:///name:port`` target, or a list of addresses
    (client-side round robin). TLS: pass ``root_certificates`` (and for mTLS ``private_key`` and
    ``certificate_chain``) as PEM bytes. Every option is a keyword, described on
    :class:`~lossd_client.base.ClientBase`.
    """

    _grpc = grpc

    def __enter__(self) -> LossClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels and unlink this client's shared-memory segments."""
        for connection in self._connections:
            connection.channel.close()
        self._segments.close()

    def evaluate(self, request: LossRequest | None = None, *, timeout_s: float | None = None, **fields: Any) -> EvaluateResult:
        """Evaluate a LossRequest (or its fields as keywords; keywords beside a request replace its
        fields); returns loss and totals.

        Requests larger than the server's message limit (or than ``chunked_above_bytes``, which bounds the
        server's memory per request) go through EvaluateChunked by themselves. ``timeout_s`` is one
        deadline for the whole call: the lookup of the server's limit and every part of the request.
        """
        req, timeout = core.request_of(request, fields), self._timeout(timeout_s)
        return self._evaluate(req, deadline_of(timeout))

    def _evaluate(self, req: LossRequest, deadline: float | None) -> EvaluateResult:
        """:meth:`evaluate` within ``deadline`` (``time.monotonic()``; None: none): each RPC gets what is left of it."""
        if self._needs_limit(req):
            self._lookup(deadline, cached=True)
        with self._route(req) as call, rpc_errors():
            if call.chunked:
                responses = _chunked(self._take(len(call.streams)), call.streams, deadline)
            else:
                responses = [self._take(1)[0].evaluate(call.message, timeout=remaining(deadline))]
        return call.answer(responses)

    def evaluate_many(
        self,
        requests: Iterable[Any],
        *,
        window: int = 64,
        pack: int | None = None,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> Iterator[EvaluateResult | LossdError]:
        """Score many requests, ``window`` in flight; results in input order.

        Each item is a :class:`LossRequest`, a mapping with its field names, or an
        ``(input, target)`` pair; anything else raises TypeError (after the results of the items
        before it). With ``return_exceptions`` an item's error (the server's, or the client's own,
        e.g. an unknown reduction) is yielded in its place and the others are still evaluated.
        Requests travel up to ``pack`` per message over EvaluatePacked (default
        ``window // (4 * streams)``, so several messages are in flight on each stream while the
        server computes); ``pack=1`` uses EvaluateStream, one request per message. A message goes
        out as soon as a stream can send it, with the requests the source has given by then: a
        source that is always ready fills the packs, a slow one is never waited on for more of
        a message (a source may wait for a result before it yields its next request). The source
        is read by a thread of the client's. An item larger than the server's message limit is
        sent alone as ``evaluate()`` sends it (EvaluateChunked), in its place in the order. With
        ``connections=k`` the window is spread over one stream per connection (each message goes
        to whichever stream asks for the next one). A stream the server ends because it gave its
        read reservation to calls waiting for memory (its client sent nothing for the server's
        ``idle_read_yield_s``) does not fail the call: what it carried unanswered is sent again,
        on a new stream if none is left (see :mod:`lossd_client.lanes`).
        """
        stream, connections = self._stream(window, pack, return_exceptions)
        deadline, inbox = deadline_of(self._timeout(timeout_s)), queue.SimpleQueue()
        if core.needs_limit_before_streams(self._server_max):
            self._lookup(deadline, cached=True)
        outbox = _Outbox(Lanes(len(connections)), inbox)
        feeder = _Feeder(iter(requests), stream, _Alone(self, stream, deadline, inbox, outbox), outbox)
        streams = _Streams(connections, stream.method, feeder, outbox, deadline, inbox)
        for lane in range(len(connections)):
            streams.open(lane)
        feeder.start()
        try:
            with rpc_errors():
                for message in streams.responses():
                    answers = stream.answers(message)
                    outbox.answered(answers)
                    feeder.release(len(answers))
                    yield from stream.ready(answers)
            yield from stream.ready()
            stream.finish()
        finally:
            feeder.stop()
            streams.cancel()

    def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        """The server's versions, device and limits (GetServerInfo); a call made while another
        thread's is in progress takes its answer."""
        return self._lookup(deadline_of(self._timeout(timeout_s)), cached=False)

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The server's health status name (SERVING, NOT_SERVING, ...); ``timeout_s`` (else the
        client's) or 5 s."""
        check, request = self._health_check(service)
        with rpc_errors():
            return core.health_status(check(request, timeout=self._health_timeout(timeout_s)))

    def _lookup(self, deadline: float | None, *, cached: bool) -> ServerInfo:
        """The server's info: the latest this client learnt (``cached``, once there is one) or a
        lookup's within ``deadline``, which the threads that ask while it runs share (:mod:`lossd_client.flight`)."""
        flights = self._flights
        while True:  # again only after a flight failed by its leader's own doing (SingleFlight.answer)
            with flights.lock:
                if cached and flights.last is not None:
                    return flights.last
                flight, lead = flights.join(deadline, threading.Event)
            if lead:
                return self._lead(flight)
            if not flight.landed.wait(remaining(deadline)):
                raise deadline_exceeded()
            answer = flights.answer(flight, deadline)
            if answer is not AGAIN:
                return answer

    def _lead(self, flight: Flight) -> ServerInfo:
        """Ask the server for ``flight`` (within its deadline) and land the answer or the failure."""
        info, error = None, None
        try:
            with rpc_errors():
                info = core.server_info(self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=remaining(flight.deadline)))
            return info
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._flights.lock:
                self._flights.land(flight, info, error)
            flight.landed.set()

    def _run(
        self,
        build: Callable[[], LossRequest],
        timeout_s: float | None,
        finish: Callable[[EvaluateResult, LossRequest], Any],
        fields: Mapping[str, str] | None = None,
    ) -> Any:
        with caller_fields(fields):
            request = build()
            return finish(self.evaluate(request, timeout_s=timeout_s), request)

    def _compare(self, inputs: compare.CompareInputs, deadline: float | None, progress: Callable[[int], None] | None) -> CompareResult:
        with caller_fields(compare.CALLER_FIELDS):
            inputs = compare.with_token_ids(inputs)
            if compare.needs_server_limit(inputs, self._server_max):
                self._lookup(deadline, cached=True)
            call, rpc = self._compare_call(inputs, progress)
            with rpc_errors():
                return call.parse(rpc(call.request, timeout=remaining(deadline)))


def _chunked(connections: Sequence[Connection], streams: Sequence[Iterator[bytes]], deadline: float | None) -> list[pb.EvaluateResponse]:
    """One EvaluateChunked call per stream, all at once, each over its own connection and within
    the one ``deadline``; their answers in order."""
    if len(streams) == 1:
        return [connections[0].evaluate_chunked(streams[0], timeout=remaining(deadline))]
    futures = [c.evaluate_chunked.future(s, timeout=remaining(deadline)) for c, s in zip(connections, streams, strict=True)]
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:
            f.cancel()  # the others, when one failed


class _Streams:
    """The calls of a blocking ``evaluate_many``, one per stream (lane), each read by a thread of
    its own into the inbox; a stream that gave way is replaced only when requests wait for one
    (see :mod:`lossd_client.lanes`)."""

    def __init__(
        self,
        connections: Sequence[Connection],
        method: str,
        feeder: _Feeder,
        outbox: _Outbox,
        deadline: float | None,
        inbox: queue.SimpleQueue,
    ) -> None:
        self._connections = connections
        self._method = method
        self._feeder = feeder
        self._outbox = outbox
        self._deadline = deadline
        self._inbox = inbox
        self._calls: list[Any] = []

    def open(self, lane: int) -> None:
        """Open stream ``lane``: its requests are the feeder's messages for it."""
        rpc = connection_of(lane, self._connections).streams[self._method]
        call = rpc(self._feeder.messages(lane), timeout=remaining(self._deadline))
        self._calls.append(call)
        threading.Thread(target=_read, args=(call, lane, self._inbox), daemon=True, name="lossd-evaluate-many").start()

    def responses(self) -> Iterator[Any]:
        """The responses of every stream as they come, until nothing is left to send or to wait
        for; a stream's error is raised here (a give-way only past MAX_RESENDS)."""
        outbox = self._outbox
        while not outbox.done():
            response, lane = outbox.settle(self._inbox.get())
            if response is not None:
                yield response
            elif lane is not None:
                self.open(lane)

    def cancel(self) -> None:
        for call in self._calls:
            call.cancel()


def _read(call: Any, lane: int, inbox: queue.SimpleQueue) -> None:
    """A stream's reader thread: its responses, its failure and its end, into ``inbox``."""
    try:
        for message in call:
            inbox.put(core.Merge.message(message))
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer
        inbox.put(core.Merge.failed(exc, lane))
    inbox.put(core.Merge.end(lane))


class _Outbox:
    """The requests queued for a blocking ``evaluate_many``'s streams: :class:`~lossd_client.lanes.Lanes`
    under one lock, shared by the producer thread (:meth:`put`), each stream's request iterator
    (:meth:`batch`, on a gRPC thread) and the consumer (:meth:`settle`, :meth:`answered`)."""

    def __init__(self, lanes: Lanes, inbox: queue.SimpleQueue) -> None:
        self._lanes = lanes
        self._merge = core.Merge(lanes)
        self._inbox = inbox
        self._ready = threading.Condition()
        self._stopped = False

    def put(self, request: core.Encoded) -> None:
        with self._ready:
            ask = self._lanes.put(request)
            self._ready.notify()
        if ask:
            self._inbox.put(core.Merge.LANE)

    def end(self) -> None:
        """The source has ended: each stream half-closes once nothing is queued."""
        with self._ready:
            self._lanes.end()
            self._ready.notify_all()
        self._inbox.put(core.Merge.WAKE)

    def pause(self, paused: bool) -> None:
        """:meth:`~lossd_client.lanes.Lanes.pause` (True) or resume (False)."""
        with self._ready:
            if paused:
                self._lanes.pause()
                self._ready.notify_all()
            else:
                self._lanes.resume()

    def stop(self) -> None:
        """The consumer is gone: every stream's iterator ends."""
        with self._ready:
            self._stopped = True
            self._ready.notify_all()

    def batch(self, lane: int, full: Callable[[list], bool]) -> list[core.Encoded]:
        """Stream ``lane``'s next message's requests (waited for); [] when the stream is to end."""
        with self._ready:
            while not self._stopped:
                batch = self._lanes.take(lane, full)
                if batch is not None:
                    return batch
                self._ready.wait()
            return []

    def answered(self, responses: Sequence[pb.EvaluateResponse]) -> None:
        if responses:
            with self._ready:
                self._lanes.answered(responses)

    def settle(self, item: tuple[str, Any]) -> tuple[Any | None, int | None]:
        """An inbox item: (the response it carries, None), or (None, a stream to open now or None)."""
        with self._ready:
            response = self._merge.take(item)
            if response is not None:
                return response, None
            self._ready.notify_all()  # a closed stream's iterator ends; requests put back are taken
            return None, self._lanes.wanted()

    def done(self) -> bool:
        with self._ready:
            return self._lanes.done


class _Alone:
    """What evaluate_many does with an item too large for one message: routes it as ``evaluate()``
    does (EvaluateChunked), in the feeder's thread, and settles its answer in the stream."""

    def __init__(self, client: LossClient, stream: core.Stream, deadline: float | None, inbox: queue.SimpleQueue, outbox: _Outbox) -> None:
        self._client = client
        self._stream = stream
        self._deadline = deadline  # evaluate_many's, shared by its items
        self._inbox = inbox
        self._outbox = outbox

    def limit(self, req: LossRequest) -> int | None:
        """The server's message limit when ``req`` is too large to go without it (asked once per client)."""
        client = self._client
        if core.needs_server_limit(req, shared_memory=False, server_max=client._server_max):
            client._lookup(self._deadline, cached=True)
        return client._server_max

    def evaluate(self, req: LossRequest) -> None:
        """Evaluate ``req`` alone, this call's streams half-closed meanwhile (Lanes.pause); its
        answer (or its LossdError) is settled in the stream."""
        self._outbox.pause(True)
        try:
            answer: EvaluateResult | LossdError = self._client._evaluate(req, self._deadline)
        except LossdError as exc:
            answer = exc
        finally:
            self._outbox.pause(False)
        self._stream.settle(req.id, answer)
        self.settled()

    def settled(self) -> None:
        """Wake the reader: the client answered an item itself (evaluated alone, or rejected)."""
        self._inbox.put(core.Merge.message(core.SETTLED))


class _Feeder:
    """The request side of a blocking ``evaluate_many``. A producer thread takes an item from the
    source while one of the ``window`` slots is free, numbers it and queues its request; each
    stream's request iterator (run by gRPC's own thread, one per stream) sends a message as soon
    as one request is queued, packed with the others queued by then (up to ``stream.pack`` or
    PACK_BYTES): it never waits on the source for more of the same message, so a slow source's
    requests go out one by one and a fast one's fill the packs (the producer queues them while
    the previous message is being sent)."""

    def __init__(self, source: Iterator[Any], stream: core.Stream, alone: _Alone, outbox: _Outbox) -> None:
        self._source = source
        self._stream = stream
        self._alone = alone
        self._outbox = outbox
        self._slots = threading.Semaphore(stream.window)
        self._stopped = threading.Event()
        self._producer = threading.Thread(target=self._produce, daemon=True, name="lossd-evaluate-many-source")

    def start(self) -> None:
        """Start taking items from the source."""
        self._producer.start()

    def messages(self, lane: int) -> Iterator[bytes]:
        """Stream ``lane``'s messages; ends with the source, when stopped, after a failure, or
        once the stream gave way."""
        while batch := self._outbox.batch(lane, self._stream.full):
            yield self._stream.message(batch)

    def _produce(self) -> None:
        """The producer thread: queue requests while slots are free, then the end (source ended,
        failed, or stopped)."""
        try:
            while self._slot():
                msg = self._take()
                if msg is None:
                    break
                self._outbox.put(msg)
        finally:
            self._outbox.end()

    def _take(self) -> core.Encoded | None:
        """The next item's request, numbered; None at the end of the source, after a failure or when
        stopped. Items the client answers itself (rejected, or evaluated alone) need no message and
        keep the slot."""
        while not self._stopped.is_set():
            try:
                item = next(self._source, _END)
                if item is _END:
                    return None
                msg = self._stream.request(item)
                if isinstance(msg, LossRequest):
                    msg = self._stream.place(msg, self._alone.limit(msg))
                if isinstance(msg, LossRequest):
                    self._alone.evaluate(msg)
                elif msg is core.REJECTED:
                    self._alone.settled()
                else:
                    return msg
            except Exception as exc:  # noqa: BLE001 - the caller's iterator (or the limit's call) failed: raised after the answers before it
                self._stream.fail(exc)
                return None
        return None

    def _slot(self) -> bool:
        """Wait for a free window slot; False once stopped."""
        self._slots.acquire()
        return not self._stopped.is_set()

    def release(self, answers: int) -> None:
        """Free a slot per answer received."""
        if answers:
            self._slots.release(answers)

    def stop(self) -> None:
        """The reader is gone: take no more items, end the request iterators and the producer."""
        self._stopped.set()
        self._slots.release()  # wakes the producer if it waits for a slot
        self._outbox.stop()


_END = object()

from .aio import AsyncLossClient  # noqa: E402 - re-exported: `from lossd_client.client import AsyncLossClient` keeps working
