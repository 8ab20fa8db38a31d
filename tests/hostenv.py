"""What the host offers the neighbour tests: root, package registries, apt, free ports, logged runs.

Shared by tests/container/ (podman) and tests/neighbours/ (Prometheus, client wheel). A test that
needs something this machine cannot give (not root, a registry unreachable) skips and says why;
it never pretends to pass.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "container"
CTR_CHECK = SHARED / "ctr-check.sh"
HADOLINT = SHARED / "hadolint.sh"
DEBIAN_MIRROR = os.environ.get("CTR_MIRROR", "http://deb.debian.org/debian")


def pip_config(key: str) -> str | None:
    """``pip config get KEY`` of the interpreter running the tests (None when unset)."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = out.stdout.strip()
    return value if out.returncode == 0 and value else None


def tcp_ok(host: str, port: int, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _host_port(url: str) -> tuple[str, int] | None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return None
    return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def registry_hosts(pypi: bool = True, debian: bool = True) -> list[tuple[str, int]]:
    """The PyPI host pip is configured for (+ its file host) and the Debian mirror apt and ctr-check use."""
    hosts: list[tuple[str, int]] = []
    if pypi:
        index = pip_config("global.index-url") or "https://pypi.org/simple"
        hp = _host_port(index)
        if hp:
            hosts.append(hp)
        if hp is None or hp[0] == "pypi.org":
            hosts.append(("files.pythonhosted.org", 443))
    if debian:
        hosts.append(_host_port(DEBIAN_MIRROR) or ("deb.debian.org", 80))
    return hosts


def skip_unless_registries(pypi: bool = True, debian: bool = True) -> None:
    down = [f"{h}:{p}" for h, p in registry_hosts(pypi, debian) if not tcp_ok(h, p)]
    if down:
        pytest.skip(f"package registries unreachable (no TCP connect within 5 s): {', '.join(down)}")


def skip_unless_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def apt_install(packages: Sequence[str], binaries: Sequence[str]) -> None:
    """Install Debian packages when one of ``binaries`` is missing, as ctr-check.sh installs podman.

    Skips (with the reason) when not root or the Debian mirror is unreachable; fails when apt
    was reachable and still could not install them.
    """
    if all(shutil.which(b) for b in binaries):
        return
    skip_unless_root(f"{', '.join(binaries)} missing and installing {', '.join(packages)} with apt-get needs root")
    skip_unless_registries(pypi=False, debian=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # other apt runs on a shared machine: wait, do not fail
    subprocess.run(["apt-get", *lock, "update", "-qq"], env=env, capture_output=True, text=True, timeout=600)
    done = subprocess.run(
        ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *packages],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    missing = [b for b in binaries if not shutil.which(b)]
    assert done.returncode == 0 and not missing, (
        f"apt-get install {' '.join(packages)} failed (rc={done.returncode}; missing {missing}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


def free_port() -> int:
    """A loopback port nobody listens on right now (for programs that cannot report the one they bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run cmd, echoing its output live (CI logs show builds and container runs); fail the test on timeout.

    On timeout the command gets SIGTERM (ctr-check.sh traps it and removes its container), then
    its process group SIGKILL.
    """
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
        pytest.fail(f"{cmd[0]} did not finish within {timeout:.0f}s")
    reader.join(timeout=30)
    return subprocess.CompletedProcess(list(cmd), rc, "".join(lines), None)


def stop_pid(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM the process we started, by its PID; SIGKILL after ``timeout_s``. Returns its exit code."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return proc.returncode
