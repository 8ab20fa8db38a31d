"""Start a throwaway lossd server on 127.0.0.1 (OS-picked port) for the examples."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def local_server(*flags: str, timeout_s: float = 120.0) -> Iterator[str]:
    """Yield the address of a fresh server; stop it (SIGTERM) afterwards."""
    cmd = [sys.executable, "-m", "lossd_server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--drain-s", "0", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: dict[str, str] = {}
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"listening on [^ ]+:(\d+)", line)
            if m:
                found["port"] = m.group(1)
            if "SERVING" in line and "NOT_SERVING" not in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(timeout_s) or "port" not in found or proc.poll() is not None:
            raise RuntimeError("lossd server did not start")
        yield f"127.0.0.1:{found['port']}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
