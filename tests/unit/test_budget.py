"""MemoryBudget: reservations never exceed the limit, waiters are served in order, nothing leaks."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest
from lossd_server.budget import BudgetExceeded, MemoryBudget


def run(coro):
    return asyncio.run(coro)


def test_a_reservation_that_can_never_fit_is_refused_naming_the_setting():
    async def main():
        budget = MemoryBudget(100)
        with pytest.raises(BudgetExceeded, match="memory_budget_bytes=100"):
            await budget.reserve(101, "a message")
        assert budget.held_bytes == 0

    run(main())


def test_a_workers_share_is_named_with_the_configured_budget_and_the_workers():
    """Under --workers N the refusals named memory_budget_bytes=<the share>: neither the flag's
    value nor said to be a share. One process's text is as it was (the test above)."""

    async def main():
        budget = MemoryBudget(50, share_of=(100, 2))
        share = "this worker's share of memory_budget_bytes (50 = 100 / 2 workers)"
        with pytest.raises(BudgetExceeded, match=re.escape(f"a message needs 51 bytes of server memory, more than {share} allows; split")):
            await budget.reserve(51, "a message")
        held = budget.reserve_now(30, "other")
        with pytest.raises(BudgetExceeded, match=re.escape(f"needs 30 bytes of server memory; 30 of {share} are held for other calls")):
            budget.reserve_now(30, "a read")
        held.release()
        assert (
            MemoryBudget(33, share_of=(100, 3)).limit_named
            == "this worker's share of memory_budget_bytes (33 = 100 / 3 workers, rounded down)"
        )
        assert MemoryBudget(100).limit_named == "memory_budget_bytes=100"

    run(main())


def test_waiters_are_granted_in_order_as_bytes_are_released():
    async def main():
        budget = MemoryBudget(100)
        first = await budget.reserve(80, "first")
        order = []

        async def wait(n, name):
            r = await budget.reserve(n, name)
            order.append(name)
            return r

        big = asyncio.ensure_future(wait(60, "big"))
        small = asyncio.ensure_future(wait(10, "small"))  # fits now, but must not jump the line
        await asyncio.sleep(0)
        assert budget.waiting == 2 and budget.held_bytes == 80
        first.release()
        b, s = await big, await small
        assert order == ["big", "small"] and budget.held_bytes == 70
        b.release()
        s.release()
        assert budget.held_bytes == 0 and budget.peak_bytes == 80

    run(main())


def test_callers_in_line_take_turns_each_in_its_own_order():
    async def main():
        budget = MemoryBudget(100)
        held = await budget.reserve(100, "held")
        order = []

        async def wait(caller, name):
            r = await budget.reserve(50, name, caller=caller)
            order.append(name)
            r.release()  # at once: the next one fits

        names = [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("a", "a4"), ("c", "c1"), ("b", "b2")]
        tasks = [asyncio.ensure_future(wait(caller, name)) for caller, name in names]
        await asyncio.sleep(0)
        assert budget.waiting == len(names)
        held.release()
        await asyncio.gather(*tasks)
        assert order == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]
        assert budget.held_bytes == 0 and budget.waiting == 0

    run(main())


def test_calls_in_progress_that_grow_go_before_new_reads():
    """A call that holds its request and needs its answer's few bytes is served before a new read
    that does not fit: it releases everything when done. Behind it, such calls were refused as
    deadlocked under heavy load (48 clients on a budget of 3 reads: 848 of 902 refused)."""

    async def main():
        budget = MemoryBudget(100)
        posted_read = budget.reserve_now(60, "a posted read")
        in_progress = budget.reserve_now(20, "a call in progress")
        new_read = asyncio.ensure_future(budget.reserve(30, "a new read", caller="another connection"))
        await asyncio.sleep(0)
        assert not new_read.done() and budget.waiting == 1  # 20 free
        await asyncio.wait_for(in_progress.grow(30, "its answer"), 1)
        assert in_progress.nbytes == 30 and budget.held_bytes == 90 and not new_read.done()
        in_progress.release()
        posted_read.release()
        (await new_read).release()
        assert budget.held_bytes == 0 and budget.waiting == 0

    run(main())


def test_a_waiter_that_times_out_or_is_cancelled_leaves_nothing_held():
    async def main():
        budget = MemoryBudget(100)
        held = budget.reserve_now(90, "held")
        with pytest.raises(BudgetExceeded, match="waited"):
            await budget.reserve(50, "late", timeout_s=0.01)
        task = asyncio.ensure_future(budget.reserve(50, "cancelled"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.waiting == 0
        held.release()
        assert budget.held_bytes == 0

    run(main())


def test_resize_grows_only_within_the_limit_and_shrinking_wakes_waiters():
    async def main():
        budget = MemoryBudget(100)
        r = budget.reserve_now(10, "r")
        r.resize(60, "grow")
        with pytest.raises(BudgetExceeded):
            r.resize(101, "too much")
        waiter = asyncio.ensure_future(budget.reserve(50, "waiter"))
        await asyncio.sleep(0)
        assert not waiter.done()
        r.resize(20, "shrink")
        w = await waiter
        assert budget.held_bytes == 70
        other = budget.reserve_now(0, "other")
        other.resize(5, "o")
        r.absorb(other)
        assert (r.nbytes, other.nbytes, budget.held_bytes) == (25, 0, 75)
        r.release()
        w.release()
        other.release()
        assert budget.held_bytes == 0

    run(main())


def test_a_waiter_cancelled_while_others_release_never_breaks_the_releaser():
    """Timeouts cancel the awaited future: the line must skip it, whoever releases next."""

    async def main():
        budget = MemoryBudget(100)
        held = budget.reserve_now(100, "held")
        waiters = [asyncio.ensure_future(budget.reserve(60, f"w{i}", timeout_s=0.01 if i % 2 else None)) for i in range(6)]
        await asyncio.sleep(0.05)  # the odd ones time out and leave the line
        for task in waiters[::2][:1]:
            task.cancel()
        await asyncio.sleep(0)
        held.release()  # must not raise for the cancelled / timed-out waiters
        granted = []
        for task in waiters:
            try:
                granted.append(await asyncio.wait_for(asyncio.shield(task), 0.05))
            except (BudgetExceeded, asyncio.CancelledError, TimeoutError):
                pass
        assert len(granted) == 1 and budget.held_bytes == 60  # the first live waiter, in order
        for r in granted:
            r.release()
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert budget.held_bytes == 0 and budget.waiting == 0

    run(main())


class FakeReader:
    """An IdleReader whose idleness the test sets; giving way releases what it holds."""

    def __init__(self, budget: MemoryBudget, nbytes: int, idle: float | None) -> None:
        self.held = budget.reserve_now(nbytes, "read")
        self.idle = idle
        self.reason: str | None = None
        budget.read_posted(self, self.held)

    def idle_for(self, now: float) -> float | None:
        return self.idle

    def give_way(self, reason: str) -> None:
        self.reason = reason
        self.held.release()


def test_idle_reads_give_way_to_the_line_oldest_first_and_only_as_many_as_it_needs():
    async def main():
        yielded = []
        budget = MemoryBudget(100, idle_read_yield_s=5.0, on_yield=lambda: yielded.append(1))
        waiting_for_answers = FakeReader(budget, 20, None)  # its client rightly waits: never gives way
        oldest, fresh, younger, youngest = (FakeReader(budget, 20, idle) for idle in (9.0, 1.0, 7.0, 6.0))
        assert budget.held_bytes == 100
        await asyncio.sleep(0)
        assert oldest.reason is None  # nobody waits: nothing gives way
        line = [asyncio.ensure_future(budget.reserve(n, "line")) for n in (30, 5)]
        await asyncio.sleep(0)  # the sweep runs
        await asyncio.sleep(0)
        assert oldest.reason is not None and younger.reason is not None and youngest.reason is None
        assert "idle_read_yield_s=5" in oldest.reason and "memory_budget_bytes=100" in oldest.reason
        assert fresh.reason is None and waiting_for_answers.reason is None
        granted = [await task for task in line]
        assert budget.held_bytes == 95 and len(yielded) == 2
        for r in granted + [fresh.held, youngest.held, waiting_for_answers.held]:
            r.release()
        assert budget.held_bytes == 0

    run(main())


def test_idle_reads_never_give_way_when_it_is_turned_off_or_after_they_are_done():
    async def main():
        off = MemoryBudget(40, idle_read_yield_s=0.0)
        idle = FakeReader(off, 40, 100.0)
        waiter = asyncio.ensure_future(off.reserve(10, "line"))
        await asyncio.sleep(0.01)
        assert idle.reason is None and not waiter.done()
        idle.held.release()
        (await waiter).release()

        on = MemoryBudget(40, idle_read_yield_s=1.0)
        done = FakeReader(on, 40, 100.0)
        on.read_done(done)  # its message arrived
        waiter = asyncio.ensure_future(on.reserve(10, "line"))
        await asyncio.sleep(0.01)
        assert done.reason is None and not waiter.done()
        done.held.release()
        (await waiter).release()
        assert off.held_bytes == on.held_bytes == 0

    run(main())


def test_a_reservation_grows_in_line_keeping_what_it_holds():
    async def main():
        budget = MemoryBudget(100)
        other = budget.reserve_now(60, "other")
        mine = budget.reserve_now(30, "mine")
        grow = asyncio.ensure_future(mine.grow(70, "my answer", timeout_s=5))
        await asyncio.sleep(0)
        assert not grow.done() and budget.waiting == 1 and budget.held_bytes == 90  # waits, holding its 30
        other.release()
        await grow
        assert mine.nbytes == 70 and budget.held_bytes == 70
        await mine.grow(10, "shrink")
        assert budget.held_bytes == 10
        with pytest.raises(BudgetExceeded, match="more than memory_budget_bytes=100"):
            await mine.grow(101, "never fits")
        mine.release()
        assert budget.held_bytes == 0

    run(main())


def test_calls_that_all_wait_to_grow_are_refused_one_by_one_instead_of_waiting_for_each_other():
    """Every byte held belongs to calls waiting for more: the first is refused; its release
    lets the next one grow."""

    async def main():
        budget = MemoryBudget(100)
        a, b = budget.reserve_now(50, "a"), budget.reserve_now(50, "b")
        grow_a = asyncio.ensure_future(a.grow(80, "a's answer", timeout_s=5))
        await asyncio.sleep(0)
        assert not grow_a.done()  # b holds bytes and is not waiting: a waits
        grow_b = asyncio.ensure_future(b.grow(70, "b's answer", timeout_s=5))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert grow_a.done() and isinstance(grow_a.exception(), BudgetExceeded), grow_a
        assert "belong to calls waiting for more" in str(grow_a.exception())
        a.release()  # its call ends
        await grow_b
        assert b.nbytes == 70 and budget.held_bytes == 70 and budget.waiting == 0
        b.release()
        assert budget.held_bytes == 0

    run(main())


def test_work_on_a_thread_keeps_its_bytes_counted_until_it_ends_even_when_its_caller_is_cancelled():
    """A thread cannot be stopped: the bytes of a cancelled caller's thread work (a shared-memory
    copy, an answer being encoded) stay counted until the thread ends, not until the cancel."""

    async def main():
        budget = MemoryBudget(100)
        held = await budget.reserve(60, "a shared-memory copy")
        started, finish = threading.Event(), threading.Event()

        def copy() -> str:
            started.set()
            finish.wait(30)
            return "copied"

        caller = asyncio.ensure_future(held.run_in_thread(copy))
        await asyncio.to_thread(started.wait, 30)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        held.release()  # what the call's handler does on its way out
        assert budget.held_bytes == 60  # still copying
        finish.set()
        for _ in range(200):  # until the thread's outcome reaches the loop
            if budget.held_bytes == 0:
                break
            await asyncio.sleep(0.01)
        assert budget.held_bytes == 0
        again = await budget.reserve(30, "another")
        assert await again.run_in_thread(lambda: 7) == 7 and budget.held_bytes == 30  # a finished call keeps its bytes
        again.release()

    run(main())


def test_what_the_asking_call_holds_is_named_apart_from_what_other_calls_hold():
    """A call that holds bytes and asks for more is told how many it holds itself: the texts said
    all of them were "held for other calls" (a chunked call waiting for itself was told so)."""

    async def main():
        budget = MemoryBudget(100)
        other, mine = budget.reserve_now(30, "other"), budget.reserve_now(50, "mine")
        who = re.escape(
            "30 of memory_budget_bytes=100 are held for other calls (or this call's other messages) and 50 already by this call"
        )
        with pytest.raises(BudgetExceeded, match="grow now needs 30 more bytes of server memory; " + who):
            mine.resize(80, "grow now")
        with pytest.raises(BudgetExceeded, match="a read waited .* " + who):
            await budget.reserve(30, "a read", timeout_s=0.01, holding=mine.nbytes)
        never = "needs 60 bytes of server memory while its call holds 50: together more than memory_budget_bytes=100"
        with pytest.raises(BudgetExceeded, match=never):
            await budget.reserve(60, "a read", holding=mine.nbytes)
        other.release()
        other = budget.reserve_now(50, "other")
        refused = asyncio.ensure_future(mine.grow(70, "my answer", timeout_s=5))
        await asyncio.sleep(0)
        waits = asyncio.ensure_future(other.grow(60, "other's answer", timeout_s=5))
        with pytest.raises(BudgetExceeded, match=r"belong to calls waiting for more \(50 to this one\)"):
            await asyncio.wait_for(refused, 1)
        mine.release()
        await asyncio.wait_for(waits, 1)
        other.release()
        assert budget.held_bytes == 0 and budget.waiting == 0

    run(main())
