"""Races between a call and its end, seen from the clients: a deadline that passes just before a
client stream's half-close (probe 16 F1), a server killed while a stream is written to (F2), and a
fresh client's concurrent first calls, which need the server's message limit (F8)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import numpy as np
import pytest
from lossd_client import AsyncLossClient, LossClient
from lossd_client.errors import DeadlineExceededError, UnavailableError
from lossd_client.types import ServerInfo
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


@pytest.fixture(scope="module")
def metrics_server():
    proc = start_server(metrics=True)
    yield proc
    proc.stop()


def _server_info_calls(server) -> float:
    """GetServerInfo calls the server has answered, whatever their status."""
    return sum(v for k, v in server.metrics().items() if k.startswith("lossd_requests_total{") and 'method="GetServerInfo"' in k)


#: Over SMALL_REQUEST_BYTES (512): the client needs the server's message limit to route it.
SMALL_X, SMALL_Y = np.zeros((20, 10), np.float32), np.zeros(20, np.int64)


def test_concurrent_first_calls_of_a_fresh_async_client_share_one_server_info_lookup(metrics_server):
    """Each of them asked the server for its limit (200 concurrent calls: 200 GetServerInfo
    calls), each inside its own deadline; now one lookup is in flight and the others wait for it."""

    async def main():
        async with AsyncLossClient(metrics_server.address, timeout_s=60) as client:
            losses = await asyncio.gather(*(client.cross_entropy(SMALL_X, SMALL_Y) for _ in range(50)))
            assert len(losses) == 50
            await asyncio.gather(*(client.cross_entropy(SMALL_X, SMALL_Y) for _ in range(10)))

    before = _server_info_calls(metrics_server)
    asyncio.run(asyncio.wait_for(main(), 60))
    assert _server_info_calls(metrics_server) - before == 1


def test_concurrent_first_calls_of_a_fresh_blocking_client_share_one_server_info_lookup(metrics_server):
    """32 threads' first calls on one LossClient sent 10-13 GetServerInfo calls."""
    before = _server_info_calls(metrics_server)
    with LossClient(metrics_server.address, timeout_s=60) as client:
        start, errors = threading.Barrier(32), []

        def first_call():
            start.wait(30)
            try:
                client.cross_entropy(SMALL_X, SMALL_Y)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=first_call) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads)
    assert _server_info_calls(metrics_server) - before == 1


def test_an_explicit_server_info_gives_the_limit_to_later_calls(metrics_server):
    """server_info() did not fill the client's cache: the first large call asked again."""
    before = _server_info_calls(metrics_server)
    with LossClient(metrics_server.address, timeout_s=60) as client:
        assert isinstance(client.server_info(), ServerInfo)
        client.cross_entropy(SMALL_X, SMALL_Y)
        client.server_info()  # an explicit call always asks the server
    assert _server_info_calls(metrics_server) - before == 2


def test_a_lookup_that_failed_by_its_leaders_deadline_or_cancellation_is_looked_up_again_by_the_others(metrics_server):
    """The callers waiting for a lookup whose leader's deadline passed, or whose leader's task was
    cancelled, are not failed by it (nor cancelled): one of them looks up again. The server is
    stopped (SIGSTOP) while the leader's lookup is in flight."""

    async def stalled_lookup(leader_timeout_s: float | None, cancel: bool) -> None:
        async with AsyncLossClient(metrics_server.address, timeout_s=60) as client:
            metrics_server.signal(signal.SIGSTOP)
            try:
                leader = asyncio.ensure_future(client.cross_entropy(SMALL_X, SMALL_Y, timeout_s=leader_timeout_s))
                others = [asyncio.ensure_future(client.cross_entropy(SMALL_X, SMALL_Y)) for _ in range(5)]
                await asyncio.sleep(0.2)  # all of them wait for the leader's lookup
                if cancel:
                    leader.cancel()
                with pytest.raises(asyncio.CancelledError if cancel else DeadlineExceededError):
                    await leader
            finally:
                metrics_server.signal(signal.SIGCONT)
            assert len(await asyncio.gather(*others)) == 5

    asyncio.run(asyncio.wait_for(stalled_lookup(0.1, cancel=False), 60))
    asyncio.run(asyncio.wait_for(stalled_lookup(None, cancel=True), 60))
