"""One mapping from what went wrong to the gRPC status a caller receives, for every RPC."""

from __future__ import annotations

import logging

import grpc

from . import codec, engine
from .batch_engine import DeviceMemoryExhausted
from .batcher import Abandoned, BatcherClosed, DeadlineExpired, DeadlinePassed, QueueFull
from .budget import GAVE_WAY_KEY, YIELD_SETTING, BudgetExceeded, GaveWay

log = logging.getLogger("lossd.service")


#: The trailing metadata of a call that gave way (see budget.GaveWay).
GAVE_WAY_METADATA = ((GAVE_WAY_KEY, YIELD_SETTING),)


class RequestError(Exception):
    """A request that must be answered with ``code`` (and ``trailing`` metadata)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing = trailing


class OversizedId(engine.InvalidInput):
    """A request id over --max-id-bytes (INVALID_ARGUMENT); a stream item's error echoes no id for it."""


class StreamIdle(Exception):
    """The client sent (or read) nothing for stream_idle_timeout_s."""


def idle_message(doing: str, idle_s: float) -> str:
    """What a call whose client ``doing`` (e.g. "completed no X message") for the idle timeout is told."""
    return f"the client {doing} for stream_idle_timeout_s={idle_s:g}s"


def classify(exc: BaseException) -> RequestError | None:
    """Map an exception to the status it must be answered with (None: a server bug)."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, (engine.InvalidInput, codec.TensorError)):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, (QueueFull, BudgetExceeded, DeviceMemoryExhausted)):
        return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), GAVE_WAY_METADATA if isinstance(exc, GaveWay) else ())
    if isinstance(exc, (DeadlineExpired, DeadlinePassed, StreamIdle)):
        return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline expired before compute")
    if isinstance(exc, BatcherClosed):
        return RequestError(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, Abandoned):
        return RequestError(grpc.StatusCode.CANCELLED, str(exc))
    return None


def status_of(exc: BaseException, what: str) -> RequestError:
    """classify(), logging server bugs as INTERNAL; drops the tracebacks so nothing they
    reference (request tensors, futures, frames) outlives the call."""
    err = classify(exc)
    if err is None:
        log.error("%s failed: %s: %s", what, type(exc).__name__, exc, exc_info=exc)
        err = RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    drop_tracebacks(exc)
    return err


def drop_tracebacks(exc: BaseException | None) -> None:
    """Cut every traceback of an exception chain: they hold the frames of the failed call."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
