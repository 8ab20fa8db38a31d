"""Shared fixtures. Tests are grouped by layer, one folder each, and marked by it:

- ``unit``: pure code (engine, batcher, wire, layout, ...), no server;
- ``service``: a real lossd server on a loopback port, driven through gRPC and the client;
- ``container``: the image built and run with podman (root only; skipped with the reason otherwise);
- ``neighbours``: real Prometheus, Kubernetes schemas, the client wheel in a torch-free venv,
  Hugging Face, the API docs;
- ``gpu``: the CUDA path on a real server (skipped where CUDA is absent).

``make test LAYER=unit`` (or ``pytest -m unit``) runs one layer.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from serverproc import ServerProcess, start_server  # noqa: E402

LAYERS = ("unit", "service", "container", "neighbours", "gpu")

# The suite tests how the server treats signals, and a signal ignored on entry stays ignored by
# design (``nohup lossd-server``): a suite started under nohup (SIGHUP ignored, inherited by every
# server it starts) failed four of those tests. The suite starts its servers from the defaults.
signal.signal(signal.SIGHUP, signal.SIG_DFL)
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with the layer its folder names."""
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(_HERE).parts
        if parts and parts[0] in LAYERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


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
