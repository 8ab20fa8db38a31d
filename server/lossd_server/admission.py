"""``--max-concurrent-calls``: lossd's own admission, so that refused calls are answered and counted.

gRPC's ``maximum_concurrent_rpcs`` refuses a call past the limit after the server's interceptors
have resolved its handler but without running it, so the RPC metrics never saw those calls:
``lossd_requests_total{code="RESOURCE_EXHAUSTED"}`` stayed flat exactly while the server turned
callers away. :class:`Admission` keeps the same limit as the innermost interceptor instead: a call
past it gets a handler that answers RESOURCE_EXHAUSTED at once, without reading a message, and the
metrics interceptor around it counts it like any other call.

A call holds its slot for as long as gRPC's task for it runs (the handler, then sending its status):
what gRPC's limiter counted. The interceptor runs in that task, so its end frees the slot whatever
ends it (an answer, a cancel, the server's stop).

Health checks (``grpc.health.v1.Health``: Check, Watch, List) have slots of their own. Counted with
lossd's calls, they were refused while lossd's slots were full, so a liveness probe (a gRPC health
check in ``docker/k8s/deployment.yaml``) restarted a pod that was merely at its call limit, or whose
slots an attacker held, cutting every call in progress. Their pool is bounded too, or Watch streams
(one per watching client, or an attacker's) would hold state without limit: at the same count,
``max_calls``. The bound is there for memory (each call holds ~13 KB of gRPC and Python state before
it reads a byte), and a second pool of that count at most doubles it; a small constant instead would
let a few hundred Watch streams lock the probes out, where this costs an attacker as much as filling
lossd's own slots, and one flag bounds both.

GetServerInfo and reflection count with lossd's calls. GetServerInfo is what a client asks before
its lossd calls, which a full server refuses anyway (and a fresh client's burst of them would
otherwise compete with the probes); reflection is a stream for people's tools, open for as long as
its client likes, not something an orchestrator probes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

#: The service whose calls take the health slots.
HEALTH_SERVICE = "grpc.health.v1.Health"
_HEALTH_PREFIX = f"/{HEALTH_SERVICE}/"


class Slots:
    """One pool of at most ``limit`` calls at once; ``details``: the text a call past it is refused with."""

    def __init__(self, limit: int, details: str) -> None:
        self.limit = limit
        self.active = 0
        self.details = details
        self._refusals: dict[str, grpc.RpcMethodHandler] = {}

    def take(self, task: asyncio.Task) -> bool:
        """A slot for the call running in ``task``, held until the task ends; False when none is free."""
        if self.active >= self.limit:
            return False
        self.active += 1
        task.add_done_callback(self._finished)
        return True

    def _finished(self, _task: asyncio.Task) -> None:
        self.active -= 1

    def refusal(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The method's refusing handler, built once: registered as a client stream (same wire as
        any method) so that it answers without waiting for a request message."""
        refusal = self._refusals.get(method)
        if refusal is None:
            details = self.details

            async def refuse(_request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.set_details(details)

            make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
            refusal = self._refusals[method] = make(refuse, handler.request_deserializer, handler.response_serializer)
        return refusal


class Admission(grpc.aio.ServerInterceptor):
    """At most ``max_calls`` calls at once in this process, and apart from them at most as many
    health checks; the ones past either bound are refused RESOURCE_EXHAUSTED."""

    def __init__(self, max_calls: int) -> None:
        if max_calls < 1:
            raise ValueError(f"max_calls must be >= 1, got {max_calls}")
        self.max_calls = max_calls
        self.calls = Slots(
            max_calls,
            f"this server process already serves max_concurrent_calls ({max_calls}) calls; "
            "retry later, or on another replica (--max-concurrent-calls)",
        )
        self.health = Slots(
            max_calls,
            f"this server process already serves {max_calls} health checks, the health service's own slots "
            "(as many as max_concurrent_calls, apart from lossd's calls); retry later (--max-concurrent-calls)",
        )

    @property
    def active(self) -> int:
        """lossd's calls in progress (health checks not counted)."""
        return self.calls.active

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no such method: gRPC answers UNIMPLEMENTED
        task = asyncio.current_task()
        if task is None:  # not in a call's task (never seen): nothing would free the slot
            return handler
        method = handler_call_details.method
        slots = self.health if method.startswith(_HEALTH_PREFIX) else self.calls
        return handler if slots.take(task) else slots.refusal(method, handler)
