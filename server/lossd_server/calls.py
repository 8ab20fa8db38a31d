"""One RPC's reading, budget, liveness and idle timeout; streams answered with flow control.

A message is read only after the worst case of its size has been reserved from the
:class:`~lossd_server.budget.MemoryBudget`: twice gRPC's receive limit, for the transport's
buffer and its Python copy (until then the transport holds at most ``transport_window_bytes``
of the call); then the reservation shrinks to the real size. What a call keeps while it reads
on (a chunked call's header: :meth:`Call.hold`) must leave room for one read, and its reads wait
in line as holding it. A caller that sends (or reads) nothing for ``stream_idle_timeout_s`` is
answered DEADLINE_EXCEEDED; one that sends nothing while other calls wait in line for memory
gives its read reservation up sooner (see :mod:`~lossd_server.budget`).

A stream's reads keep nothing: its items' bytes go back once their answers are sent, whatever
its reads do, so a stream never waits for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from . import endings
from .batcher import stop_if_over
from .budget import BudgetExceeded, GaveWay, MemoryBudget, Reservation
from .config import ServerConfig
from .errors import StreamIdle, idle_message

#: An answer held by a stop (CallTracker.may_answer) goes out at least this long before its call's
#: deadline, and a quarter of the time it had left when it was held if that is more.
ANSWER_BEFORE_DEADLINE_S = 0.05


def answer_lead_s(left_s: float) -> float:
    """How long before its deadline, ``left_s`` away, a held answer goes out: 50 ms alone left 0.4 s
    calls held at a stop on a loaded machine no time for the event loop's lateness and the answer's
    trip (the client's deadline also started before the server's copy of it)."""
    return max(ANSWER_BEFORE_DEADLINE_S, left_s / 4)


#: What a read reserves, in the settings' words (ServerConfig.read_reservation_bytes).
READ_RESERVATION = "twice gRPC's receive limit, which max_message_bytes sets"


class CallTracker:
    """Calls in progress, for the drain: the server stops once gRPC is done with every one.

    Before gRPC's graceful stop the drain holds answers back (:meth:`hold_answers`) until no call
    has started for a moment (:meth:`wait_quiet`): gRPC's stop cancels (CANCELLED, which clients
    do not replay) every call its transport received that the event loop has not taken yet, and
    clients that call again as soon as they are answered keep such calls coming. Held, they send
    nothing new, and the event loop takes the calls already received.
    """

    def __init__(self) -> None:
        self.active = 0  # handlers running
        self.unfinished = 0  # calls gRPC is not done with: handlers running, or answers still being sent
        self.last_start = 0.0  # time.monotonic() of the latest start
        #: From then (time.monotonic()) this server's own stop cuts the calls still in progress (its
        #: grace is over, or it was told to stop now); None while it is not stopping.
        self.cut_from: float | None = None
        self._let_answer: asyncio.Event | None = None  # while answers are held: set when they may go

    def start(self, context: grpc.aio.ServicerContext) -> None:
        self.active += 1
        self.unfinished += 1
        self.note_start()
        context.add_done_callback(self._finished)

    def note_start(self) -> None:
        """A call started (lossd's own, or health / server info, which the drain does not wait for)."""
        self.last_start = time.monotonic()

    def end(self) -> None:
        self.active -= 1

    def _finished(self, _context: object) -> None:
        self.unfinished -= 1

    def cut_at(self, when: float) -> None:
        """This server's stop cuts the calls still in progress from ``when`` (time.monotonic())."""
        self.cut_from = when if self.cut_from is None else min(self.cut_from, when)

    def cutting(self) -> bool:
        """Whether a call cancelled now was cut by this server's stop: its client sees UNAVAILABLE
        (gRPC's "Cancelling all calls"), not CANCELLED."""
        return self.cut_from is not None and time.monotonic() >= self.cut_from

    def hold_answers(self) -> None:
        """From now on, :meth:`may_answer` waits until :meth:`release_answers`."""
        if self._let_answer is None:
            self._let_answer = asyncio.Event()

    def release_answers(self) -> None:
        if self._let_answer is not None:
            self._let_answer.set()
            self._let_answer = None

    async def may_answer(self, deadline: float | None = None) -> None:
        """Before a call returns its status: wait while answers are held, but not past ``deadline``
        (time.monotonic()) less :func:`answer_lead_s`: a call with a short deadline (0.2 s) is
        answered in time rather than held into DEADLINE_EXCEEDED."""
        let = self._let_answer
        if let is None:
            return
        if deadline is None:
            await let.wait()
            return
        left = deadline - time.monotonic()
        left -= answer_lead_s(left)
        if left > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await let.wait()

    async def wait_quiet(self, quiet_s: float, deadline: float, poll_s: float = 0.01) -> bool:
        """Until no call has started for ``quiet_s`` of time the event loop was free to take calls,
        or ``deadline`` (time.monotonic()). True when quiet.

        Time the loop spent elsewhere (a wake-up later than ``quiet_s / 2``: parsing a large
        message, a busy machine) does not count as quiet: calls gRPC's transport received then may
        still wait to be taken, and the stop that follows a quiet wait would cancel them."""
        quiet_from, polled = float("-inf"), time.monotonic()
        while True:
            now = time.monotonic()
            if now - polled > quiet_s / 2:
                quiet_from = now
            polled = now
            if now - max(self.last_start, quiet_from) >= quiet_s:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(poll_s, deadline - now))

    async def wait_finished(self, deadline: float, poll_s: float = 0.02) -> bool:
        """Until gRPC is done with every call (answers sent), or ``deadline`` (time.monotonic()).
        True when none is left."""
        while self.unfinished and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return not self.unfinished


class Call:
    """One RPC: reads its messages within the budget, writes its answers, knows if it is alive."""

    def __init__(
        self, context: grpc.aio.ServicerContext, budget: MemoryBudget, read_reservation: int, idle_s: float, memory_wait_s: float
    ) -> None:
        self.context = context
        self.budget = budget
        self.read_reservation = read_reservation
        self.idle_s = idle_s
        self.memory_wait_s = memory_wait_s
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic() + remaining
        self.alive = True
        self.last_activity = time.monotonic()
        self.read_end = False  # a read returned the end of the stream (a half-close, or a cancel)
        self._end_at: float | None = None  # when it did
        self._wrote_at = 0.0  # when an answer was last written
        # the read in progress, for idle_for() and give_way(): when it was posted, what interrupts
        # it, and why it was asked to give way
        self._read_posted = 0.0
        #: True while the server still computes answers the client waits for (a stream): its
        #: read is then not idle. Answers computed and not read by the client do not count.
        self.computing_answers: Callable[[], bool] | None = None
        self._interrupt: Callable[[], None] | None = None
        self._gave_way: str | None = None
        self._headers_sent = False
        #: What the call keeps while it waits to read its next message (a chunked call's header
        #: reservation, see :meth:`hold`): its reads wait in line as holding it.
        self._kept: Reservation | None = None

    def checkpoint(self) -> None:
        """For the engine between chunks: stop once the call is over or past its deadline."""
        stop_if_over(not self.alive, self.deadline, "the call ended; evaluation stopped")

    def memory_wait_left_s(self) -> float:
        """How long a read may wait in line for memory: waiting on the server is not the
        client's idleness, so its own limit, cut short by the call's deadline."""
        wait = self.memory_wait_s
        return wait if self.deadline is None else max(0.0, min(wait, self.deadline - time.monotonic()))

    async def hold(self, held: Reservation, nbytes: int, what: str, reading: str) -> None:
        """Grow ``held`` to ``nbytes``, which the call keeps while it reads its next ``reading``
        messages: those reads wait in line as holding it (:meth:`MemoryBudget.reserve`), so that
        calls that wait for each other are seen as deadlocked. Bytes that do not fit now wait in
        line (as a unary request's do; the call has no read posted meanwhile) for up to
        max_memory_wait_s or the call's deadline: refused at once, 8 clients' chunked perplexity
        calls on a budget of three reads failed in 8 of 12 runs. Refused at once when ``nbytes``
        and one read can never fit together: its next read would wait for bytes only this call
        holds (and hold up the line meanwhile)."""
        budget = self.budget
        if nbytes + self.read_reservation > budget.limit_bytes:
            raise BudgetExceeded(
                f"{what} needs {nbytes} bytes of server memory, and reading each next {reading} message "
                f"{self.read_reservation} more ({READ_RESERVATION}): together more than {budget.limit_named} allows, "
                "so the call could never end; split it into smaller requests"
            )
        await held.grow(nbytes, what, timeout_s=self.memory_wait_left_s())
        self._kept = held

    async def read(self, what: str, waiting_for_us: Callable[[], bool] | None = None) -> tuple[object, Reservation] | None:
        """The next message with its bytes reserved; None at the end of the stream.

        ``waiting_for_us``: while it returns True the client may rightly send nothing (it waits
        for answers), so the idle timeout does not run.
        """
        held = await self.budget.reserve(
            self.read_reservation,
            f"reading a {what} message",
            timeout_s=self.memory_wait_left_s(),
            holding=0 if self._kept is None else self._kept.nbytes,
            caller=self.context.peer,
        )
        try:
            self._read_posted = time.monotonic()
            self._gave_way = None  # a message that arrived as the call gave way let it go on
            self.budget.read_posted(self, held)
            try:
                received = await self._idle_bounded(self.context.read(), f"completed no {what} message", waiting_for_us, reading=True)
            finally:
                self.budget.read_done(self)
                self._interrupt = None
            if received is grpc.aio.EOF:
                held.release()
                self.read_end = True
                self._end_at = time.monotonic()
                return None
            held.resize(received.nbytes, f"a {what} message")
        except BaseException:
            held.release()
            raise
        self.last_activity = time.monotonic()
        return received.message, held

    def answered(self, held: Reservation, answer_nbytes: int) -> None:
        """A unary call's answer is returned: ``held`` shrinks to ``answer_nbytes`` and its bytes
        stay counted until gRPC is done with the call (its answer sent, or the call ended), not
        just until the handler returns. gRPC sends a returned answer at the client's pace and
        keeps it until then: clients that opened no HTTP/2 receive window held 200 MiB per 64 MiB
        answer with nothing counted (24 of them: 4.8 GiB on a 1 GiB budget)."""
        held.resize(answer_nbytes, "the answer")
        kept = held.moved()
        self.context.add_done_callback(lambda _context: kept.release())

    async def write(self, message) -> None:
        if not self._headers_sent:
            # The response headers go alone, before the first answer. A write the idle timeout cuts
            # leaves its batch pending in gRPC; when that batch also held the headers, gRPC refused
            # the status that followed (the headers pending twice), so a client that paused longer
            # than the idle timeout, then read on, got an answer and then waited for ever.
            await self.context.send_initial_metadata(())
            self._headers_sent = True
        await self._idle_bounded(self.context.write(message), "read no answer")
        self.last_activity = self._wrote_at = time.monotonic()

    async def settle_end(self) -> None:
        """Before a stream answers OK when its end of stream may have been a cancel, which lands
        first (see :func:`.endings.end_settle_s`): it wrote no answer at all, or it ended within
        DEADLINE_SKEW_S of its deadline (the client's deadline arrives as such an end). Not for any
        stream that wrote answers: a client that half-closes after reading them all (evaluate_many
        does) waited 50 ms at the end of every stream (8 small requests: 3 -> 54 ms); a cancel
        long before the deadline, after every answer was delivered, may then be counted OK."""
        if self._end_at is None:
            return
        near_deadline = self.deadline is not None and self.deadline - self._end_at <= endings.DEADLINE_SKEW_S
        if not self._wrote_at or near_deadline:
            wait = endings.end_settle_s(time.monotonic() - self._end_at)
            if wait > 0:
                await asyncio.sleep(wait)

    # ------------------------------------------------------------------ the budget's IdleReader
    def idle_for(self, now: float) -> float | None:
        computing = self.computing_answers
        if computing is not None and computing():
            return None
        return now - max(self.last_activity, self._read_posted)

    def give_way(self, reason: str) -> None:
        self._gave_way = reason
        if self._interrupt is not None:
            self._interrupt()

    # ------------------------------------------------------------------
    async def _idle_bounded(
        self, operation: Awaitable, doing: str, waiting_for_us: Callable[[], bool] | None = None, *, reading: bool = False
    ):
        """``operation`` within the idle timeout; when ``reading``, also until the call is asked
        to give way (:meth:`give_way`)."""
        idle = self.idle_s
        if waiting_for_us is None:
            try:
                async with asyncio.timeout(idle) as timeout:
                    if reading:
                        self._interrupt = lambda: timeout.reschedule(-1)
                    return await operation
            except TimeoutError:
                if reading and self._gave_way is not None:
                    raise GaveWay(self._gave_way) from None
                raise StreamIdle(idle_message(doing, idle)) from None
        task = asyncio.ensure_future(operation)
        woken = asyncio.get_running_loop().create_future()
        if reading:
            self._interrupt = lambda: woken.done() or woken.set_result(None)
        try:
            while True:
                timeout_s = max(0.01, self.last_activity + idle - time.monotonic())
                done, _ = await asyncio.wait((task, woken), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    return task.result()
                if reading and self._gave_way is not None:
                    raise GaveWay(self._gave_way)
                if waiting_for_us():
                    self.last_activity = time.monotonic()
                elif time.monotonic() - self.last_activity >= idle:
                    raise StreamIdle(idle_message(doing, idle))
        finally:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # seen: a read that failed as the call was cut (a stop) is not an unretrieved error


@dataclass(frozen=True)
class Reads:
    """How a server's calls read their messages: within ``budget``, each read reserving
    ``reservation`` bytes first, a call whose client sends nothing for ``idle_s`` ended, a read
    waiting in line for memory at most ``memory_wait_s`` (see :class:`Call`)."""

    budget: MemoryBudget
    reservation: int
    idle_s: float
    memory_wait_s: float

    @classmethod
    def of(cls, config: ServerConfig, budget: MemoryBudget) -> Reads:
        return cls(budget, config.read_reservation_bytes, config.stream_idle_timeout_s, config.max_memory_wait_s)

    def call(self, context: grpc.aio.ServicerContext) -> Call:
        return Call(context, self.budget, self.reservation, self.idle_s, self.memory_wait_s)


Answer = Callable[[object, Reservation], Awaitable[object]]


async def serve_stream(call: Call, kind: str, window: int, answer: Answer) -> None:
    """Answer a stream's messages concurrently, at most ``window`` read and not yet answered
    (past that the stream is not read: flow control); send each answer as soon as it is ready
    and release its bytes once it is sent. ``answer`` must not raise (but may be cancelled)."""
    slots = asyncio.Semaphore(window)
    done: asyncio.Queue = asyncio.Queue()
    tasks: set[asyncio.Task] = set()
    pending = [0]  # answers read and not yet sent
    computing = [0]  # of those, answers not yet computed
    call.computing_answers = lambda: computing[0] > 0
    end = object()

    async def one(message: object, held: Reservation) -> None:
        try:
            result = await answer(message, held)
        except BaseException:
            held.release()
            raise
        finally:
            computing[0] -= 1
        done.put_nowait((result, held))

    async def reader() -> None:
        try:
            while True:
                await slots.acquire()
                got = await call.read(kind, waiting_for_us=lambda: pending[0] > 0)
                if got is None:
                    return
                pending[0] += 1
                computing[0] += 1
                task = asyncio.ensure_future(one(*got))
                tasks.add(task)
                task.add_done_callback(functools.partial(_answer_settled, tasks, got[1]))
        finally:
            done.put_nowait(end)

    reader_task = asyncio.ensure_future(reader())
    try:
        await _write_answers(call, done, end, reader_task, pending, slots)
        await call.settle_end()  # a cancel reaches the reader as an end of stream: not an OK stream
    finally:
        reader_task.cancel()
        if reader_task.done() and not reader_task.cancelled():
            reader_task.exception()  # seen (the writer's failure is the call's)
        for task in list(tasks):
            task.cancel()
        while not done.empty():
            item = done.get_nowait()
            if item is not end:
                item[1].release()


def _answer_settled(tasks: set[asyncio.Task], held: Reservation, task: asyncio.Task) -> None:
    """An answer task is over. Cancelled (the stream ended), it may never have started, and then
    nothing else releases its message's bytes."""
    tasks.discard(task)
    if task.cancelled():
        held.release()


async def _write_answers(call: Call, done: asyncio.Queue, end: object, reader_task: asyncio.Task, pending: list[int], slots) -> None:
    """Send answers in completion order until the reader has finished and nothing is pending;
    the reader's failure (idle, budget) ends the stream."""
    reading = True
    while reading or pending[0]:
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
        pending[0] -= 1
        slots.release()
