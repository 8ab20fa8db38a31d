from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from serverproc import ServerProcess, start_server  # noqa: E402


@pytest.fixture(scope="session")
def server() -> ServerProcess:
    """One real lossd server for the session, on a port the OS picks."""
    proc = start_server()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess):
    from lossd_client import LossClient

    with LossClient(server.address, timeout_s=60) as c:
        yield c
