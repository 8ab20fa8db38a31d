"""End-to-end probe of a running lossd container (used by tests/container/test_container.py).

Run on the host, with the repository's interpreter, against the port the container publishes:

    python docker/container_probe.py [HOST:PORT]        (default: $CTR_HOST:$CTR_PORT)

1. waits until grpc.health.v1 reports SERVING for "" and "lossd.v1.LossService";
2. makes one real cross_entropy call through lossd_client.LossClient and compares it with
   torch.nn.functional.cross_entropy computed locally (torch.testing.assert_close);
3. when $CTR_CONTAINER is set (ctr-check.sh sets it) and podman is on PATH, also checks from
   inside the container: it runs as uid 10001, the HEALTHCHECK command (lossd-client ... health)
   exits 0, and /metrics on the metrics port serves the lossd_* series the Grafana dashboard uses.

Exit status 0 only when every check passed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

try:
    from lossd_client import LossClient
except ImportError:  # running from a checkout where lossd-client is not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "client"))
    from lossd_client import LossClient

SERVICES = ("", "lossd.v1.LossService")
# Series the dashboard (docker/grafana/dashboards/lossd.json) queries; all exist after one call.
DASHBOARD_SERIES = (
    "lossd_request_latency_seconds_bucket",
    "lossd_queue_wait_seconds_bucket",
    "lossd_compute_seconds_bucket",
    "lossd_batch_requests_bucket",
    "lossd_batch_rows_bucket",
    "lossd_requests_total",
    "lossd_rows_total",
    "lossd_queue_depth",
    "lossd_process_rss_bytes",
    "lossd_device_memory_bytes",
)


def log(msg: str) -> None:
    print(f"[probe] {msg}", flush=True)


def wait_serving(target: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                statuses = {name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status for name in SERVICES}
                last = ", ".join(f"{n or '<overall>'}={health_pb2.HealthCheckResponse.ServingStatus.Name(s)}" for n, s in statuses.items())
                if all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses.values()):
                    log(f"health: {last}")
                    return
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            if time.monotonic() > deadline:
                raise SystemExit(f"[probe] FAIL: not SERVING within {timeout_s:.0f}s ({last})")
            time.sleep(0.5)


def check_cross_entropy(target: str) -> None:
    rng = np.random.default_rng(20240501)
    logits = rng.standard_normal((16, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=16).astype(np.int64)
    with LossClient(target) as client:
        got = client.cross_entropy(logits, targets)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets))
    got_t = torch.as_tensor(np.asarray(got))
    log(f"cross_entropy: server={got_t.tolist()!r} local={expected.item()!r} ({type(got).__name__})")
    torch.testing.assert_close(got_t, expected, check_dtype=False)


def podman_exec(container: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "exec", container, *argv], capture_output=True, text=True, timeout=60)


def check_inside(container: str) -> None:
    uid = podman_exec(container, "id", "-u")
    log(f"uid inside the container: {uid.stdout.strip()!r}")
    if uid.returncode != 0 or uid.stdout.strip() != "10001":
        raise SystemExit(f"[probe] FAIL: expected uid 10001, got {uid.stdout!r} {uid.stderr!r}")
    # The image's HEALTHCHECK. Podman keeps HEALTHCHECK only in docker-format images
    # (BUILDAH_FORMAT=docker, as tests/container/test_container.py builds); then run the recorded one,
    # otherwise run the same command as docker/Dockerfile declares.
    inspect = subprocess.run(
        ["podman", "inspect", "-f", "{{json .Config.Healthcheck}}", container], capture_output=True, text=True, timeout=30
    )
    recorded = inspect.stdout.strip()
    if inspect.returncode == 0 and recorded not in ("", "null", "<nil>", "{}"):
        log(f"HEALTHCHECK recorded in the image: {recorded}")
        hc = subprocess.run(["podman", "healthcheck", "run", container], capture_output=True, text=True, timeout=60)
        how = "podman healthcheck run"
    else:
        log("image has no recorded HEALTHCHECK (OCI format); running the Dockerfile's command via podman exec")
        hc = podman_exec(container, "sh", "-c", 'lossd-client --target "127.0.0.1:${LOSSD_PORT:-50051}" health || exit 1')
        how = "podman exec"
    # podman prints systemd-timer errors on hosts without systemd; the exit status is what counts.
    out = " | ".join(line for line in [*hc.stdout.splitlines(), *hc.stderr.splitlines()] if line and "systemd" not in line)
    log(f"HEALTHCHECK via {how}: rc={hc.returncode} {out or '(no output)'}")
    if hc.returncode != 0:
        raise SystemExit("[probe] FAIL: the image's HEALTHCHECK did not pass")
    fetch = (
        "import os, urllib.request; "
        "port = os.environ.get('LOSSD_METRICS_PORT', '9464'); "
        "print(urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10).read().decode())"
    )
    metrics = podman_exec(container, "python", "-c", fetch)
    if metrics.returncode != 0:
        raise SystemExit(f"[probe] FAIL: /metrics not reachable inside the container: {metrics.stderr.strip()}")
    present = {line.split("{")[0].split(" ")[0] for line in metrics.stdout.splitlines() if line and not line.startswith("#")}
    missing = [name for name in DASHBOARD_SERIES if name not in present]
    log(f"/metrics: {len(present)} series names; dashboard series missing: {missing or 'none'}")
    if missing:
        raise SystemExit(f"[probe] FAIL: /metrics lacks series used by the Grafana dashboard: {missing}")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        target = argv[1]
    else:
        target = f"{os.environ.get('CTR_HOST', '127.0.0.1')}:{os.environ['CTR_PORT']}"
    timeout_s = float(os.environ.get("PROBE_TIMEOUT_S", "180"))
    log(f"target {target}")
    wait_serving(target, timeout_s)
    check_cross_entropy(target)
    container = os.environ.get("CTR_CONTAINER")
    if container and shutil.which("podman"):
        check_inside(container)
    else:
        log("no $CTR_CONTAINER / podman: in-container checks skipped")
    log("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
