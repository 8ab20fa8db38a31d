"""``--max-concurrent-calls``: lossd's own admission, so that refused calls are answered and counted.

gRPC's ``maximum_concurrent_rpcs`` refuses a call past the limit after the server's interceptors
have resolved its handler but without running it, so the RPC metrics never saw those calls:
``lossd_requests_total{code="RESOURCE_EXHAUSTED"}`` stayed flat exactly while the server turned
callers (health checks included) away. :class:`Admission` keeps the same limit as the innermost
interceptor instead: a call past it gets a handler that answers RESOURCE_EXHAUSTED at once, without
reading a message, and the metrics interceptor around it counts it like any other call.

A call holds its slot for as long as gRPC's task for it runs (the handler, then sending its status):
what gRPC's limiter counted. The interceptor runs in that task, so its end frees the slot whatever
ends it (an answer, a cancel, the server's stop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc


class Admission(grpc.aio.ServerInterceptor):
    """At most ``max_calls`` calls at once in this process; the ones past it are refused RESOURCE_EXHAUSTED."""

    def __init__(self, max_calls: int) -> None:
        if max_calls < 1:
            raise ValueError(f"max_calls must be >= 1, got {max_calls}")
        self.max_calls = max_calls
        self.active = 0
        self._refusals: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no such method: gRPC answers UNIMPLEMENTED
        task = asyncio.current_task()
        if task is None:  # not in a call's task (never seen): nothing would free the slot
            return handler
        if self.active >= self.max_calls:
            return self._refusal(handler_call_details.method, handler)
        self.active += 1
        task.add_done_callback(self._finished)
        return handler

    def _finished(self, _task: asyncio.Task) -> None:
        self.active -= 1

    def _refusal(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The method's refusing handler, built once: registered as a client stream (same wire as
        any method) so that it answers without waiting for a request message."""
        refusal = self._refusals.get(method)
        if refusal is None:
            details = (
                f"this server process already serves max_concurrent_calls ({self.max_calls}) calls; "
                "retry later, or on another replica (--max-concurrent-calls)"
            )

            async def refuse(_request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.set_details(details)

            make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
            refusal = self._refusals[method] = make(refuse, handler.request_deserializer, handler.response_serializer)
        return refusal
