"""What service tests read back from a server: a call's outcome as one line, a metric awaited."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from serverproc import ServerProcess


def outcome(future) -> str:
    """A gRPC call future's outcome: "OK", or "CODE: details"."""
    try:
        future.result()
        return "OK"
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()}"


def trailing_metadata(future) -> dict[str, str]:
    """The trailing metadata of a gRPC call future that failed (empty for one that did not)."""
    try:
        future.result()
        return {}
    except grpc.RpcError as err:
        return dict(err.trailing_metadata() or ())


def wait_for_metric(server: ServerProcess, name: str, predicate: Callable[[float], bool], timeout_s: float = 30.0) -> float:
    """The metric's value once ``predicate`` holds for it (polled), or its last value after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    value = server.metrics().get(name, 0.0)
    while not predicate(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = server.metrics().get(name, 0.0)
    return value
