"""Client-side round robin over two real server processes, and a replica restarted mid-run."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import DeadlineExceededError, LossClient, UnavailableError
from lossd_client.channel import RECONNECT_BACKOFF_MAX_MS, channel_options
from lossd_client.client import normalise_target, service_config
from prometheus_client.parser import text_string_to_metric_families
from serverproc import ServerProcess, start_server

FLAGS = ("--drain-s", "0.2", "--grace-s", "30")


def evaluate_ok(port: int) -> float:
    """lossd_requests_total{method="Evaluate",code="OK"} of one server."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "lossd_requests_total" and s.labels == {"method": "Evaluate", "code": "OK"}:
                return s.value
    return 0.0


def checked_call(client: LossClient, seed: int, rows: int = 8, classes: int = 11) -> None:
    g = np.random.default_rng(seed)
    logits = g.standard_normal((rows, classes)).astype(np.float32)
    target = g.integers(0, classes, rows)
    got = client.cross_entropy(logits, target, reduction="sum")
    torch.testing.assert_close(torch.from_numpy(np.asarray(got)), F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(target), reduction="sum"))


@pytest.fixture(scope="module")
def replicas():
    """Two replicas; the restart test replaces the first one (it runs last)."""
    started: list[ServerProcess] = []
    try:
        for _ in range(2):
            started.append(start_server(*FLAGS, metrics=True))
        yield started
    finally:
        for proc in started:
            proc.stop()


def test_round_robin_spreads_calls_over_both_replicas(replicas):
    a, b = replicas
    before = evaluate_ok(a.metrics_port), evaluate_ok(b.metrics_port)
    with LossClient([a.address, b.address], timeout_s=30) as client:
        for seed in range(40):
            checked_call(client, seed)
    got_a, got_b = evaluate_ok(a.metrics_port) - before[0], evaluate_ok(b.metrics_port) - before[1]
    assert got_a >= 1 and got_b >= 1, (got_a, got_b)
    assert got_a + got_b == 40


def test_dns_target_resolves_to_a_replica(server):
    with LossClient(f"dns:///localhost:{server.port}", timeout_s=30) as client:
        checked_call(client, 0)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "crash"])
def test_restarting_a_replica_mid_run_loses_no_call(replicas, how):
    """Four threads keep calling while replica 0 goes away and comes back on the same port.

    SIGTERM: the replica drains and sends GOAWAY; calls sent after it are replayed transparently,
    and the rare call its transport received but never started comes back CANCELLED and is
    retried. SIGKILL: calls in flight on it fail UNAVAILABLE and the service-config retry policy
    replays them on the other replica (requests are idempotent; these 1 MiB ones fit the
    client's 64 MiB retry buffer, not gRPC's default 256 KiB).
    """
    a, b = replicas
    port = a.port
    calls = 0
    failures: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load(client: LossClient, thread: int) -> None:
        nonlocal calls
        for i in range(20000):
            if stop.is_set():
                return
            try:
                checked_call(client, thread * 100000 + i, rows=64, classes=4096)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                failures.append(exc)
            with lock:
                calls += 1

    def wait_calls(n: int) -> None:
        target = calls + n
        for _ in range(1200):
            if calls >= target or failures or not any(w.is_alive() for w in workers):
                return
            time.sleep(0.05)

    with LossClient([a.address, b.address], timeout_s=60) as client:
        workers = [threading.Thread(target=load, args=(client, t), daemon=True) for t in range(4)]
        for w in workers:
            w.start()
        try:
            wait_calls(40)
            a.signal(how)
            assert a.proc.wait(60) == (0 if how == signal.SIGTERM else -signal.SIGKILL), a.log()
            wait_calls(100)
            restarted = start_server("--port", str(port), *FLAGS, metrics=True)
            replicas[0] = restarted
            assert restarted.port == port
            for _ in range(600):
                if evaluate_ok(restarted.metrics_port) > 0 or failures:
                    break
                time.sleep(0.1)
            wait_calls(40)
            assert not failures, failures[:3]
            assert evaluate_ok(restarted.metrics_port) > 0, "the restarted replica never received traffic"
        finally:
            stop.set()
            for w in workers:
                w.join(120)
    assert not failures, failures[:3]
    assert calls >= 180


def test_address_lists_become_one_round_robin_target():
    assert normalise_target(["127.0.0.1:1", "10.0.0.2:2"]) == "ipv4:127.0.0.1:1,10.0.0.2:2"
    assert normalise_target(["[::1]:1", "[fe80::1]:2"]) == "ipv6:[::1]:1,[fe80::1]:2"
    assert normalise_target(["dns:///lossd:50051"]) == "dns:///lossd:50051"
    with pytest.raises(ValueError, match="dns:///"):
        normalise_target(["lossd-0:50051", "lossd-1:50051"])
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]


def test_reconnection_backoff_is_capped():
    """gRPC's default reconnection backoff (1 s, x1.6, up to 120 s) left a live client failing
    UNAVAILABLE for 14 s after a server that was away 30 s was back (1.6 s with the cap)."""
    options = dict(channel_options(64 << 20, 5))
    assert options["grpc.max_reconnect_backoff_ms"] == RECONNECT_BACKOFF_MAX_MS <= 2000
    assert options["grpc.initial_reconnect_backoff_ms"] <= RECONNECT_BACKOFF_MAX_MS


def _connections_to(port: int) -> int:
    """Established TCP connections of this host whose remote end is 127.0.0.1:``port`` (clients'
    ends; gRPC's sockets are IPv6 ones, the address v4-mapped)."""
    remotes = {f"0100007F:{port:04X}", f"0000000000000000FFFF00000100007F:{port:04X}"}
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as table:
            next(table)
            count += sum(1 for line in table if line.split()[3] == "01" and line.split()[2] in remotes)
    return count


def test_a_new_client_does_not_inherit_another_clients_failed_connection():
    """Every client has its own connection (its own subchannel pool): gRPC shared one between the
    channels of a process with the same target, so a client made after a restarted server was
    SERVING inherited the failed connection of a client that had called while it was away, and
    that connection's reconnection backoff (up to 2 s) outlasted the retries of the new client's
    first call: UNAVAILABLE "Connection refused" in 3 of 15 restarts."""
    server = start_server(*FLAGS)
    restarted = None
    try:
        port = server.port
        with LossClient(server.address, timeout_s=10) as first, LossClient(server.address, timeout_s=10) as second:
            checked_call(first, 1)
            checked_call(second, 2)
            assert _connections_to(port) == 2
        with LossClient(server.address, timeout_s=10) as old:
            checked_call(old, 3)
            server.signal(signal.SIGKILL)
            server.proc.wait(60)
            away_until = time.monotonic() + 3
            for _ in range(100):  # calls while the server is away: the old client's connection backs off
                if time.monotonic() > away_until:
                    break
                with pytest.raises((UnavailableError, DeadlineExceededError)):
                    old.cross_entropy(np.zeros((1, 2), np.float32), np.zeros(1, np.int64), timeout_s=1)
            restarted = start_server("--port", str(port), *FLAGS)
            with LossClient(restarted.address, timeout_s=10) as new:
                checked_call(new, 4)
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()
