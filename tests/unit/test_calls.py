"""Call.read within the memory budget, without gRPC: what a call keeps while it reads (a chunked
call's header) counts as held by a call in line, so that it never waits for itself or for calls
that wait for it."""

from __future__ import annotations

import asyncio
import time

import pytest
from lossd_server.budget import BudgetExceeded, MemoryBudget
from lossd_server.calls import ANSWER_BEFORE_DEADLINE_S, Call, CallTracker, answer_lead_s
from lossd_server.wire import Received

READ = 30  # what a read reserves


class FakeContext:
    """The few ServicerContext methods Call uses; messages are put in ``inbox`` by the test."""

    def __init__(self, peer: str) -> None:
        self._peer = peer
        self.inbox: asyncio.Queue = asyncio.Queue()

    def time_remaining(self) -> None:
        return None

    def peer(self) -> str:
        return self._peer

    async def read(self) -> Received:
        return await self.inbox.get()


def a_call(budget: MemoryBudget, peer: str) -> Call:
    return Call(FakeContext(peer), budget, READ, idle_s=30.0, memory_wait_s=30.0)  # type: ignore[arg-type]


def test_a_call_that_would_keep_too_much_to_read_on_is_refused_at_once_naming_the_settings():
    """Kept bytes that leave less than one read free: its next read would wait for bytes only it
    holds (and hold up every call behind it for max_memory_wait_s). Refused before holding them."""

    async def main():
        budget = MemoryBudget(100)
        call = a_call(budget, "a")
        header = budget.reserve_now(5, "a header message")
        with pytest.raises(BudgetExceeded) as refused:
            await call.hold(header, 71, "the chunk header and its answer", "EvaluateChunk")
        text = str(refused.value)
        assert "needs 71 bytes" in text and f"EvaluateChunk message {READ} more" in text, text
        assert "memory_budget_bytes=100" in text and "max_message_bytes" in text, text
        assert header.nbytes == 5 and budget.held_bytes == 5  # nothing more held
        await call.hold(header, 70, "the chunk header and its answer", "EvaluateChunk")  # leaves one read
        reading = asyncio.ensure_future(call.read("EvaluateChunk"))
        await asyncio.sleep(0)
        assert budget.held_bytes == 100 and budget.waiting == 0  # its read was granted
        call.context.inbox.put_nowait(Received("rows", 7))
        message, held = await asyncio.wait_for(reading, 5)
        assert message == "rows" and held.nbytes == 7 and budget.held_bytes == 77
        held.release()
        header.release()
        assert budget.held_bytes == 0

    asyncio.run(main())


def test_bytes_a_call_keeps_that_do_not_fit_now_wait_in_line_for_the_others_to_go():
    """A chunked call's header and answer bytes that do not fit while other calls hold the budget,
    but fit beside one read once they go: they wait in line, as a unary request's bytes do, and are
    held once the others release theirs. They were refused at once (RESOURCE_EXHAUSTED): 8 clients'
    chunked perplexity calls on a budget of three reads failed in 8 of 12 runs."""

    async def main():
        budget = MemoryBudget(100)
        others = budget.reserve_now(50, "other calls' reads")
        call = a_call(budget, "a")
        header = budget.reserve_now(5, "a header message")
        holding = asyncio.ensure_future(call.hold(header, 60, "the chunk header and its answer", "EvaluateChunk"))
        await asyncio.sleep(0)
        assert not holding.done() and budget.waiting == 1 and header.nbytes == 5
        others.release()
        await asyncio.wait_for(holding, 5)
        assert header.nbytes == 60 and budget.held_bytes == 60 and budget.waiting == 0
        header.release()
        assert budget.held_bytes == 0

    asyncio.run(main())


def test_calls_that_keep_bytes_and_wait_to_read_are_refused_one_by_one_not_left_waiting_for_each_other():
    """Two chunked calls each keep 40 of 100 bytes and each waits to read its next chunk (30):
    only they hold bytes, so neither read would ever be granted, and every call behind them waited
    max_memory_wait_s. The first is refused at once as deadlocked; its release lets the other read."""

    async def main():
        budget = MemoryBudget(100)
        a, b = a_call(budget, "a"), a_call(budget, "b")
        kept_a, kept_b = budget.empty(), budget.empty()
        await a.hold(kept_a, 40, "a's header", "EvaluateChunk")
        await b.hold(kept_b, 40, "b's header", "EvaluateChunk")
        read_a = asyncio.ensure_future(a.read("EvaluateChunk"))
        await asyncio.sleep(0)
        assert not read_a.done() and budget.waiting == 1  # b's bytes are not in line: they may be released
        read_b = asyncio.ensure_future(b.read("EvaluateChunk"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert read_a.done() and isinstance(read_a.exception(), BudgetExceeded), read_a
        text = str(read_a.exception())
        assert "belong to calls waiting for more (40 to this one)" in text and "memory_budget_bytes=100" in text, text
        assert not read_b.done()
        kept_a.release()  # a's call ends
        b.context.inbox.put_nowait(Received("rows", 10))
        message, held = await asyncio.wait_for(read_b, 5)
        assert message == "rows" and budget.held_bytes == 50 and budget.waiting == 0
        held.release()
        kept_b.release()
        assert budget.held_bytes == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    "wrote, deadline_s, waits",
    [
        (None, None, True),
        ("before the end", None, False),
        ("after the end", None, False),
        ("before the end", 0.3, True),
        ("before the end", 5, False),
    ],
)
def test_a_stream_waits_for_a_cancel_to_land_only_when_it_wrote_no_answer_or_ended_at_its_deadline(monkeypatch, wrote, deadline_s, waits):
    """A stream's end of stream may be a client's cancel (its deadline arrives as one); one that
    wrote no answer at all, or ended within DEADLINE_SKEW_S of its deadline, waits CANCEL_SETTLE_S
    for it before answering OK. Others do not wait: a client that half-closes after reading every
    answer (evaluate_many) paid 50 ms at the end of each stream."""
    slept = []

    async def sleep(seconds):
        slept.append(seconds)

    async def main():
        call = a_call(MemoryBudget(100), "a")
        monkeypatch.setattr("lossd_server.calls.asyncio.sleep", sleep)
        now = time.monotonic()
        call._end_at = now
        call.deadline = None if deadline_s is None else now + deadline_s
        if wrote is not None:
            call._wrote_at = now - 0.01 if wrote == "before the end" else now + 0.01
        await call.settle_end()

    asyncio.run(main())
    assert bool(slept) is waits, slept


def test_a_held_answer_leads_its_deadline_by_a_quarter_of_its_time_left_at_least_50_ms():
    """0.4 s calls held at a stop went out 50 ms before their deadline, and ended DEADLINE_EXCEEDED
    on a loaded machine (the event loop late, the client's deadline earlier than the server's copy)."""
    assert answer_lead_s(0.4) == pytest.approx(0.1)
    assert answer_lead_s(0.1) == ANSWER_BEFORE_DEADLINE_S == 0.05
    assert answer_lead_s(-1.0) == ANSWER_BEFORE_DEADLINE_S


def test_time_the_event_loop_spent_elsewhere_is_not_quiet():
    """The drain's quiet wait (no call started for quiet_s) counted a blocked event loop as quiet:
    calls gRPC had received meanwhile were still waiting to be taken when the stop began, and were
    cancelled. After the loop is blocked (here 0.08 s, as parsing a large message does), the wait
    returns only once quiet_s more has passed with the loop free; with no call and no stall, at once."""

    async def scenario() -> tuple[float, float, bool, float]:
        tracker = CallTracker()
        tracker.last_start = time.monotonic() - 10.0  # the latest call started long ago
        start = time.monotonic()
        assert await tracker.wait_quiet(0.1, deadline=time.monotonic() + 30)
        at_once = time.monotonic() - start

        async def stall() -> float:
            await asyncio.sleep(0.02)
            time.sleep(0.08)  # the event loop blocked: no call can be taken
            return time.monotonic()

        tracker.note_start()  # a call starts; the loop is then blocked before quiet_s has passed
        stalled = asyncio.ensure_future(stall())
        quiet = await tracker.wait_quiet(0.1, deadline=time.monotonic() + 30)
        return at_once, await stalled, quiet, time.monotonic()

    at_once, stall_ended, quiet, returned = asyncio.run(scenario())
    assert at_once < 0.1 and quiet
    assert returned - stall_ended >= 0.1, f"quiet {returned - stall_ended:.3f}s after the loop was blocked"
