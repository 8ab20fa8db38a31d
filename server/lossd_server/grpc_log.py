"""gRPC's own log: a client that left before its call's status could be sent is not a server error.

gRPC's aio server (``_handle_exceptions`` in ``grpc/_cython/_cygrpc/aio/server.pyx.pxi``) ignores
a failed batch of a call whose client has closed it, but it learns of the close from another
batch, whose completion can come after the failure: the failure is then logged as ``ERROR
grpc._cython.cygrpc: ExecuteBatchError raised in core by servicer method [...]`` with a
traceback. It was seen for every EvaluateStream whose client had stopped reading its answers and
then cancelled (8 of 8 streams in a probe, their status held behind the unread answers), and for
Evaluate calls under ``--workers 2``: ordinary client departures that read as server failures.

:class:`DepartedClientFilter` turns exactly those records into DEBUG (dropped unless the logger
shows DEBUG), without the traceback: the ExecuteBatchError of a batch that sends the call's status
(a ``SendStatusFromServerOperation``), which core fails only once the call has already ended (a
client's cancel, its deadline, a lost connection). Every other record is left as it is, a failure
of another batch (sending a message, receiving one) or of ``grpc_call_start_batch`` included.
"""

from __future__ import annotations

import logging

#: The logger of gRPC's Cython layer (the aio server's, among others).
GRPC_LOGGER = "grpc._cython.cygrpc"
_MESSAGE = "ExecuteBatchError raised in core by servicer method"
#: How the failed batch names the operation that sends a call's status (CallbackFailureHandler:
#: ``Failed "execute_batch": (<grpc._cython.cygrpc.SendStatusFromServerOperation object at ...>,)``).
_STATUS_BATCH = ('Failed "execute_batch"', "SendStatusFromServerOperation")


def is_departed_client(record: logging.LogRecord) -> bool:
    """Whether ``record`` is gRPC's ERROR for a call whose status could not be sent (its call had ended)."""
    if record.levelno != logging.ERROR or not str(record.msg).startswith(_MESSAGE) or not record.exc_info:
        return False
    exc = record.exc_info[1]
    if exc is None or type(exc).__name__ != "ExecuteBatchError":
        return False
    text = str(exc)
    return text.startswith(_STATUS_BATCH[0]) and _STATUS_BATCH[1] in text


class DepartedClientFilter(logging.Filter):
    """On gRPC's logger: its ERROR for a call whose client left first becomes one DEBUG line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_departed_client(record):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.msg = f"{record.getMessage()}: the call ended before its status was sent (its client left)"
        record.args = None
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        record.exc_info = record.exc_text = None
        return True


def install() -> None:
    """Add the filter to gRPC's logger, once per process."""
    logger = logging.getLogger(GRPC_LOGGER)
    if not any(isinstance(f, DepartedClientFilter) for f in logger.filters):
        logger.addFilter(DepartedClientFilter())
