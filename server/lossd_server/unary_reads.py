"""Unary-request methods registered as client streams that read their one message, so every call ends.

gRPC Python's own unary handling never answers a call whose client half-closes without sending a
message: the handler is never run, no status is sent, and the call stays open (about 13 KB of
server memory) until the client leaves. It also waits for the message without any bound. 20,000
such GetServerInfo calls on one connection were all still open after 75 s (RSS 248 -> 619 MiB);
80,000 Health/Check calls over 4 connections took a server on a 600 MiB budget to 1,061 MiB. Read
through :func:`read_request`, such a call is answered INVALID_ARGUMENT at once, and one whose
message does not arrive within ``stream_idle_timeout_s`` DEADLINE_EXCEEDED, as lossd's own
methods answer them (see ``Call.read``; one text, :func:`.errors.idle_message`). Same wire: clients call these methods as before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2

from .errors import idle_message

#: Largest health request this server parses: a service name is a few dozen bytes
#: ("lossd.v1.LossService"); a 60 MB one held 455 MiB of the server's memory, outside its budget.
MAX_HEALTH_REQUEST_BYTES = 4096


class Unreadable:
    """Stands in for a request message refused unparsed (too long) or that does not parse:
    answered INVALID_ARGUMENT with ``details`` (a deserializer that raised was answered UNKNOWN)."""

    __slots__ = ("details",)

    def __init__(self, details: str) -> None:
        self.details = details


def bounded(parse: Callable[[bytes], Any], what: str, max_bytes: int) -> Callable[[bytes], Any]:
    """A request deserializer: ``parse(data)``, or :class:`Unreadable` for data over ``max_bytes``
    or that ``parse`` refuses."""

    def deserialize(data: bytes) -> Any:
        if len(data) > max_bytes:
            return Unreadable(f"request: a {what} of {len(data)} bytes, more than the {max_bytes} this server reads")
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - bad bytes are the client's mistake, not UNKNOWN
            return Unreadable(f"request: not a valid {what} message: {exc}")

    return deserialize


class NoRequest(Exception):
    """The call's request message did not come: the status to answer it with."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


async def read_request(context: grpc.aio.ServicerContext, what: str, idle_s: float) -> Any:
    """The call's one request message; NoRequest when none comes."""
    try:
        async with asyncio.timeout(idle_s):
            message = await context.read()
    except TimeoutError:
        raise NoRequest(grpc.StatusCode.DEADLINE_EXCEEDED, idle_message(f"completed no {what} message", idle_s)) from None
    if message is grpc.aio.EOF:
        raise NoRequest(grpc.StatusCode.INVALID_ARGUMENT, f"request: the call carried no {what} message")
    if isinstance(message, Unreadable):
        raise NoRequest(grpc.StatusCode.INVALID_ARGUMENT, message.details)
    return message


class StopGate(Protocol):
    """What a graceful stop needs of every call (lossd_server.calls.CallTracker): its start, and
    its answer held while the stop takes the calls gRPC's transport holds."""

    def note_start(self) -> None: ...

    async def may_answer(self, deadline: float | None = None) -> None: ...


def reading(handler: grpc.RpcMethodHandler, what: str, idle_s: float, gate: StopGate | None = None) -> grpc.RpcMethodHandler:
    """A unary-request ``handler`` (a coroutine function; unary or server-streaming response) as a
    client-streaming one that reads its request with :func:`read_request`. ``gate``: the server's
    stop sees the call start and, for a unary response, holds its answer as it holds lossd's
    (a client polling Check or GetServerInfo saw a CANCELLED in about half the stops)."""
    inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]] = handler.unary_unary or handler.unary_stream

    async def run(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        if gate is not None:
            gate.note_start()
        try:
            request = await read_request(context, what, idle_s)
        except NoRequest as missing:  # answered with set_code, as lossd's errors are (no stored exception)
            context.set_code(missing.code)
            context.set_details(missing.details)
            return None
        answer = await inner(request, context)
        if gate is not None and handler.unary_unary is not None:
            remaining = context.time_remaining()
            await gate.may_answer(None if remaining is None else time.monotonic() + remaining)
        return answer

    make = grpc.stream_unary_rpc_method_handler if handler.unary_unary is not None else grpc.stream_stream_rpc_method_handler
    return make(run, handler.request_deserializer, handler.response_serializer)


def health_handlers(servicer: Any, idle_s: float, gate: StopGate | None = None) -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health served by ``servicer`` (grpc_health's aio HealthServicer), its unary
    requests read by :func:`reading` (what ``add_HealthServicer_to_server`` registers, otherwise)."""
    check = bounded(health_pb2.HealthCheckRequest.FromString, "HealthCheckRequest", MAX_HEALTH_REQUEST_BYTES)
    response = health_pb2.HealthCheckResponse.SerializeToString
    methods: dict[str, tuple[grpc.RpcMethodHandler, str]] = {
        "Check": (grpc.unary_unary_rpc_method_handler(servicer.Check, check, response), "HealthCheckRequest"),
        "Watch": (grpc.unary_stream_rpc_method_handler(servicer.Watch, check, response), "HealthCheckRequest"),
    }
    if hasattr(servicer, "List") and hasattr(health_pb2, "HealthListRequest"):
        listing = grpc.unary_unary_rpc_method_handler(
            servicer.List,
            bounded(health_pb2.HealthListRequest.FromString, "HealthListRequest", MAX_HEALTH_REQUEST_BYTES),
            health_pb2.HealthListResponse.SerializeToString,
        )
        methods["List"] = (listing, "HealthListRequest")
    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {name: reading(handler, what, idle_s, gate) for name, (handler, what) in methods.items()}
    )
