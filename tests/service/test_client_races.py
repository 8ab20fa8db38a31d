"""Races between a call and its end, seen from the clients: a deadline that passes just before a
client stream's half-close (probe 16 F1), a server killed while a stream is written to (F2)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from lossd_client import AsyncLossClient, LossClient
from lossd_client.errors import DeadlineExceededError, UnavailableError
from serverproc import start_server

#: The deadline of the calls whose event loop is held past it: long enough for every message to be
#: written first on a loaded machine, so that what passes the deadline is the hold.
TIMEOUT_S = 1.0


def test_a_deadline_passing_before_a_chunked_calls_half_close_is_deadline_exceeded_not_asyncio_cancellation(server):
    """grpc.aio's own writer of a client stream cancelled the call when its half-close failed,
    which it does when the call ended (here at its deadline) before grpc.aio read the status: the
    caller got asyncio's CancelledError though nobody cancelled its task, and it tore down an
    ``asyncio.gather`` of such calls (1 of 180 chunked calls with short deadlines under load). The
    progress callback of the last message holds the event loop past the deadline, right before the
    half-close: before the fix every such call raised asyncio's CancelledError."""
    reference = np.random.default_rng(0).standard_normal((4, 64, 50), dtype=np.float32)

    async def main():
        async with AsyncLossClient(server.address, chunked_above_bytes=1024, chunk_bytes=8192, timeout_s=60) as client:
            sizes: list[int] = []
            await client.compare(reference, reference, progress=sizes.append)
            assert len(sizes) > 2  # CompareChunked, several messages

            def held_at_the_end():
                sent: list[int] = []

                def progress(size: int) -> None:
                    sent.append(size)
                    if sum(sent) == sum(sizes):  # the last message is written; the half-close comes next
                        time.sleep(TIMEOUT_S + 0.3)

                return client.compare(reference, reference, progress=progress, timeout_s=TIMEOUT_S)

            outcomes = await asyncio.gather(*(held_at_the_end() for _ in range(3)), return_exceptions=True)
            assert all(isinstance(o, DeadlineExceededError) for o in outcomes), outcomes
            with pytest.raises(DeadlineExceededError):
                await asyncio.gather(*(held_at_the_end() for _ in range(2)))
            assert (await client.compare(reference, reference)).totals  # the client still works

    asyncio.run(asyncio.wait_for(main(), 60))


def test_an_evaluate_many_whose_deadline_passes_before_its_half_close_is_deadline_exceeded(server):
    """The source's items were written; the deadline passed before the stream was half-closed
    (here the source holds the event loop past it before it ends). The half-close then failed with
    grpc.aio's own InternalError, which evaluate_many raised as it was:
    ``grpc._cython.cygrpc.ExecuteBatchError: Failed "execute_batch"`` (6 of 10 runs; 5 here)."""
    x, y = np.zeros((4, 5), np.float32), np.zeros(4, np.int64)

    async def source():
        for _ in range(3):
            yield (x, y)
        await asyncio.sleep(0.1)  # the writer sends them
        time.sleep(TIMEOUT_S + 0.3)

    async def main():
        async with AsyncLossClient(server.address) as client:
            for _ in range(5):
                with pytest.raises(DeadlineExceededError):
                    async for _ in client.evaluate_many(source(), timeout_s=TIMEOUT_S):
                        pass

    asyncio.run(asyncio.wait_for(main(), 60))


X, Y = np.zeros((8, 20), np.float32), np.zeros(8, np.int64)


def _killing(server, at: int = 200, after: int = 2000):
    """evaluate_many's items; the server is SIGKILLed (and reaped) before item ``at``, and
    ``after`` more items follow it (they are written to the dead connection)."""
    for i in range(at + after):
        if i == at:
            server.proc.kill()
            server.proc.wait(30)
        yield (X, Y)


@pytest.mark.parametrize("pack", [None, 1])
def test_a_server_killed_during_evaluate_many_is_unavailable_for_both_clients(pack):
    """The blocking client raised UnavailableError (a ConnectionError, what retry logic keys on);
    the async one InternalError "Internal error from Core" (8 of 8 runs here): grpc.aio's own
    status for a stream whose write failed before it read the call's status, which reads as a
    server bug."""

    async def run_async(address: str) -> None:
        async with AsyncLossClient(address, timeout_s=60) as client:
            async for _ in client.evaluate_many(_killing(server), pack=pack):
                pass

    for kind in ("async", "async", "sync"):
        server = start_server()
        try:
            with pytest.raises(UnavailableError) as info:
                if kind == "sync":
                    with LossClient(server.address, timeout_s=60) as client:
                        for _ in client.evaluate_many(_killing(server), pack=pack):
                            pass
                else:
                    asyncio.run(asyncio.wait_for(run_async(server.address), 60))
            assert isinstance(info.value, ConnectionError)
        finally:
            server.stop()
