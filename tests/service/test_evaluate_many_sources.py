"""evaluate_many with sources that are not always ready.

A message goes out as soon as the client can send it, packed only with the items that are ready
then: a source that yields its next item only after it has received the previous item's result
must finish (it waited for a whole pack until the deadline).
"""

from __future__ import annotations

import asyncio
import queue

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import AsyncLossClient, LossClient, LossRequest
from serverproc import start_server

ROUNDS = 5


@pytest.fixture(scope="module")
def server():
    srv = start_server()
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
