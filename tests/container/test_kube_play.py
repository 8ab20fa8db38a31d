"""docker/k8s/deployment.yaml run for real with ``podman kube play``, on the image ctr-check built.

podman (4.3 here) runs a Deployment as one pod and cannot honour every field a kubelet would, so
the test plays a *variant* made from the committed manifest (the committed file is never
weakened; test_k8s_manifests.py schema-checks it for a real cluster). What the variant changes,
and why, is listed in PODMAN_VARIANT; what podman silently ignores is listed in PODMAN_IGNORES.
Both lists are printed by the test.

Checked: the pod becomes ready through the manifest's probes (startup, readiness, liveness; each
translated from gRPC to an exec of the image's own ``lossd-client health`` with the same service
name and timings), an evaluation through the published port equals torch, the fields podman does
apply (uid, read-only root, writable /tmp volume, CPU-limit env, memory/CPU limits) are in force,
the pod stops cleanly (exit 0 after the drain) and ``podman kube down`` removes it.

Skipped - never faked - only when not root, the shared scripts are missing or the registries are
unreachable (see conftest.py).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import urllib.request

import pytest
import torch
import torch.nn.functional as F
import yaml
from hostenv import REPO, apt_install, free_port
from lossd_client import LossClient

DEPLOYMENT = REPO / "docker" / "k8s" / "deployment.yaml"

pytestmark = pytest.mark.container

PODMAN_VARIANT = {
    "spec.replicas": "1: podman kube play runs one pod per Deployment, and two pods would fight over the published host ports",
    "containers[].image": "the image this session built (lossd:cpu is what a cluster pulls)",
    "containers[].ports[].hostPort/hostIP": "published on 127.0.0.1 at free ports (podman 4.3 publishes containerPorts "
    "without hostPort on 0.0.0.0; a cluster publishes nothing)",
    "startupProbe/readinessProbe/livenessProbe.grpc": "podman 4.3 ignores gRPC probes (no healthcheck at all); the variant "
    "uses exec probes running the image's `lossd-client health` with the same port, service name and timings",
    "volumes[tmp] name": "made unique: podman turns an emptyDir into a named volume, shared by name across pods",
}
PODMAN_IGNORES = {
    "startupProbe, readinessProbe": "not applied by podman 4.3 (only livenessProbe becomes the container healthcheck); "
    "the test runs their exec commands itself, as a kubelet would",
    "terminationGracePeriodSeconds": "not applied (stop timeout stays 10 s) and `podman kube down` kills with SIGKILL "
    "(exit 137, measured); the test stops the pod with `podman pod stop -t <terminationGracePeriodSeconds>` first",
    "resources.requests": "no scheduler (limits are applied and checked)",
    "emptyDir.sizeLimit": "not applied",
    "strategy, revisionHistoryLimit, topologySpreadConstraints, automountServiceAccountToken, enableServiceLinks, "
    "fsGroup, seccompProfile": "no meaning or no effect under podman (its default seccomp profile applies)",
    "Service, HorizontalPodAutoscaler, PodDisruptionBudget, Namespace": "kinds podman kube play does not run "
    "(schema-checked only, in tests/neighbours/test_k8s_manifests.py)",
}


def podman(env: dict[str, str], *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)} failed (rc={done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def exec_command(grpc_probe: dict) -> list[str]:
    cmd = ["lossd-client", "--target", f"127.0.0.1:{grpc_probe['port']}", "health"]
    if grpc_probe.get("service"):
        cmd += ["--service", grpc_probe["service"]]
    return cmd


def podman_variant(manifest: dict, image: str, name: str, grpc_port: int, metrics_port: int) -> dict:
    """The committed Deployment with only the changes of PODMAN_VARIANT."""
    d = copy.deepcopy(manifest)
    d["metadata"]["name"] = name
    d["spec"]["replicas"] = 1
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    c["image"] = image
    host = {"grpc": grpc_port, "metrics": metrics_port}
    for port in c["ports"]:
        port["hostPort"] = host[port["name"]]
        port["hostIP"] = "127.0.0.1"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        c[kind]["exec"] = {"command": exec_command(c[kind].pop("grpc"))}
    renamed = {v["name"]: f"{v['name']}-{name}" for v in pod["volumes"]}
    for v in pod["volumes"]:
        v["name"] = renamed[v["name"]]
    for m in c["volumeMounts"]:
        m["name"] = renamed[m["name"]]
    return d


def ids_from_play(output: str) -> tuple[str, str]:
    """(pod id, container id) from `podman kube play` output ("Pod:\\n<id>\\nContainer:\\n<id>")."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    pod = lines[lines.index("Pod:") + 1]
    container = lines[lines.index("Container:") + 1]
    return pod, container


def run_probe(env: dict[str, str], container: str, probe: dict, attempts: int) -> subprocess.CompletedProcess:
    """Run an exec probe as a kubelet would: every periodSeconds, up to ``attempts`` times."""
    period = probe.get("periodSeconds", 10)
    timeout = probe.get("timeoutSeconds", 1)
    done = None
    for _ in range(attempts):
        done = podman(env, "exec", container, *probe["exec"]["command"], timeout=timeout + 30, check=False)
        if done.returncode == 0:
            break
        time.sleep(period)
    return done


@pytest.mark.timeout(600)
def all_workers_ready(metrics_text: str, container: dict) -> bool:
    """/metrics (summed over the worker processes) says every one of the container's LOSSD_WORKERS is warm."""
    workers = float(next(e["value"] for e in container["env"] if e["name"] == "LOSSD_WORKERS"))
    return f"lossd_workers {workers}" in metrics_text and f"lossd_workers_ready {workers}" in metrics_text


def test_deployment_plays_serves_and_stops(lossd_image, podman_env, tmp_path):
    print("podman variant of the Deployment:\n" + "\n".join(f"  {k}: {v}" for k, v in PODMAN_VARIANT.items()))
    print("ignored by podman:\n" + "\n".join(f"  {k}: {v}" for k, v in PODMAN_IGNORES.items()))
    env = podman_env
    # A pod's infra container is a pause image podman builds locally around catatonit (ctr-check.sh
    # does not install it: plain `podman run` needs no pod).
    apt_install(["catatonit"], ["catatonit"])
    version = podman(env, "version", "--format", "{{.Client.Version}}").stdout.strip()
    print(f"podman {version}")
    manifest = yaml.safe_load(DEPLOYMENT.read_text())
    spec = manifest["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    grpc_port, metrics_port = free_port(), free_port()
    name = f"lossd-kube-{os.getpid()}"
    variant = podman_variant(manifest, lossd_image, name, grpc_port, metrics_port)
    (c,) = variant["spec"]["template"]["spec"]["containers"]
    path = tmp_path / "deployment.podman.yaml"
    path.write_text(yaml.safe_dump(variant, sort_keys=False))

    played = podman(env, "kube", "play", str(path), timeout=300, check=False)
    pod = container = None
    try:
        assert played.returncode == 0, f"podman kube play failed:\n{played.stdout}\n{played.stderr}"
        pod, container = ids_from_play(played.stdout)

        # Ready through the probes: startup (up to failureThreshold x periodSeconds), then readiness,
        # then liveness, which podman turned into the container's healthcheck.
        startup = c["startupProbe"]
        done = run_probe(env, container, startup, startup["failureThreshold"])
        logs = podman(env, "logs", container, check=False).stdout
        assert done.returncode == 0, f"startup probe never succeeded: {done.stdout}{done.stderr}\n{logs}"
        done = run_probe(env, container, c["readinessProbe"], c["readinessProbe"]["failureThreshold"])
        assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stdout + done.stderr
        info = json.loads(podman(env, "inspect", container).stdout)[0]
        health = info["Config"].get("Healthcheck") or {}
        assert "lossd-client" in " ".join(health.get("Test", [])), f"livenessProbe did not become podman's healthcheck: {health}"
        assert health["Interval"] == c["livenessProbe"]["periodSeconds"] * 10**9, health
        assert health["Retries"] == c["livenessProbe"]["failureThreshold"], health
        hc = podman(env, "healthcheck", "run", container, check=False)
        assert hc.returncode == 0, f"liveness healthcheck failed: {hc.stdout}{hc.stderr}"
        status = json.loads(podman(env, "inspect", container).stdout)[0]["State"]["Health"]["Status"]
        assert status == "healthy", status

        # An evaluation through the published port equals torch.
        g = torch.Generator().manual_seed(5)
        x, y = torch.randn(64, 13, generator=g), torch.randint(0, 13, (64,), generator=g)
        logits, tokens = torch.randn(3, 20, 31, generator=g), torch.randint(0, 31, (3, 20), generator=g)
        with LossClient(f"127.0.0.1:{grpc_port}", timeout_s=60) as client:
            torch.testing.assert_close(client.cross_entropy(x, y, label_smoothing=0.1), F.cross_entropy(x, y, label_smoothing=0.1))
            ppl = client.perplexity(logits, tokens)
        want = F.cross_entropy(logits[:, :-1].reshape(-1, 31).double(), tokens[:, 1:].reshape(-1), reduction="sum")
        assert ppl.tokens == 3 * 19
        assert abs(ppl.nll_sum - float(want)) <= 1e-4 * abs(float(want))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'lossd_requests_total{code="OK",method="Evaluate"} 2.0' in text and all_workers_ready(text, c), text[-2000:]

        # The fields podman does apply are in force inside the container.
        assert podman(env, "exec", container, "id", "-u").stdout.strip() == str(c["securityContext"]["runAsUser"])
        assert podman(env, "exec", container, "touch", "/opt/lossd-write-test", check=False).returncode != 0, "root fs is writable"
        podman(env, "exec", container, "touch", "/tmp/lossd-write-test")  # the emptyDir volume
        assert podman(env, "exec", container, "printenv", "OMP_NUM_THREADS").stdout.strip() == str(int(c["resources"]["limits"]["cpu"]))
        host = info["HostConfig"]
        assert host["Memory"] == int(c["resources"]["limits"]["memory"].removesuffix("Gi")) * 2**30, host["Memory"]
        assert host["NanoCpus"] == int(c["resources"]["limits"]["cpu"]) * 10**9, host["NanoCpus"]
        assert "no-new-privileges" in host.get("SecurityOpt", []), host.get("SecurityOpt")
        assert info["HostConfig"]["ReadonlyRootfs"] is True

        # A clean stop: SIGTERM, drain, exit 0 within the manifest's grace period; then kube down.
        podman(env, "pod", "stop", "-t", str(grace), pod, timeout=grace + 60)
        state = json.loads(podman(env, "inspect", container).stdout)[0]["State"]
        logs = podman(env, "logs", container, check=False)
        assert state["ExitCode"] == 0, f"exit code {state['ExitCode']} after SIGTERM (137 = killed)\n{logs.stdout}{logs.stderr}"
        assert "stopped" in logs.stdout + logs.stderr, logs.stdout + logs.stderr
    finally:
        down = podman(env, "kube", "down", str(path), timeout=120, check=False)
        if pod is not None and podman(env, "pod", "exists", pod, check=False).returncode == 0:
            podman(env, "pod", "rm", "-f", pod, check=False)
    assert down.returncode == 0, f"podman kube down failed:\n{down.stdout}\n{down.stderr}"
    assert podman(env, "pod", "exists", pod, check=False).returncode == 1, "the pod is still there after kube down"
    assert podman(env, "container", "exists", container, check=False).returncode == 1, "the container is still there"
