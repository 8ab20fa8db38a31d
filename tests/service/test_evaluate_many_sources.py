"""evaluate_many with sources that are not always ready, and with items too large for one message.

A message goes out as soon as the client can send it, packed only with the items that are ready
then: a source that yields its next item only after it has received the previous item's result
must finish (it waited for a whole pack until the deadline). An item over the server's message
limit goes through EvaluateChunked by itself, as evaluate() sends it (the server refused it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import AsyncLossClient, InvalidArgumentError, LossClient, LossRequest
from lossd_server.config import ServerConfig
from rpc_outcomes import wait_for_metric
from serverproc import start_server

ROUNDS = 5


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small_limit_server():
    srv = start_server("--max-message-bytes", "65536")
    yield srv
    srv.stop()


def request(i: int) -> tuple[LossRequest, torch.Tensor]:
    rng = np.random.default_rng(i)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    t = rng.integers(0, 5, 4)
    return LossRequest(x, t), F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t))


def interactive(results: queue.Queue):
    """Yields request i+1 only once the caller has put request i's result into ``results``; a
    result that never comes ends the source with an error (bounded: the test cannot hang)."""
    for i in range(ROUNDS):
        yield request(i)[0]
        if i + 1 < ROUNDS:
            results.get(timeout=60)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("connections", [1, 2])
def test_a_source_that_waits_for_each_result_finishes(server, connections):
    results: queue.Queue = queue.Queue()
    got = []
    with LossClient(server.address, connections=connections, timeout_s=30) as client:
        for result in client.evaluate_many(interactive(results)):
            got.append(result)
            results.put(result)
    assert len(got) == ROUNDS
    for i, result in enumerate(got):
        torch.testing.assert_close(torch.as_tensor(result.loss), request(i)[1])


@pytest.mark.timeout(180)
def test_an_async_source_that_waits_for_each_result_finishes(server):
    async def main():
        results: asyncio.Queue = asyncio.Queue()

        async def source():
            for i in range(ROUNDS):
                yield request(i)[0]
                if i + 1 < ROUNDS:
                    await asyncio.wait_for(results.get(), 60)

        got = []
        async with AsyncLossClient(server.address, timeout_s=30) as client:
            async for result in client.evaluate_many(source()):
                got.append(result)
                results.put_nowait(result)
        return got

    got = asyncio.run(asyncio.wait_for(main(), 120))
    assert len(got) == ROUNDS
    for i, result in enumerate(got):
        torch.testing.assert_close(torch.as_tensor(result.loss), request(i)[1])


@pytest.mark.timeout(180)
def test_a_source_that_waits_for_each_result_gets_the_clients_rejections_at_once(server):
    """An item the client rejects (return_exceptions) is answered without a message: its answer
    must still reach a source that waits for it (it waited for the server's next answer)."""

    def items(i: int) -> LossRequest:
        req = request(i)[0]
        return LossRequest(req.input, req.target, reduction="bogus") if i == 1 else req

    def source(results: queue.Queue):
        for i in range(ROUNDS):
            yield items(i)
            if i + 1 < ROUNDS:
                results.get(timeout=60)

    def check_all(got) -> None:
        assert len(got) == ROUNDS and isinstance(got[1], InvalidArgumentError)
        for i, result in enumerate(got):
            if i != 1:
                torch.testing.assert_close(torch.as_tensor(result.loss), request(i)[1])

    results: queue.Queue = queue.Queue()
    got = []
    with LossClient(server.address, timeout_s=30) as client:
        for result in client.evaluate_many(source(results), return_exceptions=True):
            got.append(result)
            results.put(result)
    check_all(got)

    async def main():
        answers: asyncio.Queue = asyncio.Queue()

        async def asource():
            for i in range(ROUNDS):
                yield items(i)
                if i + 1 < ROUNDS:
                    await asyncio.wait_for(answers.get(), 60)

        seen = []
        async with AsyncLossClient(server.address, timeout_s=30) as client:
            async for result in client.evaluate_many(asource(), return_exceptions=True):
                seen.append(result)
                answers.put_nowait(result)
        return seen

    check_all(asyncio.run(asyncio.wait_for(main(), 120)))


def large_items():
    """Small and large (122 KB: over a 64 KiB server limit) items, and torch's answers."""
    rng = np.random.default_rng(7)
    items, want = [], []
    for rows, classes in ((4, 5), (300, 100), (6, 5), (3, 7), (400, 90)):
        x = rng.standard_normal((rows, classes)).astype(np.float32)
        t = rng.integers(0, classes, rows)
        items.append(LossRequest(x, t, reduction="sum"))
        want.append(F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction="sum"))
    return items, want


def check(got, want) -> None:
    assert len(got) == len(want)
    for i, (result, expected) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(torch.as_tensor(result.loss), expected, msg=lambda m, i=i: f"item {i}: {m}")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pack", [None, 1])
def test_items_over_the_server_limit_are_evaluated_in_order(small_limit_server, pack):
    items, want = large_items()
    with LossClient(small_limit_server.address, timeout_s=60) as client:
        check(list(client.evaluate_many(items, window=4, pack=pack)), want)
        check(list(client.evaluate_many(iter(items[1:2]))), want[1:2])  # alone, and last

    async def main():
        async with AsyncLossClient(small_limit_server.address, timeout_s=60) as client:
            return [r async for r in client.evaluate_many(items, window=4, pack=pack)]

    check(asyncio.run(asyncio.wait_for(main(), 120)), want)


@pytest.mark.timeout(180)
def test_a_large_item_that_fails_fails_in_its_place(small_limit_server):
    items, want = large_items()
    bad = LossRequest(items[1].input, np.full(300, 100), reduction="sum")  # class 100 of 100: out of bounds
    mixed = [items[0], bad, items[2]]
    with LossClient(small_limit_server.address, timeout_s=60) as client:
        got = list(client.evaluate_many(mixed, return_exceptions=True))
        assert isinstance(got[1], InvalidArgumentError)
        check([got[0], got[2]], [want[0], want[2]])
        seen = []
        with pytest.raises(InvalidArgumentError):
            for result in client.evaluate_many(mixed):
                seen.append(result)
        check(seen, want[:1])


#: Each read reserves this much of the server's memory budget (two messages of the receive limit).
READ_BYTES = ServerConfig().read_reservation_bytes
#: The smallest memory budget a server with the default --max-message-bytes takes: two reads.
TWO_READS_BUDGET = 2 * READ_BYTES + 16 * 1024 * 1024


@pytest.fixture(scope="module")
def two_reads_server():
    srv = start_server("--memory-budget-bytes", str(TWO_READS_BUDGET), "--idle-read-yield-s", "2", metrics=True)
    yield srv
    srv.stop()


def over_512_bytes(i: int) -> tuple[LossRequest, torch.Tensor]:
    """A request whose tensors are over the 512 bytes a client sends without asking the server's
    message limit (GetServerInfo)."""
    rng = np.random.default_rng(i)
    x, t = torch.from_numpy(rng.standard_normal((8, 100)).astype(np.float32)), torch.from_numpy(rng.integers(0, 100, 8))
    return LossRequest(x, t), F.cross_entropy(x, t)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("twin", ["sync", "async"])
@pytest.mark.parametrize("clients,connections", [(2, 1), (1, 2)], ids=["two-clients", "one-client-two-connections"])
def test_new_clients_streams_do_not_wait_for_their_own_server_info(two_reads_server, twin, clients, connections):
    """Two streams, from clients that do not know the server's message limit yet, on a budget of
    two reads, whose sources give their first item once both streams hold a read: each open stream
    holds a read's reservation for its next message, so the GetServerInfo that the first item
    (over 512 bytes) needs waited in line behind them, and they waited for it: both gave way
    idle_read_yield_s later (RESOURCE_EXHAUSTED; 64 clients in the soak waited 37.5 s). The limit
    is asked before the streams open; nothing gives way."""
    items = [over_512_bytes(i) for i in range(3)]
    yielded, server = "lossd_memory_reads_yielded_total", two_reads_server
    before = server.metrics()[yielded]

    def both_streams_open() -> None:
        held = wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v >= 2 * READ_BYTES)
        assert held >= 2 * READ_BYTES, f"the two streams' reads hold {held} bytes, not two reads' {2 * READ_BYTES}"

    if twin == "sync":
        sources_started = threading.Barrier(clients)  # after the streams open: none ends meanwhile

        def source():
            sources_started.wait(60)
            both_streams_open()
            yield from (r for r, _ in items)

        def run(client: LossClient) -> list:
            with client:
                return [r.loss for r in client.evaluate_many(source(), window=16)]

        made = [LossClient(server.address, connections=connections, timeout_s=60) for _ in range(clients)]
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(run, made))
    else:
        sources_started = asyncio.Barrier(clients)

        async def source():
            await asyncio.wait_for(sources_started.wait(), 60)
            await asyncio.to_thread(both_streams_open)
            for r, _ in items:
                yield r

        async def run(client: AsyncLossClient) -> list:
            async with client:
                return [r.loss async for r in client.evaluate_many(source(), window=16)]

        async def all_clients() -> list:
            made = [AsyncLossClient(server.address, connections=connections, timeout_s=60) for _ in range(clients)]
            return await asyncio.gather(*(run(client) for client in made))

        results = asyncio.run(all_clients())
    for losses in results:
        for got, (_, want) in zip(losses, items, strict=True):
            torch.testing.assert_close(got, want)
    assert server.metrics()[yielded] == before
