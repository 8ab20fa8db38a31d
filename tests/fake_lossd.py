"""A fake lossd server for client tests: LossService's methods with crafted answers and delays.

``python fake_lossd.py CALLS_FILE MODE_JSON`` serves on 127.0.0.1 (a port the OS picks, printed
on the first line of stdout) until killed. Every call appends a line to CALLS_FILE when it starts
(``<method>``) and when the client cancels it (``<method> cancelled``). MODE_JSON sets:

- ``info_delay_s`` / ``eval_delay_s`` / ``compare_delay_s``: how long GetServerInfo, Evaluate and
  EvaluateChunked (after reading every message), and Compare wait before they answer;
- ``max_receive_message_bytes`` / ``max_send_message_bytes``: what GetServerInfo claims
  (default 4 MiB each);
- ``never_end``: EvaluateStream and EvaluatePacked answer every request, then never end the
  stream (until the client cancels it).

The answers are well formed: a 0-d loss of the input's dtype with its totals ('mean' and 'sum'
requests only), and a Compare answer shaped like the request. Uses :mod:`grpc.aio` generic
handlers, bytes in and out, so nothing of lossd's server is involved.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from lossd_client._proto.lossd.v1 import loss_pb2 as pb

SERVICE = "lossd.v1.LossService"
_NUMPY = {pb.FLOAT32: "<f4", pb.FLOAT64: "<f8", pb.FLOAT16: "<f2"}


def _answer(rid: str, dtype: int, rows: int) -> pb.EvaluateResponse:
    """A well-formed answer to a 'mean' or 'sum' request over ``rows`` counted rows."""
    response = pb.EvaluateResponse(id=rid, loss_sum=0.5 * rows, weight_sum=float(rows), counted=rows)
    response.loss.dtype = dtype
    response.loss.data = np.array(0.5, _NUMPY.get(dtype, "<f4")).tobytes()
    return response


def _tensor(dtype: int, shape: list[int], value: float) -> pb.Tensor:
    data = np.full(math.prod(shape), value, "<f4" if dtype == pb.FLOAT32 else "u1").tobytes()
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


class Fake:
    """The handlers, configured by ``mode``; each call is logged to ``calls``."""

    def __init__(self, calls: str, mode: dict[str, Any]) -> None:
        self._calls = calls
        self._mode = mode

    def _log(self, line: str) -> None:
        with open(self._calls, "a") as f:
            f.write(line + "\n")

    async def _delay(self, key: str) -> None:
        await asyncio.sleep(float(self._mode.get(key, 0)))

    def logged(self, method: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """``handler`` with its start and its cancellation logged."""

        async def unary(request: Any, context: Any) -> Any:
            self._log(method)
            try:
                return await handler(request, context)
            except asyncio.CancelledError:
                self._log(f"{method} cancelled")
                raise

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            self._log(method)
            try:
                async for answer in handler(request, context):
                    yield answer
            except asyncio.CancelledError:
                self._log(f"{method} cancelled")
                raise

        return streaming if method in ("EvaluateStream", "EvaluatePacked") else unary

    async def get_server_info(self, request: bytes, context: Any) -> bytes:
        await self._delay("info_delay_s")
        info = pb.ServerInfo(
            version="fake",
            torch_version="0",
            device="cpu",
            max_receive_message_bytes=int(self._mode.get("max_receive_message_bytes", 4 << 20)),
            max_send_message_bytes=int(self._mode.get("max_send_message_bytes", 4 << 20)),
            max_top_k=16,
            max_id_bytes=1024,
        )
        return info.SerializeToString()

    async def evaluate(self, request: bytes, context: Any) -> bytes:
        await self._delay("eval_delay_s")
        req = pb.EvaluateRequest.FromString(request)
        return _answer(req.id, req.input.dtype, req.input.shape[0] if req.input.shape else 1).SerializeToString()

    async def evaluate_chunked(self, messages: AsyncIterator[bytes], context: Any) -> bytes:
        header = None
        async for message in messages:
            header = header or pb.EvaluateChunk.FromString(message).header
        await self._delay("eval_delay_s")
        return _answer(header.id, header.input_dtype, header.input_shape[0]).SerializeToString()

    async def evaluate_stream(self, messages: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for message in messages:
            req = pb.EvaluateRequest.FromString(message)
            yield _answer(req.id, req.input.dtype, req.input.shape[0]).SerializeToString()
        await self._never_end()

    async def evaluate_packed(self, messages: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for message in messages:
            batch = pb.EvaluateBatch.FromString(message)
            answers = [_answer(r.id, r.input.dtype, r.input.shape[0]) for r in batch.requests]
            yield pb.EvaluateBatchResults(responses=answers).SerializeToString()
        await self._never_end()

    async def _never_end(self) -> None:
        if self._mode.get("never_end"):
            await asyncio.Event().wait()  # until the client cancels the call

    async def compare(self, request: bytes, context: Any) -> bytes:
        await self._delay("compare_delay_s")
        req = pb.CompareRequest.FromString(request)
        shape = list(req.reference.shape[:-1])
        answer = pb.CompareResponse(id=req.id)
        answer.kl.CopyFrom(_tensor(pb.FLOAT32, shape, 0.01))
        answer.argmax_agree.CopyFrom(_tensor(pb.BOOL, shape, 1))
        answer.counted.CopyFrom(_tensor(pb.BOOL, shape, 1))
        answer.totals.tokens = math.prod(shape)
        return answer.SerializeToString()


async def serve(calls: str, mode: dict[str, Any]) -> None:
    fake = Fake(calls, mode)
    kinds: dict[str, tuple[Callable[..., Any], Callable[..., Awaitable[Any]]]] = {
        "GetServerInfo": (grpc.unary_unary_rpc_method_handler, fake.get_server_info),
        "Evaluate": (grpc.unary_unary_rpc_method_handler, fake.evaluate),
        "EvaluateChunked": (grpc.stream_unary_rpc_method_handler, fake.evaluate_chunked),
        "EvaluateStream": (grpc.stream_stream_rpc_method_handler, fake.evaluate_stream),
        "EvaluatePacked": (grpc.stream_stream_rpc_method_handler, fake.evaluate_packed),
        "Compare": (grpc.unary_unary_rpc_method_handler, fake.compare),
    }
    handlers = {name: kind(fake.logged(name, handler)) for name, (kind, handler) in kinds.items()}
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], json.loads(sys.argv[2])))
