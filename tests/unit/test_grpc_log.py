"""gRPC's log: its ERROR for a call whose client left before the status was sent becomes DEBUG;
every other record of gRPC's logger is left as it is. Records are logged on gRPC's own logger, as
its aio server logs them, with its own exception and operation classes."""

from __future__ import annotations

import logging

import pytest
from grpc._cython import cygrpc
from lossd_server import grpc_log


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def grpc_logger():
    """gRPC's logger with the filter installed (twice: once is kept) and a handler that keeps what passes."""
    logger = logging.getLogger(grpc_log.GRPC_LOGGER)
    filters, level = list(logger.filters), logger.level
    handler = Records()
    logger.addHandler(handler)
    grpc_log.install()
    grpc_log.install()
    try:
        yield logger, handler.records
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = filters
        logger.setLevel(level)


def batch_failed(*ops: object) -> cygrpc.ExecuteBatchError:
    """The error gRPC's execute_batch raises for a batch core failed (CallbackFailureHandler's text)."""
    return cygrpc.ExecuteBatchError(f'Failed "execute_batch": {ops}')


def log_as_grpc(logger: logging.Logger, exc: BaseException, message: str) -> None:
    """As _handle_exceptions logs: logger.exception inside the except, the message formatted already."""
    try:
        raise exc
    except BaseException:
        logger.exception(message)


STATUS = cygrpc.SendStatusFromServerOperation((), 0, "", 0)
MESSAGE = cygrpc.SendMessageOperation(b"", 0)
METADATA = cygrpc.SendInitialMetadataOperation((), 0)
DEPARTED = "ExecuteBatchError raised in core by servicer method [/lossd.v1.LossService/EvaluateStream]"


def test_installed_once(grpc_logger):
    logger, _ = grpc_logger
    assert sum(isinstance(f, grpc_log.DepartedClientFilter) for f in logger.filters) == 1


@pytest.mark.parametrize("ops", [(STATUS,), (METADATA, MESSAGE, STATUS)], ids=["stream status", "unary answer and status"])
def test_a_status_that_could_not_be_sent_is_dropped_at_info_and_one_debug_line_at_debug(grpc_logger, ops):
    logger, records = grpc_logger
    logger.setLevel(logging.INFO)
    log_as_grpc(logger, batch_failed(*ops), DEPARTED)
    assert records == []
    logger.setLevel(logging.DEBUG)
    log_as_grpc(logger, batch_failed(*ops), DEPARTED)
    [record] = records
    assert record.levelno == logging.DEBUG and record.levelname == "DEBUG" and record.exc_info is None
    assert record.getMessage() == f"{DEPARTED}: the call ended before its status was sent (its client left)"


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (batch_failed(MESSAGE), DEPARTED),  # a message the handler could not send: not the status
        (batch_failed(METADATA), DEPARTED),
        (cygrpc.ExecuteBatchError("Failed grpc_call_start_batch: 8"), DEPARTED),  # never started: a misuse, not a departure
        (ValueError('Failed "execute_batch": SendStatusFromServerOperation'), DEPARTED),  # not gRPC's error
        (ValueError("boom"), "Unexpected [ValueError] raised by servicer method [/lossd.v1.LossService/Evaluate]"),
        (batch_failed(STATUS), "Failed sending error status from server"),  # another of gRPC's errors
    ],
    ids=["send message", "send metadata", "start batch", "other exception", "servicer error", "other message"],
)
def test_every_other_error_stays_an_error_with_its_traceback(grpc_logger, exc, message):
    logger, records = grpc_logger
    logger.setLevel(logging.INFO)
    log_as_grpc(logger, exc, message)
    [record] = records
    assert record.levelno == logging.ERROR and record.getMessage() == message
    assert record.exc_info is not None and record.exc_info[1] is exc
