"""One memory budget for every byte the server holds for its callers.

Every RPC reserves before it holds: the worst-case size of a message before reading it (so
that gRPC's transport never receives more than the budget allows: a call that is not read
holds at most ``transport_window_bytes``), then the message's real size, the answer it will
produce and what the engine keeps for it. A reservation that can never fit is refused at once
(:class:`BudgetExceeded`, answered RESOURCE_EXHAUSTED naming ``memory_budget_bytes``); one that
does not fit *now* waits in line (FIFO), which pauses the caller's stream: that is the flow
control. Everything here runs on the event loop's thread.

A read reservation is held from the moment the read is posted, so a call whose client sends
nothing would hold it for as long as its idle timeout allows, and enough such calls would make
every other call wait. While calls wait in line, calls that have waited ``idle_read_yield_s``
for their client's next message give their read reservation up (the call ends
RESOURCE_EXHAUSTED), oldest first and only as many as the line needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Executor
from typing import Protocol, TypeVar

SETTING = "memory_budget_bytes"
#: The caller of reservations that grow what a call in progress holds (:meth:`Reservation.grow`):
#: served before the callers that take turns (see MemoryBudget._grant).
GROWING = "calls in progress"
WAIT_SETTING = "max_memory_wait_s"
YIELD_SETTING = "idle_read_yield_s"
T = TypeVar("T")


class IdleReader(Protocol):
    """A call holding a read reservation while it waits for its client's next message."""

    def idle_for(self, now: float) -> float | None:
        """Seconds its client has sent nothing it could send; None while it rightly waits (for
        the server's answers)."""

    def give_way(self, reason: str) -> None:
        """End the read at once with ``reason`` (BudgetExceeded), releasing its reservation."""


class BudgetExceeded(Exception):
    """A reservation the budget cannot hold; the message names the setting."""


class GaveWay(BudgetExceeded):
    """A call's read gave its reservation to calls in line (see :meth:`MemoryBudget._sweep_idle_readers`):
    RESOURCE_EXHAUSTED with :data:`GAVE_WAY_KEY` in its trailing metadata, since its client may
    send what it had not sent again on a new call (lossd's client does, for ``evaluate_many``)."""


#: The trailing metadata key of a call that gave way (:class:`GaveWay`), so that a client tells it
#: from the other RESOURCE_EXHAUSTED without reading the details; the value is the setting's name.
GAVE_WAY_KEY = "lossd-gave-way"


def limit_named(limit_bytes: int, share_of: tuple[int, int] | None = None) -> str:
    """How refusals name the budget: ``memory_budget_bytes=N``; or, for a worker of ``--workers N``
    (``share_of``: the configured budget and the number of workers), this worker's share of it with
    both numbers: the share alone is neither the flag's value nor said to be a share."""
    if share_of is None:
        return f"{SETTING}={limit_bytes}"
    configured, workers = share_of
    rounded = "" if configured % workers == 0 else ", rounded down"
    return f"this worker's share of {SETTING} ({limit_bytes} = {configured} / {workers} workers{rounded})"


class MemoryBudget:
    """Reservations against ``limit_bytes``; ``held_bytes`` and ``peak_bytes`` for metrics and tests.
    ``share_of``: (configured budget, workers) when ``limit_bytes`` is a worker's share (:func:`limit_named`).
    ``named``: how refusals name a budget that is not memory_budget_bytes (the health reads')."""

    def __init__(
        self,
        limit_bytes: int,
        *,
        idle_read_yield_s: float = 0.0,
        on_yield: Callable[[], None] | None = None,
        share_of: tuple[int, int] | None = None,
        named: str | None = None,
    ) -> None:
        self.limit_bytes = int(limit_bytes)
        #: The budget as the refusals name it.
        self.limit_named = named or limit_named(self.limit_bytes, share_of)
        self.held_bytes = 0
        self.peak_bytes = 0
        self.idle_read_yield_s = idle_read_yield_s  # 0: reads never give way
        self._on_yield = on_yield
        # per caller (its connection), in order: (bytes wanted, future, bytes the waiting call
        # already holds, what it is for, caller); the callers take turns (see _grant)
        self._lines: dict[Hashable, deque[tuple[int, asyncio.Future, int, str, Hashable]]] = {}
        self._readers: dict[IdleReader, Reservation] = {}  # posted reads, oldest first
        self._sweep: asyncio.Handle | None = None

    @property
    def waiting(self) -> int:
        """Reservations waiting in line."""
        return sum(len(line) for line in self._lines.values())

    def _waiters(self) -> Iterator[tuple[int, asyncio.Future, int, str, Hashable]]:
        """Everyone in line, callers in turn order."""
        for line in list(self._lines.values()):
            yield from list(line)

    def _leave(self, entry: tuple[int, asyncio.Future, int, str, Hashable]) -> None:
        line = self._lines.get(entry[4])
        if line is not None:
            with contextlib.suppress(ValueError):
                line.remove(entry)
            if not line:
                del self._lines[entry[4]]

    def _held_by(self, holding: int) -> str:
        """Who holds the budget's bytes: ``holding`` of them the asking call, the others other
        calls or the asking call's other messages (a stream's items, a chunk being computed)."""
        others = f"{self.held_bytes - holding} of {self.limit_named} are held for other calls (or this call's other messages)"
        return f"{others} and {holding} already by this call" if holding else others

    def _exceeded(self, nbytes: int, what: str, holding: int = 0) -> BudgetExceeded:
        """``nbytes`` do not fit now or ever; ``holding``: what the asking call already holds
        (counted in ``held_bytes``), named apart from what other calls hold."""
        if nbytes + holding <= self.limit_bytes:
            more = " more" if holding else ""
            return BudgetExceeded(f"{what} needs {nbytes}{more} bytes of server memory; {self._held_by(holding)}")
        if holding:
            return BudgetExceeded(
                f"{what} needs {nbytes} bytes of server memory while its call holds {holding}: together more than "
                f"{self.limit_named} allows; split it into smaller requests"
            )
        return BudgetExceeded(
            f"{what} needs {nbytes} bytes of server memory, more than {self.limit_named} allows; split it into smaller requests"
        )

    def _take(self, nbytes: int) -> None:
        self.held_bytes += nbytes
        if self.held_bytes > self.peak_bytes:
            self.peak_bytes = self.held_bytes

    def _fits(self, nbytes: int) -> bool:
        return self.held_bytes + nbytes <= self.limit_bytes

    def empty(self) -> Reservation:
        """A reservation of nothing yet, to grow with :meth:`Reservation.resize`."""
        return Reservation(self, 0)

    def reserve_now(self, nbytes: int, what: str) -> Reservation:
        """Reserve at once or raise :class:`BudgetExceeded` (never waits, never jumps the line)."""
        if self._lines or not self._fits(nbytes):
            raise self._exceeded(nbytes, what)
        self._take(nbytes)
        return Reservation(self, nbytes)

    async def reserve(
        self,
        nbytes: int,
        what: str,
        *,
        timeout_s: float | None = None,
        holding: int = 0,
        caller: Hashable | Callable[[], Hashable] = None,
    ) -> Reservation:
        """Reserve, waiting in line for other calls to release; BudgetExceeded when it can never
        fit or is still waiting after ``timeout_s``. ``holding``: what the caller already holds
        while it waits and keeps until it is served (see :meth:`Reservation.grow`; a chunked
        call's header while it reads its next chunk, see Call.hold); it counts for the deadlock
        check of :meth:`_grant`. ``caller``: who asks (a connection), or a
        function that says it, called only when the reservation must wait in line; the callers in
        line take turns, each in its own order."""
        if nbytes + holding > self.limit_bytes:
            raise self._exceeded(nbytes, what, holding)
        if not self._lines and self._fits(nbytes):
            self._take(nbytes)
            return Reservation(self, nbytes)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        if callable(caller):
            caller = caller()
        entry = (nbytes, waiter, holding, what, caller)
        self._lines.setdefault(caller, deque()).append(entry)
        if self._sweep is None and self.idle_read_yield_s > 0:
            self._sweep = loop.call_soon(self._sweep_idle_readers)
        if holding:
            self._grant()  # nobody else may hold anything: then it cannot wait
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give(nbytes)  # granted as we gave up: hand it back
            else:
                waiter.cancel()
                self._leave(entry)
                self._grant()
            if isinstance(exc, TimeoutError):
                raise BudgetExceeded(
                    f"{what} waited {timeout_s:g}s ({WAIT_SETTING}, or the call's deadline if sooner) for {nbytes} bytes of server memory; "
                    f"{self._held_by(holding)}"
                ) from None
            raise
        return Reservation(self, nbytes)

    # ------------------------------------------------------------------ idle reads give way
    def read_posted(self, reader: IdleReader, held: Reservation) -> None:
        """``reader`` has posted a read with ``held`` reserved for it; until :meth:`read_done`
        it may be asked to give way."""
        self._readers[reader] = held

    def read_done(self, reader: IdleReader) -> None:
        self._readers.pop(reader, None)

    def _sweep_idle_readers(self) -> None:
        """While calls wait in line: end the reads idle for idle_read_yield_s, oldest first,
        until what they hold covers what the line waits for; again every quarter of that."""
        self._sweep = None
        line = sum(nbytes for nbytes, waiter, *_ in self._waiters() if not waiter.done())
        if not line:
            return
        short = line - (self.limit_bytes - self.held_bytes)
        now = time.monotonic()
        for reader, held in list(self._readers.items()):
            if short <= 0:
                break
            idle = reader.idle_for(now)
            if idle is None or idle < self.idle_read_yield_s:
                continue
            del self._readers[reader]
            short -= held.nbytes
            reader.give_way(
                f"this call gave way after its client completed no message for {idle:.1f}s ({YIELD_SETTING}={self.idle_read_yield_s:g}) "
                f"while other calls were in line for server memory: its read reservation of {held.nbytes} bytes of "
                f"{self.limit_named} went to them; send the message promptly, or retry"
            )
            if self._on_yield is not None:
                self._on_yield()
        self._sweep = asyncio.get_running_loop().call_later(self.idle_read_yield_s / 4, self._sweep_idle_readers)

    def _refuse_a_deadlocked_grower(self) -> None:
        live = [entry for entry in self._waiters() if not entry[1].done()]
        if self.held_bytes > sum(entry[2] for entry in live):
            return  # calls not in line hold bytes: they will release them
        for entry in live:
            nbytes, waiter, holding, what, _ = entry
            if holding:
                self._leave(entry)
                waiter.set_exception(
                    BudgetExceeded(
                        f"{what} needs {nbytes} more bytes of server memory; all {self.held_bytes} held of "
                        f"{self.limit_named} belong to calls waiting for more ({holding} to this one), so it cannot wait"
                    )
                )
                return

    def _give(self, nbytes: int) -> None:
        self.held_bytes -= nbytes
        self._grant()

    def _grant(self) -> None:
        """Serve the line: the callers in turn, each caller's waiters in order; a waiter that
        gave up (cancelled, timed out) leaves it. Only the next waiter is ever served (one that
        does not fit holds the others up): order is never given up for bytes. Taking turns, one
        connection's calls cannot keep another's waiting behind all of them (500 idle streams on
        4 connections made a good call wait 22 s, 2,000 made it fail after 60 s). Calls in
        progress that grow what they hold (an answer's bytes) go first: they release it all when
        done, while behind a new read that did not fit they were refused as deadlocked (48
        clients uploading 8-60 MiB requests on a budget of 3 reads: 848 of 902 refused).

        A call may wait while it holds bytes (to grow them by its answer's; a chunked call to
        read its next chunk, keeping its header): when every byte held belongs to calls in line,
        nothing will be released, so the first of them that holds any is refused instead of
        waiting for itself (its release, when its call ends, serves the others). Two chunked
        calls whose headers left less than one read free between them each waited for the other
        to read, and every call behind them waited max_memory_wait_s."""
        while self._lines:
            caller = GROWING if GROWING in self._lines else next(iter(self._lines))
            line = self._lines[caller]
            nbytes, waiter, *_ = line[0]
            if waiter.done():
                self._leave(line[0])
                continue
            if not self._fits(nbytes):
                self._refuse_a_deadlocked_grower()
                return
            line.popleft()
            del self._lines[caller]
            if line:
                self._lines[caller] = line  # to the back: the next caller is served next
            self._take(nbytes)
            waiter.set_result(None)


class Reservation:
    """Bytes held for one purpose; resize as the call learns what it holds, release when done."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def resize(self, nbytes: int, what: str) -> None:
        """Grow (BudgetExceeded if it does not fit now) or shrink to ``nbytes``."""
        budget = self._budget
        delta = nbytes - self.nbytes
        if delta > 0:
            if not budget._fits(delta):
                raise budget._exceeded(delta, what, self.nbytes)
            budget._take(delta)
        elif delta < 0:
            budget._give(-delta)
        self.nbytes = nbytes

    async def grow(self, nbytes: int, what: str, *, timeout_s: float | None = None) -> None:
        """Grow to ``nbytes``, waiting in line (keeping what it holds) when that does not fit now,
        as :meth:`MemoryBudget.reserve` waits; shrink at once."""
        delta = nbytes - self.nbytes
        if delta <= 0:
            self.resize(nbytes, what)
            return
        self.absorb(await self._budget.reserve(delta, what, timeout_s=timeout_s, holding=self.nbytes, caller=GROWING))

    def absorb(self, other: Reservation) -> None:
        """Take over ``other``'s bytes (the budget's total is unchanged)."""
        self.nbytes += other.nbytes
        other.nbytes = 0

    def moved(self) -> Reservation:
        """A new reservation holding this one's bytes (this one then holds none)."""
        other = Reservation(self._budget, 0)
        other.absorb(self)
        return other

    def release(self) -> None:
        if self.nbytes:
            nbytes, self.nbytes = self.nbytes, 0
            self._budget._give(nbytes)

    async def run_in_thread(self, fn: Callable[..., T], *args: object, executor: Executor | None = None) -> T:
        """``fn(*args)`` on a thread of ``executor`` (asyncio's default one when None), for work
        whose memory these bytes count. A cancelled caller cannot stop the thread: its bytes then
        move out of this reservation and stay counted until the thread ends. (Released at the
        cancel instead, the shared-memory copies of cancelled calls ran on outside the budget:
        8 callers cancelling 256 MiB copies took a server with a 1.2 GB budget to 2.9 GB of RSS.)"""
        return await self.kept_until_done(asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args)))

    async def kept_until_done(self, work: asyncio.Future[T]) -> T:
        """Await ``work`` (a thread's outcome); should the caller be cancelled first, these bytes
        move out of this reservation and stay counted until ``work`` ends."""
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if not work.done():
                kept = self.moved()
                work.add_done_callback(lambda done: (kept.release(), done.cancelled() or done.exception()))
            raise
