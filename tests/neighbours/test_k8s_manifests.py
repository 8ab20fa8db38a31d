"""docker/k8s/: every manifest against the Kubernetes OpenAPI schemas, strictly, offline.

kubernetes-validate (PyPI) bundles the JSON schemas of each Kubernetes release; ``strict``
rejects any property the schema does not know (a typo such as ``readinessprobe`` or a field
from a newer release). Checked against 1.27 (the first release with GA gRPC probes, which the
Deployment uses) and the newest bundled release. A kind with no schema fails here (the
command-line tool would only warn). kustomization.yaml is a kustomize file, not an API object:
its ``resources`` must be exactly the other manifests, and its image must be the Deployment's.
Cross-references a cluster would not reject but that would leave the Service, PDB or HPA
pointing at nothing are checked too.
"""

from __future__ import annotations

import pytest
import yaml
from hostenv import REPO
from kubernetes_validate import utils as kv

K8S = REPO / "docker" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
VERSIONS = ("1.27.0", kv.latest_version())


def documents(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind() -> dict[str, dict]:
    out = {}
    for path in MANIFESTS:
        for doc in documents(path):
            out[doc["kind"]] = doc
    return out


def test_manifest_set_is_what_the_readme_describes():
    kinds = sorted(by_kind())
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "Namespace", "PodDisruptionBudget", "Service"], kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_strictly(path, version):
    docs = documents(path)
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version} at {where}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            pytest.fail(f"{path.name}: {exc.message}")


def test_strict_validation_rejects_a_misspelt_field():
    """The check can fail: a probe key in the wrong case is refused (strict), not ignored."""
    deployment = by_kind()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_and_the_deployment_image():
    kustomization = documents(K8S / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    namespace = by_kind()["Namespace"]["metadata"]["name"]
    assert kustomization["namespace"] == namespace
    image = by_kind()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    names = [entry["name"] for entry in kustomization["images"]]
    assert image.split(":")[0] in names, (image, names)


def test_selectors_and_references_meet():
    kinds = by_kind()
    deployment = kinds["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert kinds["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])

    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for service_port in kinds["Service"]["spec"]["ports"]:
        assert service_port["targetPort"] in ports, service_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["LOSSD_PORT"]) == ports["grpc"] and int(env["LOSSD_METRICS_PORT"]) == ports["metrics"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    # SIGTERM: NOT_SERVING, drain, finish in-flight calls; the kubelet must not SIGKILL before.
    drain, grace = float(env["LOSSD_DRAIN_S"]), float(env["LOSSD_GRACE_S"])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + grace


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def test_cpu_and_memory_are_sized_to_the_worker_count():
    """LOSSD_WORKERS is set in the image and in the Deployment, whose CPU request gives each worker a
    core and whose memory limit lets every worker's share of the default budget start."""
    from lossd_server.config import ServerConfig, validate

    assert "LOSSD_WORKERS=" in (REPO / "docker" / "Dockerfile").read_text()
    container = by_kind()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    workers = int(env["LOSSD_WORKERS"])
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert _cpu(requests["cpu"]) >= workers and _cpu(limits["cpu"]) >= workers, (workers, requests, limits)
    assert int(env.get("LOSSD_TORCH_THREADS", "1")) * workers <= _cpu(limits["cpu"])
    default_budget = _bytes(limits["memory"]) // 2  # lossd's default: half the container's memory
    validate(ServerConfig(workers=workers, memory_budget_bytes=default_budget))  # SystemExit: a worker's share is too small
    with pytest.raises(SystemExit, match="--workers"):  # the check can fail: twice the workers on the same memory
        validate(ServerConfig(workers=2 * workers, memory_budget_bytes=default_budget))
