"""LossClient and AsyncLossClient: remote calls that feel like torch.nn.functional.

Both clients have the same methods (the async ones are coroutines / async iterators). Inputs
may be numpy arrays or torch tensors in any layout; results come back as the kind of the
input (torch in -> torch out) with torch's shape and dtype. Transport errors become the
exceptions in :mod:`lossd_client.errors`, chosen by status code.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import grpc

from . import layout, tensors
from . import requests as rq
from ._proto.lossd.v1 import loss_pb2 as pb
from ._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from .errors import LossdError, from_rpc_error
from .requests import EvaluateResult, LoglikelihoodResult, LossRequest, PerplexityResult
from .shm import SegmentPool, SharedMemoryArena

SERVICE = "lossd.v1.LossService"
#: Requests with at most this many tensor bytes never ask the server for its limit (a server's
#: --max-message-bytes is at least 1024).
_SMALL_REQUEST_BYTES = 512
_CHUNKED_METHOD = f"/{SERVICE}/EvaluateChunked"


#: A call is replayable while its request messages fit this buffer (with gRPC's default, 256 KiB,
#: 1 MiB requests in flight on a crashed replica failed instead of being replayed). The buffer
#: keeps a call's serialised messages until the server answers.
_RETRY_BUFFER_BYTES = 64 * 1024 * 1024


def service_config(*, retries: int = 5) -> str:
    """round_robin over every resolved address, and retries of UNAVAILABLE and CANCELLED with backoff.

    Evaluations are idempotent, so replaying a call that got no answer is safe. gRPC replays a
    call only before the server has answered anything (and only while its messages fit the
    per-call retry buffer, set to 64 MiB by the clients). A replica that shuts down cancels calls its
    transport received but its handlers never started: the client sees CANCELLED for those (seen
    in tests/test_replicas.py), so CANCELLED is retried too; a call the caller cancels itself
    is never retried.
    """
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": max(2, min(retries, 5)),
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                    },
                }
            ],
        }
    )


def normalise_target(target: str | Sequence[str]) -> str:
    """One address, a ``dns:///`` target, or several ``host:port`` IP addresses (round robin)."""
    if isinstance(target, str):
        return target
    addresses = list(target)
    if not addresses:
        raise ValueError("target: no address given")
    if len(addresses) == 1:
        return addresses[0]
    if all(_is_ipv4(a) for a in addresses):
        return "ipv4:" + ",".join(addresses)
    if all(a.startswith("[") and "]:" in a for a in addresses):
        return "ipv6:" + ",".join(addresses)
    raise ValueError(
        f"target: several addresses must all be IPv4 host:port or all [IPv6]:port, got {addresses}; "
        "for a name that resolves to several replicas use one dns:///name:port target"
    )


def _is_ipv4(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts)


def _channel_options(max_message_bytes: int, retries: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", service_config(retries=retries)),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", _RETRY_BUFFER_BYTES),
    ]


def _credentials(root_certificates: bytes | None, private_key: bytes | None, certificate_chain: bytes | None):
    if root_certificates is None and private_key is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain)


def _request(
    input: Any,
    target: Any,
    loss: str,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    pos_weight: Any = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    **options: Any,
) -> LossRequest:
    if size_average is not None or reduce is not None:
        reduction = rq.legacy_reduction(size_average, reduce)
    return LossRequest(input, target, loss, weight, ignore_index, reduction, label_smoothing, pos_weight, **options)


def _pack_size(window: int, pack: int | None) -> int:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return max(1, window // 4) if pack is None else max(1, min(pack, window))


class _Order:
    """Request ids in submission order, answers buffered until they can be yielded in order."""

    def __init__(self) -> None:
        self._kinds: dict[str, bool] = {}
        self._order: list[str] = []
        self._ready: dict[str, pb.EvaluateResponse] = {}
        self._next = 0

    def add(self, req: LossRequest) -> pb.EvaluateRequest:
        msg, as_torch = rq.build(req)
        msg.id = str(len(self._order))
        self._kinds[msg.id] = as_torch
        self._order.append(msg.id)
        return msg

    def ready(self, responses: Iterable[pb.EvaluateResponse], return_exceptions: bool) -> Iterator[EvaluateResult | LossdError]:
        for response in responses:
            if response.id not in self._kinds:
                rq.parse(response, False)  # raises the item's error
                raise LossdError(f"answer for unknown id {response.id!r}")
            self._ready[response.id] = response
        while self._next < len(self._order) and self._order[self._next] in self._ready:
            rid = self._order[self._next]
            self._next += 1
            yield LossClient._item(self._ready.pop(rid), self._kinds.pop(rid), return_exceptions)

    def finish(self) -> Iterator[EvaluateResult | LossdError]:
        if self._next < len(self._order):
            raise LossdError(f"the stream ended with {len(self._order) - self._next} of {len(self._order)} results missing")
        return iter(())


class _Base:
    def __init__(
        self,
        target: str | Sequence[str] = "127.0.0.1:50051",
        *,
        timeout_s: float | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        max_message_bytes: int = -1,
        retries: int = 5,
        chunk_bytes: int = rq.DEFAULT_CHUNK_BYTES,
        chunks_in_flight: int = 8,
        chunked_above_bytes: int = layout.CHUNKED_ABOVE_BYTES,
        shared_memory: bool = False,
        shm_min_bytes: int = 1024 * 1024,
    ) -> None:
        self.target = normalise_target(target)
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.chunks_in_flight = chunks_in_flight
        self.chunked_above_bytes = chunked_above_bytes
        self.shared_memory = shared_memory
        self.shm_min_bytes = shm_min_bytes
        self._segments = SegmentPool()
        self._credentials = _credentials(root_certificates, private_key, certificate_chain)
        self._options = _channel_options(max_message_bytes, retries)
        self._server_max: int | None = None

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s


class LossClient(_Base):
    """Blocking client. ``LossClient("127.0.0.1:50051")``; use as a context manager.

    ``target`` may be one ``host:port``, a ``dns:///name:port`` target, or a list of addresses
    (client-side round robin). TLS: pass ``root_certificates`` (and for mTLS ``private_key`` and
    ``certificate_chain``) as PEM bytes.
    """

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=self._options)
        else:
            self._channel = grpc.secure_channel(self.target, self._credentials, options=self._options)
        self._stub = pb_grpc.LossServiceStub(self._channel)

    def __enter__(self) -> LossClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and unlink this client's shared-memory segments."""
        self._channel.close()
        self._segments.close()

    # ------------------------------------------------------------------ torch.nn.functional mirror
    def cross_entropy(
        self,
        input: Any,
        target: Any,
        weight: Any = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        size_average: bool | None = None,
        reduce: bool | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """torch.nn.functional.cross_entropy, evaluated by the server."""
        req = _request(input, target, "cross_entropy", weight, ignore_index, reduction, label_smoothing, None, size_average, reduce)
        return self.evaluate(req, timeout_s=timeout_s).loss

    def nll_loss(
        self,
        input: Any,
        target: Any,
        weight: Any = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        size_average: bool | None = None,
        reduce: bool | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """torch.nn.functional.nll_loss, evaluated by the server."""
        req = _request(input, target, "nll_loss", weight, ignore_index, reduction, 0.0, None, size_average, reduce)
        return self.evaluate(req, timeout_s=timeout_s).loss

    def binary_cross_entropy_with_logits(
        self,
        input: Any,
        target: Any,
        weight: Any = None,
        reduction: str = "mean",
        pos_weight: Any = None,
        *,
        size_average: bool | None = None,
        reduce: bool | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """torch.nn.functional.binary_cross_entropy_with_logits, evaluated by the server."""
        req = _request(input, target, "binary_cross_entropy_with_logits", weight, -100, reduction, 0.0, pos_weight, size_average, reduce)
        return self.evaluate(req, timeout_s=timeout_s).loss

    # ------------------------------------------------------------------ general calls
    def evaluate(self, request: LossRequest | None = None, *, timeout_s: float | None = None, **fields: Any) -> EvaluateResult:
        """Evaluate a LossRequest (or its fields as keywords); returns loss and totals.

        Requests larger than the server's message limit (or than ``chunked_above_bytes``, which bounds the
        server's memory per request) go through EvaluateChunked by themselves.
        """
        req = request if request is not None else LossRequest(**fields)
        if self.shared_memory:
            with SharedMemoryArena(self.shm_min_bytes, self._segments) as arena:
                msg, as_torch = rq.build(req, arena)
                return self._call(msg, as_torch, self._timeout(timeout_s))
        timeout = self._timeout(timeout_s)
        size = rq.request_nbytes(req)
        if size > _SMALL_REQUEST_BYTES and (size > self._limit(timeout) or size > self.chunked_above_bytes):
            return self._call_chunked(req, timeout)
        msg, as_torch = rq.build(req)
        return self._call(msg, as_torch, timeout)

    def _call(self, msg: pb.EvaluateRequest, as_torch: bool, timeout: float | None) -> EvaluateResult:
        try:
            response = self._stub.Evaluate(msg, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return rq.parse(response, as_torch)

    def _call_chunked(self, req: LossRequest, timeout: float | None) -> EvaluateResult:
        """EvaluateChunked with pre-serialised chunks cut from the caller's arrays."""
        call = self._channel.stream_unary(_CHUNKED_METHOD, request_serializer=None, response_deserializer=pb.EvaluateResponse.FromString)
        try:
            response = call(rq.chunk_payloads(req, self.chunk_bytes, self._server_max), timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return rq.parse(response, tensors.is_torch_tensor(req.input))

    def perplexity(
        self, logits: Any, tokens: Any, *, shift: bool = True, ignore_index: int = -100, timeout_s: float | None = None
    ) -> PerplexityResult:
        """(B, T, V) logits and (B, T) token ids -> per-token NLL, per-sequence and corpus perplexity."""
        result = self.evaluate(rq.perplexity_request(logits, tokens, shift=shift, ignore_index=ignore_index), timeout_s=timeout_s)
        return rq.perplexity_result(result)

    def loglikelihood(self, logits: Any, tokens: Any, continuation_start: Any, *, timeout_s: float | None = None) -> LoglikelihoodResult:
        """lm-evaluation-harness loglikelihood: per sequence (sum of continuation log-probs, is_greedy)."""
        result = self.evaluate(rq.loglikelihood_request(logits, tokens, continuation_start), timeout_s=timeout_s)
        return rq.loglikelihood_result(result)

    def evaluate_many(
        self,
        requests: Iterable[LossRequest],
        *,
        window: int = 64,
        pack: int | None = None,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> Iterator[EvaluateResult | LossdError]:
        """Score many requests over one stream, ``window`` in flight; results in input order.

        Requests travel ``pack`` per message over EvaluatePacked (default ``window // 4``, so
        several messages are in flight while the server computes); ``pack=1`` uses
        EvaluateStream, one request per message.
        """
        pack = _pack_size(window, pack)
        slots = threading.Semaphore(window)
        order = _Order()
        stop = threading.Event()

        def next_slot(first: bool) -> bool:
            if not first:
                return slots.acquire(blocking=False)
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return False
            return not stop.is_set()

        def produce() -> Iterator[pb.EvaluateRequest | pb.EvaluateBatch]:
            source = iter(requests)
            while True:
                batch = []
                while len(batch) < pack and next_slot(first=not batch):
                    req = next(source, None)
                    if req is None:
                        slots.release()
                        break
                    batch.append(order.add(req))
                if not batch:
                    return
                yield batch[0] if pack == 1 else pb.EvaluateBatch(requests=batch)
                if len(batch) < pack and stop.is_set():
                    return

        method = self._stub.EvaluateStream if pack == 1 else self._stub.EvaluatePacked
        call = method(produce(), timeout=self._timeout(timeout_s))
        try:
            for message in call:
                responses = [message] if pack == 1 else message.responses
                for _ in responses:
                    slots.release()
                yield from order.ready(responses, return_exceptions)
            yield from order.finish()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            stop.set()
            call.cancel()

    @staticmethod
    def _item(response: pb.EvaluateResponse, as_torch: bool, return_exceptions: bool) -> EvaluateResult | LossdError:
        try:
            return rq.parse(response, as_torch)
        except LossdError as exc:
            if return_exceptions:
                return exc
            raise

    def server_info(self, *, timeout_s: float | None = None) -> pb.ServerInfo:
        """The server's versions, device and limits (GetServerInfo)."""
        try:
            return self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self._timeout(timeout_s))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The server's health status name (SERVING, NOT_SERVING, ...)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout_s) or 5.0)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def _limit(self, timeout: float | None) -> int:
        """Tensor bytes a unary request may carry (the server's limit less room for the rest)."""
        if self._server_max is None:
            self._server_max = int(self.server_info(timeout_s=timeout).max_receive_message_bytes)
        return layout.unary_budget(self._server_max)


class AsyncLossClient(_Base):
    """asyncio twin of :class:`LossClient` (same methods, awaitable); ``async with`` it."""

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
        self._stub = pb_grpc.LossServiceStub(self._channel)

    async def __aenter__(self) -> AsyncLossClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel and unlink this client's shared-memory segments."""
        await self._channel.close()
        self._segments.close()

    async def cross_entropy(
        self,
        input: Any,
        target: Any,
        weight: Any = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        size_average: bool | None = None,
        reduce: bool | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """torch.nn.functional.cross_entropy, evaluated by the server."""
        req = _request(input, target, "cross_entropy", weight, ignore_index, reduction, label_smoothing, None, size_average, reduce)
        return (await self.evaluate(req, timeout_s=timeout_s)).loss

    async def nll_loss(
        self,
        input: Any,
        target: Any,
        weight: Any = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        size_average: bool | None = None,
        reduce: bool | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """torch.nn.functional.nll_loss, evaluated by the server."""
        req = _request(input, target, "nll_loss", weight, ignore_index, reduction, 0.0, None, size_average, reduce)
        return (await self.evaluate(req, timeout_s=timeout_s)).loss

    async def binary_cross_entropy_with_logits(
        self,
        input: Any,
        target: Any,
        weight: Any = None,
        reduction: str = "mean",
        pos_weight: Any = None,
        *,
        size_average: bool | None = None,
        reduce: bool | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """torch.nn.functional.binary_cross_entropy_with_logits, evaluated by the server."""
        req = _request(input, target, "binary_cross_entropy_with_logits", weight, -100, reduction, 0.0, pos_weight, size_average, reduce)
        return (await self.evaluate(req, timeout_s=timeout_s)).loss

    async def evaluate(self, request: LossRequest | None = None, *, timeout_s: float | None = None, **fields: Any) -> EvaluateResult:
        """Async twin of :meth:`LossClient.evaluate`."""
        req = request if request is not None else LossRequest(**fields)
        if self.shared_memory:
            with SharedMemoryArena(self.shm_min_bytes, self._segments) as arena:
                msg, as_torch = rq.build(req, arena)
                return await self._call(msg, as_torch, self._timeout(timeout_s))
        timeout = self._timeout(timeout_s)
        size = rq.request_nbytes(req)
        if size > _SMALL_REQUEST_BYTES and (size > await self._limit(timeout) or size > self.chunked_above_bytes):
            return await self._call_chunked(req, timeout)
        msg, as_torch = rq.build(req)
        return await self._call(msg, as_torch, timeout)

    async def _call(self, msg: pb.EvaluateRequest, as_torch: bool, timeout: float | None) -> EvaluateResult:
        try:
            response = await self._stub.Evaluate(msg, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return rq.parse(response, as_torch)

    async def _call_chunked(self, req: LossRequest, timeout: float | None) -> EvaluateResult:
        call = self._channel.stream_unary(_CHUNKED_METHOD, request_serializer=None, response_deserializer=pb.EvaluateResponse.FromString)
        try:
            response = await call(rq.chunk_payloads(req, self.chunk_bytes, self._server_max), timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return rq.parse(response, tensors.is_torch_tensor(req.input))

    async def perplexity(
        self, logits: Any, tokens: Any, *, shift: bool = True, ignore_index: int = -100, timeout_s: float | None = None
    ) -> PerplexityResult:
        """Async twin of :meth:`LossClient.perplexity`."""
        result = await self.evaluate(rq.perplexity_request(logits, tokens, shift=shift, ignore_index=ignore_index), timeout_s=timeout_s)
        return rq.perplexity_result(result)

    async def loglikelihood(
        self, logits: Any, tokens: Any, continuation_start: Any, *, timeout_s: float | None = None
    ) -> LoglikelihoodResult:
        """Async twin of :meth:`LossClient.loglikelihood`."""
        result = await self.evaluate(rq.loglikelihood_request(logits, tokens, continuation_start), timeout_s=timeout_s)
        return rq.loglikelihood_result(result)

    async def evaluate_many(
        self,
        requests: Iterable[LossRequest] | AsyncIterable[LossRequest],
        *,
        window: int = 64,
        pack: int | None = None,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> AsyncIterator[EvaluateResult | LossdError]:
        """Async twin of :meth:`LossClient.evaluate_many`."""
        pack = _pack_size(window, pack)
        method = self._stub.EvaluateStream if pack == 1 else self._stub.EvaluatePacked
        call = method(timeout=self._timeout(timeout_s))
        slots = asyncio.Semaphore(window)
        order = _Order()

        async def source() -> AsyncIterator[LossRequest]:
            if hasattr(requests, "__aiter__"):
                async for item in requests:  # type: ignore[union-attr]
                    yield item
            else:
                for item in requests:  # type: ignore[union-attr]
                    yield item

        async def send(batch: list[pb.EvaluateRequest]) -> None:
            await call.write(batch[0] if pack == 1 else pb.EvaluateBatch(requests=batch))

        async def writer() -> None:
            try:
                batch: list[pb.EvaluateRequest] = []
                async for req in source():
                    if batch and (len(batch) >= pack or slots.locked()):
                        await send(batch)
                        batch = []
                    await slots.acquire()
                    batch.append(order.add(req))
                if batch:
                    await send(batch)
                await call.done_writing()
            except BaseException:
                call.cancel()  # the reader must not wait for answers that will never come
                raise

        write_task = asyncio.ensure_future(writer())
        try:
            async for message in call:
                responses = [message] if pack == 1 else message.responses
                for _ in responses:
                    slots.release()
                for result in order.ready(responses, return_exceptions):
                    yield result
            await write_task
            for result in order.finish():
                yield result
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            if write_task.done() and not write_task.cancelled() and write_task.exception() is not None:
                raise write_task.exception() from exc
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise from_rpc_error(exc) from exc
        finally:
            write_task.cancel()
            call.cancel()

    async def server_info(self, *, timeout_s: float | None = None) -> pb.ServerInfo:
        """The server's versions, device and limits (GetServerInfo)."""
        try:
            return await self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self._timeout(timeout_s))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The server's health status name (SERVING, NOT_SERVING, ...)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout_s) or 5.0)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def _limit(self, timeout: float | None) -> int:
        if self._server_max is None:
            info = await self.server_info(timeout_s=timeout)
            self._server_max = int(info.max_receive_message_bytes)
        return layout.unary_budget(self._server_max)
