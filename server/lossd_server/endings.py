"""How a call that its client no longer waits for ended, as the client sees it: the one rule.

Used by the servicer's error path (:func:`lossd_server.service.call_over`: the status it answers and
logs) and by the RPC metrics (:func:`lossd_server.metrics.status_name`: ``lossd_requests_total{code}``).

What the server can observe of a call's end is not what the client saw:

* A client's cancel reaches a waiting read as a plain end of stream, a moment before gRPC cancels
  the handler (CancelledError), under 50 ms in every probe (:data:`CANCEL_SETTLE_S`). gRPC's
  ``context.cancelled()`` stays False for a cancel from the peer: the handler's CancelledError is
  the only sign.
* A client's deadline reaches the server as such a cancel (RST_STREAM), at the client's clock, while
  the server's copy of the deadline starts when the call's headers were read: later by the time
  they took to arrive, 50+ ms on a loaded machine. So a call cancelled at most
  :data:`DEADLINE_SKEW_S` before its (server-side) deadline was cut by that deadline: the client saw
  DEADLINE_EXCEEDED. (A client that cancels by itself that close to its own deadline is counted
  DEADLINE_EXCEEDED too: nothing on the wire tells the two apart.)
"""

from __future__ import annotations

import grpc

#: How long a call whose read ended waits for a cancel to land (as the handler's CancelledError)
#: before its status is decided: a client's cancel took under 50 ms to reach the handler in every probe.
CANCEL_SETTLE_S = 0.05
#: A cancel this close to the call's deadline (seconds, server clock) is the client's deadline.
DEADLINE_SKEW_S = 0.5

OVER_DETAILS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "the call's deadline passed",
    grpc.StatusCode.CANCELLED: "the client cancelled the call",
    grpc.StatusCode.UNAVAILABLE: "the server stopped before the call ended",
}


def over_status(left_s: float | None, cancelled: bool, cut: bool = False) -> grpc.StatusCode | None:
    """The status the client saw for a call, or None when the call is not over on its side (the
    handler's own outcome stands). ``left_s``: seconds to the call's deadline on the server's clock
    (None: no deadline); ``cancelled``: gRPC cancelled the handler (the client cancelled, a
    deadline passed, or the server's stop cut it); ``cut``: the server's own stop is cutting its
    calls (:meth:`.calls.CallTracker.cutting`).

    DEADLINE_EXCEEDED once the deadline has passed, or when the call was cancelled at most
    DEADLINE_SKEW_S before it; UNAVAILABLE when the server's stop cut it (what gRPC's "Cancelling
    all calls" tells the client); CANCELLED when it was cancelled otherwise.
    """
    if left_s is not None and (left_s <= 0 or (cancelled and left_s <= DEADLINE_SKEW_S)):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if cancelled and cut:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.CANCELLED if cancelled else None


#: A call that failed after an end of stream this close to its deadline waits for the deadline.
SETTLE_TO_DEADLINE_S = 3 * CANCEL_SETTLE_S


def failure_settle_s(left_s: float | None) -> float:
    """How long a call that failed after an end of stream waits before its status is decided, so
    that a cancel that reached its read as that end lands first: CANCEL_SETTLE_S, or until its
    deadline when that is at most SETTLE_TO_DEADLINE_S away (then it is DEADLINE_EXCEEDED, as the
    client sees it, even should the cancel land late). Not until any deadline within
    DEADLINE_SKEW_S: a cancel that lands in the settle time is counted by :func:`over_status`
    anyway, and a client still waiting, with a deadline of 0.3 s, got DEADLINE_EXCEEDED at its
    deadline instead of the INVALID_ARGUMENT naming what its call lacked."""
    if left_s is not None and left_s <= SETTLE_TO_DEADLINE_S:
        return max(CANCEL_SETTLE_S, left_s + 0.001)  # asyncio may wake a timer a clock tick early
    return CANCEL_SETTLE_S


def end_settle_s(since_end_s: float) -> float:
    """How long a stream that ended normally, with no answer written since its end of stream
    (``since_end_s`` ago), waits before it answers OK: that end may have been a cancel, which must
    land first (a write after a cancel fails, so a stream that wrote since is known to be alive).
    Up to CANCEL_SETTLE_S after the end; a deadline that passes meanwhile cancels the call, which is
    then DEADLINE_EXCEEDED, as its client sees it."""
    return max(0.0, CANCEL_SETTLE_S - since_end_s)
