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
        to whichever stream asks for the next one).
        """
        stream, connections = self._stream(window, pack, return_exceptions)
        deadline, inbox = deadline_of(self._timeout(timeout_s)), queue.SimpleQueue()
        if core.needs_limit_before_streams(self._server_max):
            self._lookup(deadline, cached=True)
        feeder = _Feeder(iter(requests), stream, _Alone(self, stream, deadline, inbox))
        calls = [c.streams[stream.method](feeder.messages(), timeout=remaining(deadline)) for c in connections]
        feeder.start()
        try:
            with rpc_errors():
                for message in _merged(calls, inbox):
                    answers = stream.answers(message)
                    feeder.release(len(answers))
                    yield from stream.ready(answers)
            yield from stream.ready()
            stream.finish()
        finally:
            feeder.stop()
            for call in calls:
                call.cancel()

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


def _merged(calls: Sequence[Any], inbox: queue.SimpleQueue) -> Iterator[Any]:
    """The responses of the response-streaming calls as they come, read into ``inbox`` by a thread
    per call (the feeder puts :data:`core.SETTLED` there too, so that an answer the client made
    itself wakes the reader); a call's error is raised here."""

    def read(call: Any) -> None:
        try:
            for message in call:
                inbox.put(core.Merge.message(message))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            inbox.put(core.Merge.failed(exc))
        inbox.put(core.Merge.END)

    for call in calls:
        threading.Thread(target=read, args=(call,), daemon=True, name="lossd-evaluate-many").start()
    merge = core.Merge(len(calls))
    while merge.open:
        if (message := merge.take(inbox.get())) is not None:
            yield message


class _Alone:
    """What evaluate_many does with an item too large for one message: routes it as ``evaluate()``
    does (EvaluateChunked), in the feeder's thread, and settles its answer in the stream."""

    def __init__(self, client: LossClient, stream: core.Stream, deadline: float | None, inbox: queue.SimpleQueue) -> None:
        self._client = client
        self._stream = stream
        self._deadline = deadline  # evaluate_many's, shared by its items
        self._inbox = inbox

    def limit(self, req: LossRequest) -> int | None:
        """The server's message limit when ``req`` is too large to go without it (asked once per client)."""
        client = self._client
        if core.needs_server_limit(req, shared_memory=False, server_max=client._server_max):
            client._lookup(self._deadline, cached=True)
        return client._server_max

    def evaluate(self, req: LossRequest) -> None:
        """Evaluate ``req`` alone; its answer (or its LossdError) is settled in the stream."""
        try:
            answer: EvaluateResult | LossdError = self._client._evaluate(req, self._deadline)
        except LossdError as exc:
            answer = exc
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

    def __init__(self, source: Iterator[Any], stream: core.Stream, alone: _Alone) -> None:
        self._source = source
        self._stream = stream
        self._alone = alone
        self._slots = threading.Semaphore(stream.window)
        self._stopped = threading.Event()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._producer = threading.Thread(target=self._produce, daemon=True, name="lossd-evaluate-many-source")

    def start(self) -> None:
        """Start taking items from the source."""
        self._producer.start()

    def messages(self) -> Iterator[bytes]:
        """The stream's messages; ends with the source, when stopped, or after a failure."""
        while batch := self._batch():
            yield self._stream.message(batch)

    def _batch(self) -> list[core.Encoded]:
        """The first queued request (waited for) and those queued behind it, up to a full message."""
        batch: list[core.Encoded] = []
        msg = self._queue.get()
        while msg is not _END and not self._stopped.is_set():
            batch.append(msg)
            if self._stream.full(batch):
                return batch
            try:
                msg = self._queue.get_nowait()
            except queue.Empty:
                return batch
        self._queue.put(_END)  # for the other streams' iterators
        return [] if self._stopped.is_set() else batch

    def _produce(self) -> None:
        """The producer thread: queue requests while slots are free, then _END (source ended,
        failed, or stopped)."""
        try:
            while self._slot():
                msg = self._take()
                if msg is None:
                    break
                self._queue.put(msg)
        finally:
            self._queue.put(_END)

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
        self._queue.put(_END)


_END = object()

from .aio import AsyncLossClient  # noqa: E402 - re-exported: `from lossd_client.client import AsyncLossClient` keeps working
