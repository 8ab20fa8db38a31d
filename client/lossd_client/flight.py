"""Single flight: one GetServerInfo in progress per client, shared by every caller that asks meanwhile.

A request over ``SMALL_REQUEST_BYTES`` needs the server's message limit before it can be routed.
A fresh client's concurrent first calls each asked the server for it (200 concurrent calls on an
AsyncLossClient sent 200 GetServerInfo calls, each inside its caller's deadline). Now the first
caller leads a lookup and the others wait for its answer; the client keeps the limit from a
successful one (also from an explicit ``server_info()``), and a failed one is not kept: the next
caller looks up again.

:class:`SingleFlight` is the bookkeeping, without I/O. LossClient drives it under its ``lock``
(threads share it), AsyncLossClient on its event loop; each leads a flight with its own call and
waits on the flight's ``landed`` signal (a ``threading.Event``, an ``asyncio.Future``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from .errors import LossdError, error_for

#: What :meth:`SingleFlight.answer` returns when the caller should look up again.
AGAIN = object()


class Flight:
    """One lookup in progress: its leader's deadline (``time.monotonic()``, None: none), the
    shell's ``landed`` signal, then its ``result`` or ``error``."""

    __slots__ = ("deadline", "error", "landed", "result")

    def __init__(self, deadline: float | None, landed: Any) -> None:
        self.deadline = deadline
        self.landed = landed
        self.result: Any = None
        self.error: BaseException | None = None


class SingleFlight:
    """At most one lookup in flight; the callers that ask while it runs share its answer."""

    def __init__(self) -> None:
        #: Held around :meth:`join` and :meth:`land` by a client whose threads share the lookups.
        self.lock = threading.Lock()
        #: The result of the latest flight that succeeded (None before one did).
        self.last: Any = None
        self._flight: Flight | None = None

    def join(self, deadline: float | None, landed: Callable[[], Any]) -> tuple[Flight, bool]:
        """The flight in progress and False (wait for it to land), or a new one and True: the
        caller leads it (looks up with its own ``deadline``, then :meth:`land`). ``landed`` makes
        a new flight's signal."""
        if self._flight is None:
            self._flight = Flight(deadline, landed())
            return self._flight, True
        return self._flight, False

    def land(self, flight: Flight, result: Any = None, error: BaseException | None = None) -> None:
        """The leader's lookup ended with ``result`` (kept as :attr:`last`) or ``error``; the next
        caller starts a new flight (the shell then sets the flight's signal)."""
        flight.result, flight.error = result, error
        if error is None:
            self.last = result
        if self._flight is flight:
            self._flight = None

    @staticmethod
    def answer(flight: Flight, deadline: float | None) -> Any:
        """What a caller with ``deadline`` that waited for ``flight`` gets: its result; or its
        failure, raised (a copy: other callers raise it too); or :data:`AGAIN` when the failure
        was the leader's own and the caller should look up again: its task was cancelled or its
        thread interrupted (anything but a LossdError), or its deadline, earlier than the
        caller's, passed."""
        error = flight.error
        if error is None:
            return flight.result
        if not isinstance(error, LossdError):
            return AGAIN
        if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and _earlier(flight.deadline, deadline):
            return AGAIN
        raise type(error)(error.details, error.code) from error


def deadline_of(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` deadline of a call with ``timeout`` seconds (None: none)."""
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (0 once it passed; None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def deadline_exceeded() -> LossdError:
    """What a caller whose deadline passed while it waited for a flight raises (gRPC's words)."""
    return error_for(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


def _earlier(a: float | None, b: float | None) -> bool:
    return a is not None and (b is None or a < b)
