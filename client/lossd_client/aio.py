"""AsyncLossClient: the asyncio twin of :class:`~lossd_client.LossClient`.

Same methods, options and results; the methods are awaitables and ``evaluate_many`` is an async
iterator. Like the blocking client it only does I/O (``grpc.aio``): requests, routing and
answers come from :mod:`lossd_client.core`, the shared methods from
:class:`~lossd_client.base.ClientBase`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from . import compare, core
from ._proto.lossd.v1 import loss_pb2 as pb
from .base import ClientBase
from .compare import CompareResult
from .errors import LossdError, from_rpc_error, rpc_errors
from .types import EvaluateResult, LoglikelihoodResult, LossRequest, PerplexityResult, ServerInfo

__all__ = ["AsyncLossClient"]


class AsyncLossClient(ClientBase[Awaitable[Any], Awaitable[PerplexityResult], Awaitable[LoglikelihoodResult], Awaitable[CompareResult]]):
    """asyncio twin of :class:`LossClient` (same methods, awaitable); ``async with`` it.

    Every option is a keyword, described on :class:`~lossd_client.base.ClientBase`.
    """

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncLossClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel and unlink this client's shared-memory segments."""
        await self._channel.close()
        self._segments.close()

    async def evaluate(self, request: LossRequest | None = None, *, timeout_s: float | None = None, **fields: Any) -> EvaluateResult:
        """Async twin of :meth:`LossClient.evaluate`."""
        req, timeout = core.request_of(request, fields), self._timeout(timeout_s)
        if self._needs_limit(req):
            self._server_max = (await self.server_info(timeout_s=timeout)).max_receive_message_bytes
        with self._route(req) as call, rpc_errors():
            response = await (
                self._evaluate_chunked(call.payloads, timeout=timeout) if call.chunked else self._evaluate(call.message, timeout=timeout)
            )
        return call.parse(response)

    async def evaluate_many(
        self,
        requests: Iterable[Any] | AsyncIterable[Any],
        *,
        window: int = 64,
        pack: int | None = None,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> AsyncIterator[EvaluateResult | LossdError]:
        """Async twin of :meth:`LossClient.evaluate_many` (the requests may also be an async iterable)."""
        stream = core.Stream(window, pack, return_exceptions)
        call = self._streams[stream.method](timeout=self._timeout(timeout_s))
        slots = asyncio.Semaphore(window)
        write_task = asyncio.ensure_future(_write(call, stream, requests, slots))
        try:
            async for message in call:
                answers = stream.answers(message)
                for _ in answers:
                    slots.release()
                for result in stream.ready(answers):
                    yield result
            await write_task
            stream.finish()
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            if write_task.done() and not write_task.cancelled() and write_task.exception() is not None:
                raise write_task.exception() from exc
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise from_rpc_error(exc) from exc
        finally:
            write_task.cancel()
            call.cancel()

    async def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        """The server's versions, device and limits (GetServerInfo)."""
        with rpc_errors():
            return core.server_info(await self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self._timeout(timeout_s)))

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The server's health status name (SERVING, NOT_SERVING, ...)."""
        check, request = self._health_check(service)
        with rpc_errors():
            return core.health_status(await check(request, timeout=self._timeout(timeout_s) or 5.0))

    async def _run(self, build: Callable[[], LossRequest], timeout_s: float | None, finish: Callable[[EvaluateResult], Any]) -> Any:
        return finish(await self.evaluate(build(), timeout_s=timeout_s))

    async def _compare(self, inputs: compare.CompareInputs, timeout: float | None, progress: Callable[[int], None] | None) -> CompareResult:
        if compare.needs_server_limit(inputs, self._server_max):
            self._server_max = (await self.server_info(timeout_s=timeout)).max_receive_message_bytes
        call, rpc = self._compare_call(inputs, progress)
        with rpc_errors():
            return call.parse(await rpc(call.request, timeout=timeout))


async def _items(requests: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if hasattr(requests, "__aiter__"):
        async for item in requests:  # type: ignore[union-attr]
            yield item
    else:
        for item in requests:  # type: ignore[union-attr]
            yield item


async def _write(call: Any, stream: core.Stream, requests: Iterable[Any] | AsyncIterable[Any], slots: asyncio.Semaphore) -> None:
    """The request side of ``evaluate_many``: an item is taken while a window slot is free; a batch
    is sent when it is full or no slot is left. A failing item or source ends the writing (the
    stream raises it after the answers before it); anything else cancels the call."""
    try:
        batch: list[core.Encoded] = []
        source = _items(requests)
        while (item := await _next(source, stream)) is not _END:
            if batch and (stream.full(batch) or slots.locked()):
                await call.write(stream.message(batch))
                batch = []
            await slots.acquire()
            msg = stream.add(item)
            if msg is None:
                break
            batch.append(msg)
        if batch:
            await call.write(stream.message(batch))
        await call.done_writing()
    except BaseException:
        call.cancel()  # the reader must not wait for answers that will never come
        raise


async def _next(source: AsyncIterator[Any], stream: core.Stream) -> Any:
    """The source's next item; _END at its end or when it fails (the failure goes to the stream)."""
    try:
        return await anext(source)
    except StopAsyncIteration:
        return _END
    except Exception as exc:  # noqa: BLE001 - the caller's iterable failed: raised after the answers before it
        stream.fail(exc)
        return _END


_END = object()
