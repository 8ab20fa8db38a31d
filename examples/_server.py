"""Start a throwaway lossd server on 127.0.0.1 (OS-picked port) for the examples."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from lossd_server.spawn import spawn


@contextlib.contextmanager
def local_server(*flags: str, timeout_s: float = 120.0) -> Iterator[str]:
    """Yield the address of a fresh server; stop it (SIGTERM) afterwards."""
    cmd = [sys.executable, "-m", "lossd_server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--drain-s", "0", *flags]
    with spawn(cmd, timeout_s=timeout_s) as server:
        yield server.address
