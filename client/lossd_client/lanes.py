"""The streams of one ``evaluate_many`` ("lanes"), without the I/O: the requests queued for them,
which requests each one carries unanswered, and what to do when the server ends one that gave way.

Each open stream holds a read's reservation of the server's memory budget for its next message.
While other calls wait in line for memory, the server ends a stream whose client completed no
message for ``idle_read_yield_s`` (RESOURCE_EXHAUSTED, with :data:`GAVE_WAY_KEY` in its trailing
metadata): a slow source, a source that waits for each result while its requests go to another
stream, or an item sent alone (EvaluateChunked) while this call's own streams hold the reads it
waits for. That is the server's flow control, not the caller's failure: the requests that stream
carried unanswered go back to the front of the queue (evaluation has no side effects), and a new
stream is opened only when requests are queued and no stream is open to take them, so a source
that is idle gives its reads to the others until it has something to send. A request sent again
:data:`MAX_RESENDS` times raises the give-way.

The sync client guards a :class:`Lanes` with one lock (its streams' request iterators run on
gRPC's threads); the async client uses it from the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

#: The trailing metadata key of a call the server ended because it gave way (its value names the
#: setting, ``idle_read_yield_s``).
GAVE_WAY_KEY = "lossd-gave-way"
#: How many times one request is sent again after streams that carried it gave way.
MAX_RESENDS = 3


def gave_way(exc: BaseException) -> bool:
    """Whether ``exc`` is the status of a call the server ended because it gave way."""
    if not isinstance(exc, grpc.RpcError):
        return False
    try:
        code, trailing = exc.code(), exc.trailing_metadata()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an RpcError that is not a call's status
        return False
    return status_gave_way(code, trailing)


def status_gave_way(code: grpc.StatusCode, trailing: Iterable[tuple[str, Any]] | None) -> bool:
    """Whether a call that ended with ``code`` and ``trailing`` metadata gave way."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(key == GAVE_WAY_KEY for key, _ in trailing or ())


class Lanes:
    """The queue and the streams of one ``evaluate_many``.

    The client :meth:`put` each request (True: ask for a new stream, none is open to take it),
    opens :meth:`wanted` streams, and each stream :meth:`take` s a message's requests. Every answer
    goes to :meth:`answered`; a stream's end to :meth:`ended`, after :meth:`gave_way` when the
    server ended it because it gave way. The call is over once :attr:`done`.
    """

    def __init__(self, streams: int) -> None:
        self.open: list[int] = list(range(streams))  # the streams that take requests, oldest first
        self.alive = streams  # streams whose call has not ended
        self.source_ended = False
        self._queue: deque = deque()
        self._carried: dict[str, tuple[int, Any]] = {}  # id -> (stream, request) sent and not answered
        self._load = dict.fromkeys(self.open, 0)  # requests each open stream carries unanswered
        self._resent: dict[str, int] = {}
        self._made = streams  # the next stream's number
        self._asked = False  # a new stream was asked for and not yet opened
        self._paused = False  # streams end once the queue is empty, as at the source's end (see pause())

    @property
    def queued(self) -> bool:
        """Whether requests wait to be sent."""
        return bool(self._queue)

    @property
    def carrying(self) -> bool:
        """Whether requests were sent and not answered."""
        return bool(self._carried)

    @property
    def done(self) -> bool:
        """No stream left, and nothing left to send or to wait for."""
        return not self.alive and self.source_ended and not self._queue and not self._carried

    def put(self, request: Any) -> bool:
        """Queue a request to send; True when a new stream must be asked for (none is open)."""
        self._queue.append(request)
        return self._ask()

    def end(self) -> None:
        """The source has no more requests: each stream ends once the queue is empty."""
        self.source_ended = True

    def pause(self) -> None:
        """Each stream ends once it has sent what is queued, until :meth:`resume` (the next
        request then asks for a new stream). For an item sent alone (EvaluateChunked): an open
        stream holds a read's reservation on the server, so this call's own streams made that
        item's reads wait in line until they gave way (``idle_read_yield_s``, 2 s by default)
        on a budget of few reads; a half-closed stream holds none while its answers come."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def take(self, lane: int, full: Callable[[list], bool]) -> list | None:
        """The next message's requests for stream ``lane`` (up to ``full``), recorded as carried by
        it; [] when the stream is to end (it was closed, or the source ended and nothing is
        queued); None when it must wait for a request."""
        if lane not in self._load:
            return []
        queue = self._queue
        if not queue:
            if self.source_ended or self._paused:
                self.close(lane)
                return []
            return None
        batch: list = []
        while queue:
            batch.append(queue.popleft())
            if full(batch):
                break
        carried = self._carried
        for request in batch:
            carried[request.id] = (lane, request)
        self._load[lane] += len(batch)
        return batch

    def answered(self, responses: Iterable[Any]) -> None:
        """Responses received (matched by id; an unknown id is left to the caller's check)."""
        carried, load = self._carried, self._load
        for response in responses:
            got = carried.pop(response.id, None)
            if got is not None and got[0] in load:
                load[got[0]] -= 1
        if self._resent:
            for response in responses:
                self._resent.pop(response.id, None)

    def close(self, lane: int) -> None:
        """Stream ``lane`` takes no more requests (it is half-closed, or its call ended)."""
        if self._load.pop(lane, None) is not None:
            self.open.remove(lane)

    def gave_way(self, lane: int, exc: BaseException) -> None:
        """The server ended stream ``lane`` because it gave way (``exc``): what it carried
        unanswered goes back to the front of the queue, in order; ``exc`` is raised when one of
        those requests has been sent again :data:`MAX_RESENDS` times already."""
        self.close(lane)
        again = [(rid, request) for rid, (carrier, request) in self._carried.items() if carrier == lane]
        for rid, _ in again:
            times = self._resent.get(rid, 0) + 1
            if times > MAX_RESENDS:
                raise exc
            self._resent[rid] = times
            del self._carried[rid]
        self._queue.extendleft(request for _, request in reversed(again))

    def ended(self, lane: int) -> None:
        """Stream ``lane``'s call is over (answered OK, failed, or gave way)."""
        self.close(lane)
        self.alive -= 1

    def wanted(self) -> int | None:
        """A new stream's number when one must be opened now (requests are queued and no stream
        is open to take them), marked open; None otherwise."""
        self._asked = False
        if not self._queue or self.open:
            return None
        lane = self._made
        self._made += 1
        self.open.append(lane)
        self._load[lane] = 0
        self.alive += 1
        return lane

    def least_loaded(self) -> int | None:
        """The open stream carrying the fewest requests (the oldest of those); None when none is open."""
        return min(self.open, key=self._load.__getitem__) if self.open else None

    def _ask(self) -> bool:
        if self.open or self._asked:
            return False
        self._asked = True
        return True


def connection_of(lane: int, connections: Sequence[Any]) -> Any:
    """The connection stream ``lane`` goes over: stream k over connection k, new streams in turn."""
    return connections[lane % len(connections)]
