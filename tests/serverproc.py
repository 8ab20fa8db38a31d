"""Start real lossd server processes on 127.0.0.1 for tests (never mocked gRPC)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from lossd_server.spawn import ServerProcess, spawn

__all__ = ["HOG_FLAGS", "TEST_DEVICE", "EngineHog", "ServerProcess", "held_chunks", "start_server"]

#: ``LOSSD_TEST_DEVICE=cuda`` runs every test server (and the engine's parity tests) on that device:
#: the service layer then checks CUDA results against CPU torch (``make test LAYER=service`` on a GPU).
TEST_DEVICE = os.environ.get("LOSSD_TEST_DEVICE", "")


def start_server(
    *args: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    metrics: bool = False,
    program: Sequence[str] = ("-m", "lossd_server"),
    ready_when: Callable[[str], bool] | None = None,
) -> ServerProcess:
    """Run ``python -m lossd_server --host 127.0.0.1 --port 0 ...`` and wait until it is SERVING.

    ``metrics=True`` serves /metrics on a port the OS picks (``.metrics_port``); ``--drain-s 0``
    unless ``args`` or ``env`` set it (the stop then takes no second of its own); a ``--port`` in
    ``args`` replaces ``--port 0`` (to restart a server on the same port). ``program``: what
    python runs instead of ``-m lossd_server``; ``ready_when``: a log line that means ready
    instead of SERVING (no ``preexec_fn``: see :func:`lossd_server.spawn.spawn`).
    """
    cmd = [sys.executable, *program, "--host", "127.0.0.1"]
    if not any(a.startswith("--port") for a in args):
        cmd += ["--port", "0"]
    if not any(a.startswith("--metrics-port") for a in args):
        cmd += ["--metrics-port", "-1" if metrics else "0"]
    if TEST_DEVICE and not any(a.startswith("--device") for a in args):
        cmd += ["--device", TEST_DEVICE]
    if not any(a.startswith("--drain-s") for a in args) and "LOSSD_DRAIN_S" not in (env or {}):
        cmd += ["--drain-s", "0"]  # the default second of NOT_SERVING at every stop; tests of the drain set theirs
    cmd += list(args)
    return spawn(cmd, env=env, timeout_s=timeout_s, ready_when=ready_when)


HOG_FLAGS = ("--chunk-bytes", "32", "--compute-threads", "1")


class EngineHog:
    """Keeps a server's only engine worker busy until the ``with`` block ends.

    The server must run with :data:`HOG_FLAGS` (one worker, 32-byte engine chunks: every row is
    its own chunk). One request of a million 2-class rows then takes the worker tens of seconds in
    a million checkpointed steps; leaving the block cancels it, and the engine stops at its next
    step. Used to hold requests in the queue without a batching timer (lossd has none).
    """

    ROWS = 1_000_000

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self._future = None
        self._channel = None

    def __enter__(self) -> EngineHog:
        import grpc
        import numpy as np
        from lossd_client import tensors
        from lossd_client._proto.lossd.v1 import loss_pb2 as pb

        rng = np.random.default_rng(0)
        msg = pb.EvaluateRequest()
        tensors.to_proto(rng.standard_normal((self.ROWS, 2), dtype=np.float32), msg.input)
        tensors.to_proto(rng.integers(0, 2, self.ROWS), msg.target)
        data = msg.SerializeToString()
        received = 'lossd_received_bytes_total{method="Evaluate"}'
        before = self.server.metrics().get(received, 0.0)
        self._channel = grpc.insecure_channel(self.server.address)
        self._future = self._channel.unary_unary("/lossd.v1.LossService/Evaluate").future(data, timeout=300)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the server has it whole, nothing is queued, and it is computed
            m = self.server.metrics()
            if (
                m.get(received, 0.0) - before >= len(data)
                and m.get("lossd_queue_depth", 1) == 0
                and m.get("lossd_batches_computing", 0) >= 1
            ):
                return self
            time.sleep(0.02)
        raise RuntimeError("the hog request never reached the engine")

    def __exit__(self, *exc: object) -> None:
        self._future.cancel()
        self._channel.close()


def held_chunks(req, release: threading.Event) -> Iterator:
    """A chunked call's messages: the header and first rows at once, the rest once ``release`` is
    set (at most 120 s): the call stays in flight on its server until the test lets it finish."""
    from lossd_client import core

    messages = list(core.chunk_messages(core.build(req)[0], chunk_bytes=256 * 1024))
    assert len(messages) > 2
    yield from messages[:2]
    release.wait(120)
    yield from messages[2:]
