"""evaluate_many goes on when the server ends one of its streams because it gave way.

Each open stream holds a read's reservation of the server's memory budget for its next message.
While other calls wait in line for memory, the server ends a stream whose client completed no
message for --idle-read-yield-s (RESOURCE_EXHAUSTED, trailing metadata ``lossd-gave-way``). The
client then sends what that stream carried unanswered again and opens a new stream only when
requests wait for one. Before, the whole evaluate_many failed RESOURCE_EXHAUSTED: a source slower
than the setting on a busy server, or an item too large for one message sent alone while the
call's own streams held the reads it waited for (probe 27: 8 of 8 runs, connections=2; its
streams are now half-closed while such an item goes alone).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import AsyncLossClient, LossClient, LossRequest
from lossd_server.config import ServerConfig
from rpc_outcomes import wait_for_metric
from serverproc import start_server

YIELD_S = "0.5"
YIELDED = "lossd_memory_reads_yielded_total"
#: Each read reserves this much of the server's memory budget (two messages of the receive limit).
READ_BYTES = ServerConfig().read_reservation_bytes
#: The smallest memory budget a server with the default --max-message-bytes takes: two reads.
TWO_READS_BUDGET = 2 * READ_BYTES + 16 * 1024 * 1024
SMALL_LIMIT = 1024 * 1024
SMALL_READ_BYTES = ServerConfig(max_message_bytes=SMALL_LIMIT).read_reservation_bytes


@pytest.fixture(scope="module")
def two_reads_server():
    srv = start_server("--memory-budget-bytes", str(TWO_READS_BUDGET), "--idle-read-yield-s", YIELD_S, metrics=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def two_small_reads_server():
    budget = 2 * SMALL_READ_BYTES + SMALL_READ_BYTES // 16
    srv = start_server(
        "--memory-budget-bytes", str(budget), "--max-message-bytes", str(SMALL_LIMIT), "--idle-read-yield-s", YIELD_S, metrics=True
    )
    yield srv
    srv.stop()


def item(i: int, rows: int = 8, classes: int = 100) -> tuple[LossRequest, torch.Tensor]:
    rng = np.random.default_rng(i)
    x, t = torch.from_numpy(rng.standard_normal((rows, classes)).astype(np.float32)), torch.from_numpy(rng.integers(0, classes, rows))
    return LossRequest(x, t), F.cross_entropy(x, t)


def held_at_least(server, nbytes: int) -> None:
    held = wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v >= nbytes)
    assert held >= nbytes, f"the server holds {held} bytes, not the {nbytes} the test set up"


def check(losses: list, items: list) -> None:
    assert len(losses) == len(items)
    for got, (_, want) in zip(losses, items, strict=True):
        torch.testing.assert_close(torch.as_tensor(got), want)


def many(twin: str, address: str, connections: int, source_steps: list, answered: threading.Event | None = None) -> list:
    """evaluate_many with ``connections`` over a source made of ``source_steps``: each step an
    item to yield or a function to call (in a thread, for the async twin) before the next;
    ``answered`` is set once the first result is in."""
    answered = answered or threading.Event()
    if twin == "sync":

        def source():
            for step in source_steps:
                if isinstance(step, LossRequest):
                    yield step
                else:
                    step()

        with LossClient(address, connections=connections, timeout_s=60) as client:
            losses = []
            for result in client.evaluate_many(source(), window=8):
                losses.append(result.loss)
                answered.set()
            return losses

    async def async_source():
        for step in source_steps:
            if isinstance(step, LossRequest):
                yield step
            else:
                await asyncio.to_thread(step)

    async def main() -> list:
        async with AsyncLossClient(address, connections=connections, timeout_s=60) as client:
            losses = []
            async for result in client.evaluate_many(async_source(), window=8):
                losses.append(result.loss)
                answered.set()
            return losses

    return asyncio.run(asyncio.wait_for(main(), 120))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("twin", ["sync", "async"])
@pytest.mark.parametrize("connections", [1, 2])
def test_a_source_that_pauses_while_others_wait_for_memory_finishes(two_reads_server, twin, connections):
    """A source pauses after its first item while the server's two reads are held (by this call's
    streams, and with one connection by another client's idle stream) and a third client's call
    waits in line: this call's oldest stream gives way to it. The source's next items go on
    another stream (a new one when none is left), and every answer is torch's, in order."""
    server = two_reads_server
    items = [item(i) for i in range(5)]
    before = server.metrics()[YIELDED]
    release_other, waiting_call_done = threading.Event(), threading.Event()

    def other_idle_stream() -> None:
        def nothing_until_released():
            release_other.wait(60)
            yield from ()

        with LossClient(server.address, timeout_s=60) as client:
            list(client.evaluate_many(nothing_until_released()))

    def call_in_line() -> float:
        try:
            with LossClient(server.address, timeout_s=60) as client:
                return client.evaluate(items[0][0]).loss
        finally:
            waiting_call_done.set()

    def pause() -> None:
        """Once the first item is answered (its stream's next read posted before any other's),
        fill the reads, put a call in line, and wait until it is answered."""
        assert first_answered.wait(60), "the first item was never answered"
        if connections == 1:
            pool.submit(other_idle_stream)
        held_at_least(server, 2 * READ_BYTES)
        in_line.append(pool.submit(call_in_line))
        assert waiting_call_done.wait(60), "the call in line was never answered"

    in_line: list = []
    first_answered = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            losses = many(twin, server.address, connections, [items[0][0], pause, *(r for r, _ in items[1:])], first_answered)
        finally:
            release_other.set()
        torch.testing.assert_close(torch.as_tensor(in_line[0].result()), items[0][1])
    check(losses, items)
    assert server.metrics()[YIELDED] >= before + 1, "no stream gave way: the test did not test it"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("twin", ["sync", "async"])
def test_an_item_sent_alone_while_the_calls_own_streams_hold_the_reads_is_answered(two_small_reads_server, twin):
    """An item too large for one message goes alone (EvaluateChunked) while this call's two
    streams hold both reads the budget has: its reads waited in line behind them until the idle
    streams gave way (before that, the whole call failed RESOURCE_EXHAUSTED: 8 of 8 runs). The
    streams are now half-closed while the item goes alone (they hold no read while their answers
    come), so nothing waits or gives way, and the items after it go on a new stream."""
    server = two_small_reads_server
    big_rows = 2 * SMALL_LIMIT // 4000 + 8  # rows of 1,000 float32 classes: twice the message limit
    items = [item(1), item(99, rows=big_rows, classes=1000), item(2)]
    before = server.metrics()[YIELDED]
    steps = [items[0][0], lambda: held_at_least(server, 2 * SMALL_READ_BYTES), items[1][0], items[2][0]]
    check(many(twin, server.address, 2, steps), items)
    assert server.metrics()[YIELDED] == before, "a stream gave way: the item sent alone waited for this call's own streams"
