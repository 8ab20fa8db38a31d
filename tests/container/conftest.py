"""One image build per session for the container tests (tests/container/).

``ctr_check`` runs ../shared/container/ctr-check.sh once: it builds docker/Dockerfile with rootful
podman (tag ``IMAGE_TAG``), runs the image, probes it with docker/container_probe.py and stops it
with SIGTERM. test_container.py asserts on that run; test_kube_play.py plays docker/k8s's
Deployment with the image it built, instead of building it a second time.

Skipped - never faked - only when: not root, the shared scripts are missing, or the package
registries (PyPI, and Debian's mirror for podman/the base image) cannot be reached.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hostenv import CTR_CHECK, REPO, pip_config, run_logged, skip_unless_registries, skip_unless_root

DOCKERFILE = REPO / "docker" / "Dockerfile"
PROBE = REPO / "docker" / "container_probe.py"
IMAGE_TAG = "localhost/lossd/test:latest"
CONTAINER_PORT = 50051


@pytest.fixture(scope="session")
def ctr_check() -> subprocess.CompletedProcess:
    """ctr-check.sh's build + run + probe + SIGTERM stop of the CPU image (output echoed live)."""
    skip_unless_root("ctr-check.sh drives rootful podman")
    if not CTR_CHECK.is_file():
        pytest.skip(f"container tooling missing: {CTR_CHECK}")
    skip_unless_registries()

    cmd = [str(CTR_CHECK), "--host-port", "0", "--tag", IMAGE_TAG, "--wait", "180"]
    wheels = pip_config("global.find-links")
    if wheels and Path(wheels).is_dir():
        # torch 2.13.0+cpu comes from this directory (mounted into the build at /opt/wheels);
        # no extra torch index then (download.pytorch.org may be unreachable).
        cmd += ["--wheels", wheels, "--build-arg", "TORCH_INDEX_URL="]
    check = f"{shlex.quote(sys.executable)} {shlex.quote(str(PROBE))}"
    cmd += ["--check", check, str(DOCKERFILE), str(REPO), str(CONTAINER_PORT)]

    env = dict(os.environ)
    env["BUILDAH_FORMAT"] = "docker"  # keep HEALTHCHECK in the image config (OCI drops it)
    return run_logged(cmd, timeout=1150, env=env)


@pytest.fixture(scope="session")
def podman_env() -> dict[str, str]:
    """The environment that points podman at ctr-check.sh's store and configuration."""
    out = subprocess.run([str(CTR_CHECK), "--print-env"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    env = dict(os.environ)
    for word in shlex.split(out.stdout.strip().removeprefix("export ")):
        key, _, value = word.partition("=")
        env[key] = value
    assert "CONTAINERS_STORAGE_CONF" in env and "CONTAINERS_CONF" in env, out.stdout
    return env


@pytest.fixture(scope="session")
def lossd_image(ctr_check: subprocess.CompletedProcess, podman_env: dict[str, str]) -> str:
    """The tag of the image this session's ctr-check run built (fails when the build failed)."""
    if "image built:" not in ctr_check.stdout:
        pytest.fail(f"ctr-check.sh did not build {IMAGE_TAG} (rc={ctr_check.returncode}); its output is above")
    done = subprocess.run(["podman", "image", "exists", IMAGE_TAG], env=podman_env, capture_output=True, timeout=60)
    assert done.returncode == 0, f"{IMAGE_TAG} is not in ctr-check's podman store"
    return IMAGE_TAG
