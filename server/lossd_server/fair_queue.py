"""The batcher's queue: bounded, and fair between callers. Pure: no torch, no asyncio.

Every queued item belongs to a caller, a key :func:`caller_key` derives from the call's peer as
``--fair-share-by`` says: its connection (the default), its address (every connection of a host
together), or one key for all (``off``).

*Order: fair queueing by work.* Each item is tagged, when it is pushed, with a virtual finish time:
its start (its caller's latest tag, or the queue's virtual time when that is later) plus its work
(``Plan.work_nbytes``; at least ``cost_floor``, the batcher's :data:`REQUEST_COST_FLOOR_BYTES`, the
engine's fixed cost of a request); items are taken in tag order, ties in the order their callers came to have
queued work, then in push order. Within a caller that is oldest first. Callers that all have work
queued are served the same work in turn, give or take one item's each (the work-weighted form of
round robin, as deficit round robin, without its quantum): a caller of 5 ms requests is not served
one of them per second-long request of another, its requests go in between theirs by work; with
equal work per item, k such callers are served one item each in every k items taken.

The virtual time follows the engine shared evenly by the callers with queued work: each item
taken advances it by its work divided by their number (itself included), never past the item's
tag (the approximation of fair queueing's fluid system by the callers queued now). A caller that
was not served lately starts at the virtual time, so its first item goes before the items of
callers whose turn it is after one item each: a 5 ms request waits for the item being computed,
not for one of each caller queued (with the tag of the item taken last as the virtual time,
self-clocked fair queueing, it waited behind those that shared that tag: in exp6 up to 3 kl_div
requests of 1-2 s each, past its 5 s deadline). A caller with nothing queued gets no credit for
the time it was idle: its latest tag is kept while it is ahead of the virtual time, so coming back
at once does not put it ahead of what it was served (a caller of one request at a time is served
by work as one with many queued), and callers that each send one request (a connection per call)
advance the virtual time as they are served, so they cannot keep a caller with work queued waiting.
A cancelled item's work still counts for its caller's later items. Pushing and taking cost
O(log n) in the items queued (a heap): no scan of the queue.

*Admission.* ``max_items`` and ``max_work`` bound the queue; an item alone in the queue is taken
whatever its work. When the queue is full (either limit), a newcomer whose caller, with it, stays
within its share of each limit that is full (the limit divided by the callers with queued work, the
newcomer's included) is admitted by pushing out the most recently queued items of the caller holding
the most (items, or work: as the limit; of those that hold as much, the one whose latest item came
last) until it fits; the items pushed out are returned with their
:class:`QueueFull`, for the batcher to answer. Any other newcomer is refused :class:`QueueFull` with
the same words as a queue without callers. The caller pushed from always holds more than its share
(the others hold more than the limit less the newcomer's share), so a caller within its share is
never refused while another is over its own. With one key for all (``off``) the order is first
come, first served and a full queue refuses: the queue as it was before callers had shares. Pushing
out costs a pass over the callers with queued work, only when the queue is full.

Each item carries ``work`` and ``rows`` (what the limits count); the queue keeps its
``waiting`` (True from its push until it is taken, pushed out or removed) and ``caller``.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, Protocol, TypeVar

SETTING = "fair_share_by"
#: Tags count work in units of 1/SCALE byte: the virtual time advances by fractions of an item's work.
SCALE = 1 << 16
#: The values of ``--fair-share-by``: a caller is a connection, a peer address, or everyone (off).
SHARE_BY = ("connection", "address", "off")
#: The least work a request is charged in the fair order (not in the limits, nor in a batch's
#: bytes): a request costs the engine a fixed amount whatever its bytes (its pass, its targets'
#: checks, its answer: 25-44 us for an 8x100 request, about what 256 KiB of logits take at the
#: engine's 7 GB/s). Charged only its bytes, a request of no work (an empty batch is a valid
#: request) left the virtual time where it was, and a caller sending such requests without pause
#: kept a heavy request of another caller waiting for ever (probe 24: a 64 MiB item still waiting
#: after 100,000 takes, in a simulation of the queue).
REQUEST_COST_FLOOR_BYTES = 256 * 1024


class QueueFull(Exception):
    """The bounded queue is full; ``limit`` names the setting that was hit."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class Queued(Protocol):
    work: int  # what max_work and a batch's max_bytes count
    rows: int  # what a batch's max_rows counts
    waiting: bool  # set by the queue: in it, not yet taken, pushed out or removed
    caller: Hashable  # set by the queue


T = TypeVar("T", bound=Queued)


def caller_key(peer: str | Callable[[], str] | None, share_by: str) -> Hashable:
    """The caller a call's work is queued for: its ``peer`` (gRPC's ``context.peer()``, such as
    ``ipv4:127.0.0.1:54321``; or a function that says it, called only when needed) by connection,
    the peer without its port by address (``ipv4:127.0.0.1``; other kinds of peer are kept whole),
    or None for every call (off)."""
    if share_by == "off" or peer is None:
        return None
    if callable(peer):
        peer = peer()
    if share_by == "address" and peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


#: A heap entry: (tag, the line's number, the item's number, item).
Entry = tuple[int, int, int, Any]


class _Line:
    """One caller's queued items, oldest first, as heap entries; items removed while queued stay
    until an end reaches them, or until they are most of the line (counted no more). ``number``: lines are numbered as they open, which
    orders callers whose items tie (equal work: every caller once in each round, in that order)."""

    __slots__ = ("count", "entries", "finish", "number", "work")

    def __init__(self, number: int, finish: int) -> None:
        self.entries: deque[Entry] = deque()
        self.number = number
        self.count = 0
        self.work = 0
        self.finish = finish  # the tag of its latest item


class FairQueue(Generic[T]):
    """See the module docstring. ``share_by`` only names the setting in messages."""

    def __init__(self, max_items: int, max_work: int, share_by: str = "connection", cost_floor: int = 0) -> None:
        self.max_items = max_items
        self.max_work = max_work
        self.share_by = share_by
        self.cost_floor = cost_floor  # the least work an item is charged in the order (REQUEST_COST_FLOOR_BYTES)
        self.count = 0  # items queued
        self.work = 0  # their work
        self._lines: dict[Hashable, _Line] = {}
        self._heap: list[Entry] = []  # every item queued, and some no longer (waiting False)
        self._seq = itertools.count()
        self._vtime = 0
        #: The latest tags of callers with nothing queued, while they may be ahead of the virtual
        #: time (swept when it grows past ``_idle_cap``).
        self._idle: dict[Hashable, int] = {}
        self._idle_cap = 64

    def __len__(self) -> int:
        return self.count

    @property
    def callers(self) -> int:
        """Callers with queued work."""
        return len(self._lines)

    def holds(self, caller: Hashable) -> tuple[int, int]:
        """The items and work ``caller`` has queued."""
        line = self._lines.get(caller)
        return (0, 0) if line is None else (line.count, line.work)

    def push(self, item: T, caller: Hashable) -> list[tuple[T, QueueFull]]:
        """Queue ``item`` for ``caller`` (QueueFull when it may not be): the items pushed out to make
        room for it, each with the error to answer it with; they are no longer queued."""
        line = self._lines.get(caller)
        pushed_out = self._make_room(caller, item.work) if self._must_make_room(line, item.work) else []
        if line is None:
            line = self._lines[caller] = _Line(next(self._seq), self._idle.pop(caller, 0))
        tag = max(self._vtime, line.finish) + self._cost(item)
        entry = (tag, line.number, next(self._seq), item)
        item.waiting, item.caller = True, caller
        line.entries.append(entry)
        line.count += 1
        line.work += item.work
        line.finish = tag
        self.count += 1
        self.work += item.work
        heapq.heappush(self._heap, entry)
        return pushed_out

    def remove(self, item: T) -> bool:
        """Take a queued item off (its caller went away); False when it was no longer queued."""
        if not item.waiting:
            return False
        item.waiting = False
        line = self._lines[item.caller]
        self._uncount(line, item)
        if line.count:
            _drop_removed(line)
        self._compact()
        return True

    def take(self, max_rows: int, max_bytes: int, *, one: bool = False) -> list[T]:
        """The next batch, taken off the queue in fair order: the next item always (however large),
        then the next ones while the batch stays within ``max_rows`` and ``max_bytes`` of work (no
        more when ``one``); the first that does not fit ends it."""
        batch: list[T] = []
        rows = work = 0
        heap = self._heap
        while heap:
            item = heap[0][-1]
            if not item.waiting:
                heapq.heappop(heap)
                continue
            if batch and (one or rows + item.rows > max_rows or work + item.work > max_bytes):
                break
            tag = heapq.heappop(heap)[0]
            self._vtime = min(self._vtime + self._cost(item) // len(self._lines), tag)  # the engine shared by the callers queued
            item.waiting = False
            line = self._lines[item.caller]
            entries = line.entries
            while entries and not entries[0][-1].waiting:  # items removed before it, then itself
                entries.popleft()
            self._uncount(line, item)
            batch.append(item)
            rows += item.rows
            work += item.work
        return batch

    def clear(self) -> list[T]:
        """Take every queued item off; they are returned, oldest tag first."""
        items = [entry[-1] for entry in sorted(self._heap) if entry[-1].waiting]
        for item in items:
            item.waiting = False
        self.count = self.work = 0
        self._reset()
        return items

    # ------------------------------------------------------------------ internals
    def _cost(self, item: T) -> int:
        """What ``item`` is charged in the order, in tag units."""
        return max(item.work, self.cost_floor) * SCALE

    def _uncount(self, line: _Line, item: T) -> None:
        line.count -= 1
        line.work -= item.work
        self.count -= 1
        self.work -= item.work
        if not line.count:
            del self._lines[item.caller]
            if not self.count:
                self._reset()
            elif line.finish > self._vtime:
                self._idle[item.caller] = line.finish
                if len(self._idle) > self._idle_cap:
                    self._idle = {caller: finish for caller, finish in self._idle.items() if finish > self._vtime}
                    self._idle_cap = max(64, 2 * len(self._idle))

    def _reset(self) -> None:
        """Nothing is queued: removed items' entries go, and virtual time starts again."""
        self._lines.clear()
        self._heap.clear()
        self._idle.clear()
        self._vtime = 0

    def _must_make_room(self, line: _Line | None, work: int) -> bool:
        """Whether the queue is full for an item of ``work`` from the caller of ``line``; QueueFull
        when it is and the caller would be over its share of a limit that is full."""
        full_items = self.count >= self.max_items
        full_work = self.count > 0 and self.work + work > self.max_work
        if not (full_items or full_work):
            return False
        have_items, have_work = (0, 0) if line is None else (line.count, line.work)
        callers = len(self._lines) + (line is None)
        if full_items and (have_items + 1) * callers > self.max_items:
            raise QueueFull("max_queue_requests", f"queue full: {self.count} requests queued (max_queue_requests={self.max_items})")
        if full_work and (have_work + work) * callers > self.max_work:
            raise QueueFull(
                "max_queue_bytes", f"queue full: {self.work} bytes queued, this request adds {work} (max_queue_bytes={self.max_work})"
            )
        return True

    def _make_room(self, caller: Hashable, work: int) -> list[tuple[T, QueueFull]]:
        """Push out the latest items of the callers holding the most until an item of ``work``
        from ``caller`` fits (:meth:`_must_make_room` said it may)."""
        pushed_out: list[tuple[T, QueueFull]] = []
        while self.count >= self.max_items:
            pushed_out.append(self._push_out(caller, "max_queue_requests"))
        while self.count and self.work + work > self.max_work:
            pushed_out.append(self._push_out(caller, "max_queue_bytes"))
        self._compact()
        return pushed_out

    def _push_out(self, caller: Hashable, limit: str) -> tuple[T, QueueFull]:
        """The latest item of the caller (not ``caller``) holding the most items (``limit``
        max_queue_requests) or work, taken off the queue, with its error."""
        by_work = limit == "max_queue_bytes"
        line = max(  # ties: the caller whose latest item came last
            (v for k, v in self._lines.items() if k != caller), key=lambda v: (v.work if by_work else v.count, v.entries[-1][2])
        )
        held, total, maximum = (line.work, self.work, self.max_work) if by_work else (line.count, self.count, self.max_items)
        callers = len(self._lines) + (caller not in self._lines)
        error = QueueFull(
            limit,
            f"queue full: this request was pushed out of the queue for a caller with less than its share ({SETTING}={self.share_by}): "
            f"its caller had {held} of the {total} {'bytes of work' if by_work else 'requests'} queued, the most of the {callers} "
            f"callers sharing {limit}={maximum}",
        )
        entries = line.entries
        while not entries[-1][-1].waiting:  # items removed after it
            entries.pop()
        tag, *_, item = entries.pop()
        item.waiting = False
        while entries and not entries[-1][-1].waiting:
            entries.pop()
        # its next item is tagged as if this one had never come (alone, as if served up to its start)
        line.finish = entries[-1][0] if entries else tag - self._cost(item)
        self._uncount(line, item)
        return item, error

    def _compact(self) -> None:
        """When the heap holds mostly items no longer queued (removed, pushed out), rebuild it without them."""
        if len(self._heap) > 2 * self.count + 64:
            self._heap = [entry for entry in self._heap if entry[-1].waiting]
            heapq.heapify(self._heap)


def _drop_removed(line: _Line) -> None:
    """Entries of items no longer queued go from the end of ``line`` (its latest is then queued,
    which the push-out's tie-break compares), and from everywhere once they are most of it: a
    caller whose oldest item waits while it sends and cancels others holds no more than twice its
    queued items (100,000 such cancels had left 100,001 entries, 21.5 MB, in probe 24)."""
    entries = line.entries
    while entries and not entries[-1][-1].waiting:
        entries.pop()
    if len(entries) > 2 * line.count + 16:
        line.entries = deque(entry for entry in entries if entry[-1].waiting)
