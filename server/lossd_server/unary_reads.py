"""Unary-request methods registered as client streams that read their one message, so every call ends.

gRPC Python's own unary handling never answers a call whose client half-closes without sending a
message: the handler is never run, no status is sent, and the call stays open (about 13 KB of
server memory) until the client leaves. It also waits for the message without any bound. 20,000
such GetServerInfo calls on one connection were all still open after 75 s (RSS 248 -> 619 MiB);
80,000 Health/Check calls over 4 connections took a server on a 600 MiB budget to 1,061 MiB. Read
through :func:`read_request`, such a call is answered INVALID_ARGUMENT at once, and one whose
message does not arrive within ``stream_idle_timeout_s`` DEADLINE_EXCEEDED, as lossd's own
methods answer them (see ``Call.read``; one text, :func:`.errors.idle_message`). Same wire: clients call these methods as before.

Their messages are read as lossd's are (:meth:`.calls.Call.read`): the read first reserves what
gRPC's transport may receive for it, since the transport takes a whole message of up to its receive
limit, whatever the method, before the deserializer can refuse it (20 concurrent 100 MB health
checks took an idle server from 249 to 1,015 MiB). GetServerInfo reads within the server's memory
budget, as its own calls do; health checks within a budget of their own, :func:`health_reads`
(``--max-health-reads`` reads at once): in the server's, a probe would wait in line behind lossd's
calls whenever they fill it, and a liveness probe restart a pod that is only busy.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import wire
from .budget import SETTING as BUDGET_SETTING
from .budget import BudgetExceeded, GaveWay, MemoryBudget
from .calls import Call, Reads
from .config import ServerConfig
from .errors import GAVE_WAY_METADATA, StreamIdle

#: Largest health request this server parses: a service name is a few dozen bytes
#: ("lossd.v1.LossService"); a 60 MB one held 455 MiB of the server's memory, outside its budget.
MAX_HEALTH_REQUEST_BYTES = 4096


class Unreadable:
    """Stands in for a request message refused unparsed (too long) or that does not parse:
    answered INVALID_ARGUMENT with ``details`` (a deserializer that raised was answered UNKNOWN)."""

    __slots__ = ("details",)

    def __init__(self, details: str) -> None:
        self.details = details


def bounded(parse: Callable[[bytes], Any], what: str, max_bytes: int) -> Callable[[bytes], wire.Received]:
    """A request deserializer for :meth:`.calls.Call.read`: ``parse(data)``, or :class:`Unreadable`
    for data over ``max_bytes`` or that ``parse`` refuses, with the size of ``data``."""

    def deserialize(data: bytes) -> wire.Received:
        if len(data) > max_bytes:
            return wire.Received(
                Unreadable(f"request: a {what} of {len(data)} bytes, more than the {max_bytes} this server reads"), len(data)
            )
        try:
            return wire.Received(parse(data), len(data))
        except Exception as exc:  # noqa: BLE001 - bad bytes are the client's mistake, not UNKNOWN
            return wire.Received(Unreadable(f"request: not a valid {what} message: {exc}"), len(data))

    return deserialize


def ignored(data: bytes) -> wire.Received:
    """A request deserializer for a message whose content is not read (GetServerInfoRequest): the
    handler is given empty bytes."""
    return wire.Received(b"", len(data))


def health_reads(config: ServerConfig) -> Reads:
    """How health checks read their message: each reserves ``config.read_reservation_bytes`` of a
    budget of ``--max-health-reads`` such reads, apart from the server's memory budget."""
    n, reservation = config.max_health_reads, config.read_reservation_bytes
    named = f"max_health_reads={n} (reads of {reservation} bytes each, apart from {BUDGET_SETTING})"
    return Reads.of(config, MemoryBudget(n * reservation, idle_read_yield_s=config.idle_read_yield_s, named=named))


class NoRequest(Exception):
    """The call's request message did not come: the status to answer it with."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = trailing

    def answer(self, context: grpc.aio.ServicerContext) -> None:
        """Set the call's status to this (with set_code, as lossd's errors are: no stored exception)."""
        context.set_code(self.code)
        context.set_details(self.details)
        if self.trailing:
            context.set_trailing_metadata(self.trailing)


async def read_message(call: Call, what: str) -> Any:
    """The call's next message (:meth:`.calls.Call.read`, its bytes given back once it is parsed: it
    is at most a few KiB); None at the end of the stream; NoRequest when it cannot be read."""
    try:
        got = await call.read(what)
    except StreamIdle as idle:
        raise NoRequest(grpc.StatusCode.DEADLINE_EXCEEDED, str(idle)) from None
    except BudgetExceeded as refused:
        trailing = GAVE_WAY_METADATA if isinstance(refused, GaveWay) else ()
        raise NoRequest(grpc.StatusCode.RESOURCE_EXHAUSTED, str(refused), trailing) from None
    if got is None:
        return None
    message, held = got
    held.release()
    if isinstance(message, Unreadable):
        raise NoRequest(grpc.StatusCode.INVALID_ARGUMENT, message.details)
    return message


async def read_request(call: Call, what: str) -> Any:
    """The call's one request message; NoRequest when none comes."""
    message = await read_message(call, what)
    if message is None:
        raise NoRequest(grpc.StatusCode.INVALID_ARGUMENT, f"request: the call carried no {what} message")
    return message


class StopGate(Protocol):
    """What a graceful stop needs of every call (lossd_server.calls.CallTracker): its start, and
    its answer held while the stop takes the calls gRPC's transport holds."""

    def note_start(self) -> None: ...

    async def may_answer(self, deadline: float | None = None) -> None: ...


def reading(handler: grpc.RpcMethodHandler, what: str, reads: Reads, gate: StopGate | None = None) -> grpc.RpcMethodHandler:
    """A unary-request ``handler`` (a coroutine function; unary or server-streaming response; its
    request deserializer one of :func:`bounded`, :func:`ignored`) as a client-streaming one that
    reads its request with :func:`read_request`, as ``reads`` says. ``gate``: the server's
    stop sees the call start and, for a unary response, holds its answer as it holds lossd's
    (a client polling Check or GetServerInfo saw a CANCELLED in about half the stops)."""
    inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]] = handler.unary_unary or handler.unary_stream

    async def run(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        if gate is not None:
            gate.note_start()
        try:
            request = await read_request(reads.call(context), what)
        except NoRequest as missing:
            missing.answer(context)
            return None
        answer = await inner(request, context)
        if gate is not None and handler.unary_unary is not None:
            remaining = context.time_remaining()
            await gate.may_answer(None if remaining is None else time.monotonic() + remaining)
        return answer

    make = grpc.stream_unary_rpc_method_handler if handler.unary_unary is not None else grpc.stream_stream_rpc_method_handler
    return make(run, handler.request_deserializer, handler.response_serializer)


def _implements(servicer: Any, method: str) -> bool:
    """Whether ``servicer`` has ``method`` of its own, not the generated base's (which answers
    UNIMPLEMENTED by raising NotImplementedError)."""
    own = getattr(type(servicer), method, None)
    return own is not None and own is not getattr(health_pb2_grpc.HealthServicer, method, None)


def add_health(server: grpc.aio.Server, servicer: Any, reads: Reads, gate: StopGate | None = None) -> None:
    """grpc.health.v1.Health served by ``servicer`` (grpc_health's aio HealthServicer), its unary
    requests read by :func:`reading` as ``reads`` (:func:`health_reads`) says (what
    ``add_HealthServicer_to_server`` registers, otherwise).

    Registered methods, as generated code registers them, not a generic handler: gRPC core then
    queues their calls apart from every other path's. Behind one generic handler they shared one
    queue with all of lossd's calls and any unknown path, and a client opening and resetting streams
    on any of them (rapid reset, 85,000 a second from one connection) got 22 of 26 health checks
    answered CANCELLED by gRPC before lossd saw them."""
    check = bounded(health_pb2.HealthCheckRequest.FromString, "HealthCheckRequest", MAX_HEALTH_REQUEST_BYTES)
    response = health_pb2.HealthCheckResponse.SerializeToString
    methods: dict[str, tuple[grpc.RpcMethodHandler, str]] = {
        "Check": (grpc.unary_unary_rpc_method_handler(servicer.Check, check, response), "HealthCheckRequest"),
        "Watch": (grpc.unary_stream_rpc_method_handler(servicer.Watch, check, response), "HealthCheckRequest"),
    }
    # List only where the servicer implements it: grpc_health's aio servicer inherits the generated
    # stub's, which raises NotImplementedError, and every call logged an ERROR traceback
    if _implements(servicer, "List") and hasattr(health_pb2, "HealthListRequest"):
        listing = grpc.unary_unary_rpc_method_handler(
            servicer.List,
            bounded(health_pb2.HealthListRequest.FromString, "HealthListRequest", MAX_HEALTH_REQUEST_BYTES),
            health_pb2.HealthListResponse.SerializeToString,
        )
        methods["List"] = (listing, "HealthListRequest")
    server.add_registered_method_handlers(
        "grpc.health.v1.Health", {name: reading(handler, what, reads, gate) for name, (handler, what) in methods.items()}
    )
