"""A real Prometheus (Debian's ``prometheus`` package) scrapes a real lossd server.

The scrape config is docker/prometheus.yml, the file docker/compose.yaml mounts, with only its
targets replaced (compose finds lossd replicas by DNS; here there is one server on a loopback
port). Traffic goes through LossClient; then Prometheus's HTTP API evaluates the p99 request
latency and every expression of the Grafana dashboard (docker/grafana/dashboards/lossd.json,
Grafana variables substituted): each must evaluate without error and return data, and the
counters Prometheus stored must equal what the server's /metrics says.

Skips, with the reason, only when prometheus is missing and cannot be installed (not root, or
the Debian mirror unreachable).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hostenv import REPO, apt_install, free_port, stop_pid
from lossd_client import LossClient, LossRequest
from lossd_server.metrics import LATENCY_BUCKETS_S
from serverproc import start_server

DOCKER = REPO / "docker"
PROMETHEUS_YML = DOCKER / "prometheus.yml"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "lossd.json"
SCRAPE_INTERVAL = "1s"
#: What Grafana would put for $__rate_interval at a 1 s scrape interval is 4 s; a minute keeps
#: every sample of this short test in the window (rate() needs two samples per series).
RATE_INTERVAL = "1m"
P99 = "histogram_quantile(0.99, sum by (le) (rate(lossd_request_latency_seconds_bucket[1m])))"

pytestmark = pytest.mark.timeout(300)


# --------------------------------------------------------------------------- config and dashboard
def scrape_config(lossd_target: str, prometheus_target: str) -> dict:
    """docker/prometheus.yml with only its targets (and the scrape interval) replaced."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"]["scrape_interval"] = SCRAPE_INTERVAL
    cfg["global"]["evaluation_interval"] = SCRAPE_INTERVAL
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == {"lossd", "prometheus"}, f"unexpected jobs in {PROMETHEUS_YML}: {sorted(jobs)}"
    lossd = jobs["lossd"]
    (dns,) = lossd.pop("dns_sd_configs")  # compose: one A record per replica of service "lossd"
    assert dns["port"] == 9464 and dns["names"] == ["lossd"], dns
    lossd["static_configs"] = [{"targets": [lossd_target]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [prometheus_target]}]
    return cfg


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, rows and nested panels included."""
    doc = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(doc.get("panels", []))
    return out


def dashboard_variables() -> dict[str, dict]:
    return {v["name"]: v for v in json.loads(DASHBOARD.read_text()).get("templating", {}).get("list", [])}


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's $name / ${name} / [[name]] with concrete values; fails on any left over."""
    for name, value in variables.items():
        expr = re.sub(r"\$\{" + name + r"(?::[a-z]+)?\}|\[\[" + name + r"\]\]|\$" + name + r"\b", lambda _m, v=value: v, expr)
    assert "$" not in expr and "[[" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


# --------------------------------------------------------------------------- Prometheus process
class Prometheus:
    def __init__(self, workdir: Path, lossd_target: str) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(scrape_config(lossd_target, self.address), sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={self.address}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def get(self, path: str, **params: str) -> dict:
        url = f"http://{self.address}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400/422: PromQL errors come back as JSON
            return json.loads(exc.read())

    def query(self, expr: str) -> list[dict]:
        doc = self.get("/api/v1/query", query=expr)
        assert doc.get("status") == "success", f"{expr!r}: {doc.get('errorType')}: {doc.get('error')}"
        assert doc["data"]["resultType"] == "vector", doc["data"]
        return doc["data"]["result"]

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited (rc={self.proc.returncode}):\n{self.log()}"
            try:
                with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        pytest.fail(f"prometheus not ready within {timeout_s:.0f}s:\n{self.log()}")

    def wait_until(self, expr: str, ok, timeout_s: float = 60.0) -> list[dict]:
        """Poll ``expr`` (bounded) until ``ok(result)``; returns the last result either way."""
        deadline = time.monotonic() + timeout_s
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if ok(result):
                break
            time.sleep(0.5)
        return result

    def stop(self) -> int:
        try:
            return stop_pid(self.proc)
        finally:
            self._log.close()


def scalar(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def served_methods() -> dict[str, bool]:
    """Every method a lossd server serves (lossd_requests_total's ``method`` label), and whether it
    answers with a stream (its latency observation then lasts as long as the stream)."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2
    from lossd_client._proto.lossd.v1 import loss_pb2

    services = (
        loss_pb2.DESCRIPTOR.services_by_name["LossService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )
    return {m.name: m.server_streaming for service in services for m in service.methods}


def test_dashboard_latency_quantiles_leave_streams_out_and_name_only_served_methods():
    """The latency panels summed every method, health Watch streams (open as long as their clients
    watch) and whole evaluate_many streams included: one watcher moved p99 to tens of seconds.
    Aggregated latency selects methods that answer once; every method a matcher names is served."""
    methods = served_methods()
    unanswered = []
    for title, expr in dashboard_queries():
        for op, names in re.findall(r'method(=~|!~|=|!=)"([^"]*)"', expr):
            unknown = [n for n in names.split("|") if n not in methods]
            assert not unknown, f"{title}: {unknown} are no method lossd serves ({sorted(methods)})"
            if op == "=~":
                streams = [n for n in names.split("|") if methods[n]]
                assert not streams, f"{title}: streaming methods {streams} in a latency selection"
        if "lossd_request_latency_seconds" in expr and "by (le, method)" not in expr:
            for selector in re.findall(r"lossd_request_latency_seconds_\w+\{([^}]*)\}", expr):
                assert 'method=~"' in selector, f"{title}: latency over every method, streams included: {expr}"
        elif "by (le, method)" in expr:
            unanswered.append(expr)
    assert unanswered and all('method!~"Watch|ServerReflectionInfo"' in e for e in unanswered)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    apt_install(["prometheus"], ["prometheus", "promtool"])
    out = subprocess.run(["prometheus", "--version"], capture_output=True, text=True, timeout=30)
    print(out.stdout or out.stderr)
    return (out.stdout or out.stderr).splitlines()[0]


def test_compose_mounts_this_scrape_config_and_promtool_accepts_it(prometheus_bin):
    compose = yaml.safe_load(COMPOSE.read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes, volumes
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"]["command"]
    done = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_expressions_evaluate_on_real_prometheus(prometheus_bin, tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 20, f"the dashboard has only {len(queries)} queries; did its layout change?"
    variables = dashboard_variables()
    assert set(variables) == {"instance"}, f"dashboard variables changed: {sorted(variables)}; extend this test"

    server = start_server("--drain-s", "0", metrics=True)
    prom = None
    try:
        assert server.metrics_port, server.log()
        prom = Prometheus(tmp_path, f"127.0.0.1:{server.metrics_port}")
        prom.wait_ready()
        up = prom.wait_until('up{job="lossd"}', lambda r: len(r) == 1 and r[0]["value"][1] == "1")
        assert up and up[0]["value"][1] == "1", f"lossd target not up: {up}\n{json.dumps(prom.get('/api/v1/targets'))[:3000]}"

        # Traffic, in rounds that span several scrapes so rate() sees increases.
        g = torch.Generator().manual_seed(0)
        evaluate_calls = 0
        with LossClient(server.address, timeout_s=60) as client:
            for rnd in range(12):
                for _ in range(10):
                    x = torch.randn(32, 11, generator=g)
                    y = torch.randint(0, 11, (32,), generator=g)
                    torch.testing.assert_close(client.cross_entropy(x, y), torch.nn.functional.cross_entropy(x, y))
                    evaluate_calls += 1
                logits = torch.randn(2, 16, 50, generator=g)
                tokens = torch.randint(0, 50, (2, 16), generator=g)
                client.perplexity(logits, tokens)
                evaluate_calls += 1
                many = [LossRequest(np.random.default_rng(rnd * 100 + i).standard_normal((8, 5)), np.arange(8) % 5) for i in range(16)]
                assert len(list(client.evaluate_many(many, window=8))) == 16
                time.sleep(0.4)

        # Prometheus has the final state once its Evaluate counter equals what we sent.
        want = float(evaluate_calls)
        got = prom.wait_until(
            'sum(lossd_requests_total{job="lossd",method="Evaluate",code="OK"})', lambda r: r and float(r[0]["value"][1]) >= want
        )
        assert scalar(got) == want, f"Prometheus counted {got} Evaluate calls, the client made {evaluate_calls}"
        # The traffic is over, so /metrics is final; a scrape taken during the last round's
        # evaluate_many (after its last Evaluate call) may still lag: wait for the next one.
        direct = server.metrics()
        for name in ("lossd_rows_total", "lossd_batch_requests_count", 'lossd_request_latency_seconds_count{method="EvaluatePacked"}'):
            selector = name.replace("{", '{job="lossd",') if "{" in name else name + '{job="lossd"}'
            got = prom.wait_until(f"sum({selector})", lambda r, final=direct[name]: r and float(r[0]["value"][1]) >= final)
            assert scalar(got) == direct[name], f"{name}: Prometheus and /metrics disagree"

        p99 = scalar(prom.query(P99))
        # A real quantile lies inside the histogram's finite buckets (NaN or +Inf would mean no data).
        assert math.isfinite(p99) and 0 < p99 <= LATENCY_BUCKETS_S[-1], f"p99 request latency {p99}"

        # Grafana's variable query, then every panel expression with "All" and with the one instance.
        (instance_var,) = variables.values()
        values = prom.get("/api/v1/label/instance/values", **{"match[]": "lossd_requests_total"})
        assert values["status"] == "success" and values["data"] == [f"127.0.0.1:{server.metrics_port}"], values
        failures = []
        # One selected value is regex-escaped for a PromQL string, as Grafana's Prometheus datasource does.
        for instance in (instance_var.get("allValue", ".*"), re.escape(values["data"][0]).replace("\\", "\\\\")):
            grafana = {"__rate_interval": RATE_INTERVAL, "__interval": SCRAPE_INTERVAL, "__range": RATE_INTERVAL, "instance": instance}
            for title, expr in queries:
                concrete = substitute(expr, grafana)
                try:
                    result = prom.query(concrete)
                except AssertionError as exc:  # Prometheus answered with an error
                    failures.append(f"{title}: {exc}")
                    continue
                if not result:
                    failures.append(f"{title}: no data for {concrete}")
                elif any(not math.isfinite(float(s["value"][1])) for s in result) and "histogram_quantile" not in concrete:
                    failures.append(f"{title}: non-finite value {result} for {concrete}")
                elif "histogram_quantile" in concrete and not any(math.isfinite(float(s["value"][1])) for s in result):
                    failures.append(f"{title}: quantile is NaN everywhere ({result}) for {concrete}")
        assert not failures, "\n".join(failures)
    finally:
        if prom is not None:
            prom.stop()
        assert server.stop() == 0, server.log()
