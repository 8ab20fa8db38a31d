"""``--workers 2``: two server processes on one port under a supervisor, with real processes on loopback.

Where a connection lands is the kernel's choice (SO_REUSEPORT hashes the client's port), so the
tests look it up (tests/workerprocs.py: /proc/<pid>/fd and /proc/net/tcp) and open connections
until both workers hold some; what each worker then serves follows exactly from the client's
round robin. Every process is stopped by its pid.
"""

from __future__ import annotations

import collections
import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lossd_client import LossClient, LossRequest, ResourceExhaustedError, core
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from serverproc import held_chunks, start_server
from workerprocs import GATE_ENV, Load, alive, channel_per_worker, own_ports, owners, stop_everything, wait_for, worker_pids

FLAGS = ("--workers", "2", "--drain-s", "0.2", "--grace-s", "30")
WORKERPROCS = str(Path(__file__).resolve().parents[1] / "workerprocs.py")


def checked_call(client: LossClient, seed: int, rows: int = 8, classes: int = 11) -> None:
    g = np.random.default_rng(seed)
    logits = g.standard_normal((rows, classes)).astype(np.float32)
    target = g.integers(0, classes, rows)
    got = client.cross_entropy(logits, target, reduction="sum")
    want = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(target), reduction="sum")
    torch.testing.assert_close(torch.from_numpy(np.asarray(got)), want)


def health(channel: grpc.Channel, service: str = "") -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def client_on_both_workers(server, connections: int = 4, attempts: int = 40, **options) -> tuple[LossClient, collections.Counter]:
    """A LossClient whose ``connections`` connections reach both workers, and how many each worker holds.

    One small call per connection (round robin) connects them all; this also checks that the
    client opened ``connections`` distinct connections."""
    for attempt in range(attempts):
        before = own_ports(server.port)
        client = LossClient(server.address, connections=connections, timeout_s=60, **options)
        for i in range(connections):
            checked_call(client, attempt * 100 + i)
        new = own_ports(server.port) - before
        assert len(new) == connections, (connections, new)
        held = collections.Counter(owners(server, new))
        if len(held) == 2:
            return client, held
        client.close()
    raise AssertionError(f"{attempts} clients of {connections} connections never reached both workers")


def sample(server, name: str, **labels: str) -> float:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    return server.metrics().get(key, 0.0)


@pytest.fixture(scope="module")
def pair():
    """One two-worker server with /metrics, for the tests that do not stop or kill anything."""
    proc = start_server(*FLAGS, metrics=True)
    try:
        assert proc.metrics_port, proc.log()
        yield proc
    finally:
        assert stop_everything(proc) == 0, proc.log()


# ---------------------------------------------------------------------------------------------
# calls spread over both workers, counted once


def test_round_robin_over_connections_gives_each_worker_its_share_and_metrics_count_each_call_once(pair):
    client, held = client_on_both_workers(pair)
    try:
        before = pair.metrics()
        rounds = 10
        for seed in range(rounds * client.connections):
            checked_call(client, 1000 + seed)
        after = pair.metrics()
    finally:
        client.close()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    calls = rounds * client.connections
    for worker in (0, 1):  # each connection carried exactly `rounds` calls
        assert delta(f'lossd_worker_requests_total{{method="Evaluate",worker="{worker}"}}') == rounds * held[worker], held
    assert delta('lossd_requests_total{code="OK",method="Evaluate"}') == calls
    assert delta('lossd_request_latency_seconds_count{method="Evaluate"}') == calls
    assert delta("lossd_rows_total") == calls * 8
    assert after["lossd_workers"] == 2 and after["lossd_workers_ready"] == 2
    assert after['lossd_requests_in_flight{method="Evaluate"}'] == 0
    assert after["lossd_memory_budget_bytes"] > 0 and after["lossd_process_rss_bytes"] > 20 * 2**20


def test_evaluate_many_opens_a_stream_per_connection(pair):
    g = np.random.default_rng(5)
    requests = [LossRequest(g.standard_normal((6, 9)).astype(np.float32), g.integers(0, 9, 6)) for _ in range(150)]
    want = [F.cross_entropy(torch.from_numpy(r.input), torch.from_numpy(r.target)) for r in requests]
    client, held = client_on_both_workers(pair)
    try:
        before = pair.metrics()
        got = list(client.evaluate_many(requests, window=32))
        after = pair.metrics()
    finally:
        client.close()
    for result, expected in zip(got, want, strict=True):
        torch.testing.assert_close(torch.from_numpy(np.asarray(result.loss)), expected)
    for worker in (0, 1):
        key = f'lossd_worker_requests_total{{method="EvaluatePacked",worker="{worker}"}}'
        assert after.get(key, 0.0) - before.get(key, 0.0) == held[worker], held


def test_async_client_spreads_its_streams_too(pair):
    import asyncio

    from lossd_client import AsyncLossClient

    g = np.random.default_rng(6)
    requests = [LossRequest(g.standard_normal((5, 7)).astype(np.float32), g.integers(0, 7, 5)) for _ in range(64)]

    async def run() -> tuple[list, list]:
        async with AsyncLossClient(pair.address, connections=3, timeout_s=60) as client:
            streamed = [r async for r in client.evaluate_many(requests, window=16)]
            unary = await asyncio.gather(*(client.evaluate(r) for r in requests[:12]))
        return streamed, unary

    before = pair.metrics()
    streamed, unary = asyncio.run(run())
    after = pair.metrics()
    for result, req in zip(streamed, requests, strict=True):
        torch.testing.assert_close(torch.from_numpy(np.asarray(result.loss)), F.cross_entropy(torch.from_numpy(req.input), torch.from_numpy(req.target)))
    for result, req in zip(unary, requests[:12], strict=True):
        torch.testing.assert_close(torch.from_numpy(np.asarray(result.loss)), F.cross_entropy(torch.from_numpy(req.input), torch.from_numpy(req.target)))

    def total(method: str) -> float:
        return sum(after.get(k, 0.0) - before.get(k, 0.0) for k in after if k.startswith(f'lossd_worker_requests_total{{method="{method}"'))

    assert core.pack_size(16, None, streams=3) == 1  # one request per message: EvaluateStream
    assert total("EvaluateStream") == 3  # one stream per connection
    assert total("Evaluate") == 12


# ---------------------------------------------------------------------------------------------
# health across workers, drain, and what the supervisor holds


MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("workers", "budget", "named"),
    [
        ("2", 128 * MiB, "more than this worker's share of memory_budget_bytes (67108864 = 134217728 / 2 workers) allows"),
        ("1", 64 * MiB, "more than memory_budget_bytes=67108864 allows"),  # one process: the text as it was
    ],
)
def test_a_request_over_a_workers_budget_is_refused_naming_the_configured_budget_and_the_workers(workers, budget, named):
    """Under --workers 2 --memory-budget-bytes 1258291200, the refusal said "more than
    memory_budget_bytes=629145600 allows": one worker's share, neither the flag's value nor said to
    be a share, and no word of --workers. A kl_div answer of 16 MiB, counted with what computing it
    holds (80 MiB), fits the configured 128 MiB but not a worker's 64 MiB."""
    n = 2048
    x, t = np.zeros((n, 1), np.float32), np.full((1, n), 1 / n, np.float32)
    server = start_server("--workers", workers, "--memory-budget-bytes", str(budget), "--max-message-bytes", str(MiB), "--drain-s", "0.2")
    try:
        with LossClient(server.address, timeout_s=60) as client:
            with pytest.raises(ResourceExhaustedError) as refused:
                client.kl_div(x, t, reduction="none")
    finally:
        assert stop_everything(server) == 0, server.log()
    message = str(refused.value)
    assert named in message and "split it into smaller requests" in message, message


def test_health_waits_for_every_worker_and_the_drain_reaches_both(tmp_path):
    """Worker 1's warm-up waits for a file: worker 0 is warm and still answers NOT_SERVING."""
    gate = tmp_path / "warm-up-gate"
    proc = start_server(
        "--workers", "2", "--drain-s", "300", "--grace-s", "30",
        metrics=True, env={GATE_ENV: str(gate)}, program=(WORKERPROCS,), ready_when=lambda line: "with 2 worker processes" in line,
    )  # fmt: skip
    channels: dict = {}
    try:
        pids = worker_pids(proc.log())
        wait_for(lambda: f"worker 0 (pid {pids[0]}) is warm" in proc.log(), what="worker 0 warm")
        channels = channel_per_worker(proc)
        for channel in channels.values():
            assert health(channel) == "NOT_SERVING"
            assert health(channel, "lossd.v1.LossService") == "NOT_SERVING"
        wait_for(lambda: proc.metrics_port, what="the metrics port")
        assert sample(proc, "lossd_workers_ready") == 1
        gate.touch()
        wait_for(lambda: "all 2 workers warm: SERVING" in proc.log(), what="SERVING")
        for channel in channels.values():
            assert health(channel) == "SERVING" and health(channel, "lossd.v1.LossService") == "SERVING"
        supervisor_holds_no_grpc_or_torch(proc)
        directory = proc.log().split("aggregated from ")[1].split(")")[0]
        assert os.path.isdir(directory)

        proc.signal(signal.SIGTERM)
        for channel in channels.values():
            wait_for(lambda c=channel: health(c) == "NOT_SERVING", what="NOT_SERVING on every worker")
        for channel in channels.values():  # still accepting while draining
            logits = np.ones((2, 3), np.float32)
            pb_grpc.LossServiceStub(channel).Evaluate(core.build(LossRequest(logits, np.array([0, 2])))[0], timeout=30)
        assert proc.proc.poll() is None
        proc.signal(signal.SIGTERM)  # a second signal skips what is left of the drain
        assert proc.proc.wait(60) == 0, proc.log()
        assert not os.path.exists(directory), "the multiprocess metrics directory outlived the server"
        assert not any(alive(pid) for pid in pids.values())
        assert proc.log().count("(drain)") == 2, proc.log()
    finally:
        for channel in channels.values():
            channel.close()
        stop_everything(proc)


def supervisor_holds_no_grpc_or_torch(proc) -> None:
    """The supervisor never loads grpc or torch: no gRPC object can exist in it before (or after) a worker starts."""
    with open(f"/proc/{proc.proc.pid}/maps") as f:
        maps = f.read()
    assert "cygrpc" not in maps and "libtorch" not in maps


@pytest.mark.parametrize("which", ["metrics", "grpc"])
def test_a_port_in_use_stops_a_workers_start_with_one_line_and_status_2(which):
    with subprocess.Popen([sys.executable, "-c", "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(1); print(s.getsockname()[1], flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True) as holder:  # fmt: skip
        try:
            port = int(holder.stdout.readline())
            flags = ["--metrics-port", str(port), "--port", "0"] if which == "metrics" else ["--port", str(port), "--metrics-port", "0"]
            cmd = [sys.executable, "-m", "lossd_server", "--host", "127.0.0.1", "--workers", "2", *flags]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        finally:
            holder.kill()
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(port) in lines[0] and ("--metrics-port" if which == "metrics" else "--port") in lines[0], lines[0]
    assert "worker" not in done.stderr  # refused before any worker started


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_process_group_while_workers_start_exits_0(sig):
    """systemd's KillMode=control-group or Ctrl-C while the workers import torch: the signal reaches
    the workers too, which hold it until they handle it (it used to kill them by its default
    action: the supervisor exited 1, or 2 when it counted the death as a failed start)."""
    cmd = [sys.executable, "-m", "lossd_server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    pids: dict = {}
    try:
        wait_for(lambda: "worker 1 started" in "".join(lines) or proc.poll() is not None, what="both workers started")
        pids = worker_pids("".join(lines))
        os.killpg(proc.pid, sig)  # its own group (start_new_session): the supervisor, the workers, multiprocessing's tracker
        assert proc.wait(120) == 0, "".join(lines)
        reader.join(30)
        assert "Traceback" not in "".join(lines), "".join(lines)
        wait_for(lambda: not any(alive(pid) for pid in pids.values()), 30, "the workers to exit")
    finally:
        for pid in [proc.pid, *pids.values()]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)


# ---------------------------------------------------------------------------------------------
# SIGTERM under load and a killed worker


N_CALLS = 24


def large_request(seed: int) -> LossRequest:
    """A 4 MiB float32 request (1024 rows of 1024 classes), some targets ignored."""
    g = np.random.default_rng(seed)
    return LossRequest(g.standard_normal((1024, 1024), dtype=np.float32), g.integers(-1, 1024, 1024), ignore_index=-1, reduction="sum")


def test_a_stop_that_reaches_a_worker_twice_directly_and_relayed_is_one_stop():
    """A signal to the whole process group (systemd KillMode=control-group, Ctrl-C) reaches every
    worker directly and, relayed by the supervisor, as ``stop``: one stop, whichever comes first.
    Here the relay comes first (the case that cut calls: the worker's own copy hurried, grace 0)."""
    proc = start_server("--workers", "2", "--drain-s", "2", "--grace-s", "120", metrics=True)
    channels: dict = {}
    release = threading.Event()
    try:
        pids = worker_pids(proc.log())
        channels = channel_per_worker(proc)
        requests = [large_request(seed) for seed in range(len(channels))]
        futures = [
            pb_grpc.LossServiceStub(channel).EvaluateChunked.future(held_chunks(req, release), timeout=300)
            for channel, req in zip(channels.values(), requests, strict=True)
        ]
        in_flight = 'lossd_requests_in_flight{method="EvaluateChunked"}'
        wait_for(lambda: sample(proc, in_flight) == len(futures), what="a call in flight on each worker")
        proc.signal(signal.SIGTERM)
        wait_for(lambda: proc.log().count("(drain)") == 2, what="the relayed stop on both workers")
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)  # the group signal's direct copy, after the relay
        wait_for(lambda: proc.log().count("drain over") == 2, what="the end of both drains")
        release.set()
        replies = [f.result() for f in futures]
        assert proc.proc.wait(120) == 0, proc.log()
    finally:
        release.set()
        for channel in channels.values():
            channel.close()
        stop_everything(proc)
    for req, reply in zip(requests, replies, strict=True):
        want = F.cross_entropy(torch.from_numpy(req.input), torch.from_numpy(req.target), ignore_index=-1, reduction="sum")
        torch.testing.assert_close(core.parse(reply, as_torch=True).loss, want)
    assert proc.log().count("in progress get at most 120.0s") == 2, proc.log()


def test_sigterm_with_calls_on_the_wire_to_both_workers_loses_nothing():
    proc = start_server("--workers", "2", "--drain-s", "3", "--grace-s", "120")
    channels: dict = {}
    try:
        channels = channel_per_worker(proc)
        stubs = [pb_grpc.LossServiceStub(channels[i % 2]) for i in range(N_CALLS)]  # half the calls on each worker
        futures = [stub.Evaluate.future(core.build(large_request(i))[0], timeout=300) for i, stub in enumerate(stubs)]
        proc.signal(signal.SIGTERM)
        replies = [f.result() for f in futures]
        assert proc.proc.wait(120) == 0, proc.log()
    finally:
        for channel in channels.values():
            channel.close()
        stop_everything(proc)
    for seed, reply in enumerate(replies):
        req = large_request(seed)
        want = F.cross_entropy(torch.from_numpy(req.input), torch.from_numpy(req.target), ignore_index=-1, reduction="sum")
        torch.testing.assert_close(core.parse(reply, as_torch=True).loss, want)
    log = proc.log()
    assert log.count("(drain)") == 2 and log.count("stopped (exit status 0)") == 2, log




def test_calls_a_workers_stop_cuts_at_the_end_of_its_grace_count_unavailable_as_their_clients_see():
    """Chunked calls whose clients stall past a worker's grace are cut by its stop: the clients see
    UNAVAILABLE, and lossd_requests_total counted them CANCELLED (docs/metrics.md: the code the
    client received)."""
    proc = start_server("--workers", "2", "--drain-s", "0.2", "--grace-s", "1", metrics=True)
    channels: dict = {}
    release = threading.Event()
    try:
        pid = worker_pids(proc.log())[0]
        channels = channel_per_worker(proc)
        stub = pb_grpc.LossServiceStub(channels[0])
        futures = [stub.EvaluateChunked.future(held_chunks(large_request(seed), release), timeout=120) for seed in range(2)]
        in_flight = 'lossd_requests_in_flight{method="EvaluateChunked"}'
        wait_for(lambda: sample(proc, in_flight) == 2, what="two stalled calls on worker 0")
        os.kill(pid, signal.SIGTERM)
        codes = []
        for future in futures:
            with pytest.raises(grpc.RpcError) as info:
                future.result()
            codes.append(info.value.code())
        wait_for(lambda: f"worker 0 (pid {pid}) stopped (exit status 0)" in proc.log(), what="worker 0's exit")
        cut = 'lossd_requests_total{code="UNAVAILABLE",method="EvaluateChunked"}'
        wait_for(lambda: sample(proc, cut) == 2, what=f"{cut} == 2: {proc.metrics()}")
        counted = proc.metrics()
    finally:
        release.set()
        for channel in channels.values():
            channel.close()
        stop_everything(proc)
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 2, codes
    assert counted.get('lossd_requests_total{code="CANCELLED",method="EvaluateChunked"}', 0.0) == 0, counted

def signal_worker_0_under_load(proc, sig: int) -> tuple[dict[int, int], Load]:
    """Send ``sig`` to worker 0 while a client keeps calling; return once its replacement serves,
    it has exited and calls went on: the worker pids before, and the load (its failures)."""
    old = worker_pids(proc.log())
    with LossClient(proc.address, connections=4, timeout_s=60) as client:
        with Load(lambda seed: checked_call(client, seed, rows=32, classes=512)) as load:
            load.wait_calls(30)
            os.kill(old[0], sig)
            wait_for(lambda: worker_pids(proc.log())[0] != old[0], what="a new worker 0")
            wait_for(lambda: not alive(old[0]), what="the signalled worker to finish")
            wait_for(lambda: proc.log().count("all 2 workers warm: SERVING") == 2, what="SERVING again")
            load.wait_calls(60)
    return old, load

def test_a_killed_worker_is_replaced_and_the_server_keeps_serving():
    proc = start_server(*FLAGS, metrics=True)
    try:
        old, load = signal_worker_0_under_load(proc, signal.SIGKILL)
        assert not load.failures, load.failures[:3]
        new = worker_pids(proc.log())
        assert new[0] != old[0] and new[1] == old[1] and not alive(old[0])
        assert f"worker 0 (pid {old[0]}) exited with signal SIGKILL" in proc.log()
        assert sample(proc, "lossd_worker_restarts_total") == 1 and sample(proc, "lossd_workers_ready") == 2
        replacement, held = client_on_both_workers(proc)  # calls on the new worker 0's connections are answered
        replacement.close()
        assert held[0] >= 1
        assert stop_everything(proc) == 0, proc.log()
    finally:
        stop_everything(proc)


def test_a_worker_that_cannot_be_replaced_for_a_while_is_retried_and_the_supervisor_serves_on():
    """Probe 17 F2: with the supervisor out of file descriptors, a killed worker's replacement failed
    (EMFILE from its pipe), the supervisor exited 1 with a traceback, the other worker drained and
    the service stayed down. Here the supervisor's open-files limit is lowered (prlimit on its pid)
    while worker 0 is killed: its start fails, is logged and retried with the backoff, health is
    NOT_SERVING meanwhile; with the limit back the retry starts it, and all is served as before."""
    proc = start_server(*FLAGS, metrics=True)
    try:
        supervisor = proc.proc.pid
        soft, hard = resource.prlimit(supervisor, resource.RLIMIT_NOFILE)
        old = worker_pids(proc.log())
        # The limit: as many descriptors as its loop polls at once (the signal socket, each worker's
        # pipe and sentinel; poll(2) refuses more than the limit). Descriptors 0-4 (stdio, the signal
        # socket pair) stay open, so every new one (the lowest free number: 5 or more) fails EMFILE.
        limit = 1 + 2 * 2
        assert {str(fd) for fd in range(limit)} <= set(os.listdir(f"/proc/{supervisor}/fd"))
        resource.prlimit(supervisor, resource.RLIMIT_NOFILE, (limit, hard))
        try:
            os.kill(old[0], signal.SIGKILL)
            failed = "could not start a new worker 0 ([Errno 24] Too many open files): trying again in"
            wait_for(lambda: proc.log().count(failed) >= 2 or proc.proc.poll() is not None, what="two failed starts")
            assert proc.log().count(failed) >= 2, proc.log()
            assert proc.proc.poll() is None and alive(old[1]), proc.log()
            with grpc.insecure_channel(proc.address) as channel:  # only worker 1 listens
                assert health(channel) == "NOT_SERVING"
        finally:
            resource.prlimit(supervisor, resource.RLIMIT_NOFILE, (soft, hard))
        wait_for(lambda: proc.log().count("all 2 workers warm: SERVING") == 2, what="SERVING again")
        new = worker_pids(proc.log())
        assert new[0] != old[0] and new[1] == old[1] and "Traceback" not in proc.log(), proc.log()
        assert sample(proc, "lossd_worker_restarts_total") == 1  # the failed starts are no restarts
        client, held = client_on_both_workers(proc)
        client.close()
        assert held[0] >= 1
        assert stop_everything(proc) == 0, proc.log()
    finally:
        stop_everything(proc)


COUNTED = (
    'lossd_requests_total{code="OK",method="Evaluate"}',
    'lossd_request_latency_seconds_count{method="Evaluate"}',
    'lossd_request_latency_seconds_sum{method="Evaluate"}',
)
#: lossd_server.metrics_files: what a dead worker's summed files are folded into.
ARCHIVES = {"counter_archive.db", "histogram_archive.db", "summary_archive.db", "gauge_sum_archive.db"}


def kill_and_wait(proc, index: int, restarts: int, poll: Callable[[], object]) -> set[int]:
    """SIGKILL worker ``index`` and wait until its replacement is warm (the ``restarts``-th), calling
    ``poll`` on every look; the live workers' pids."""
    old = worker_pids(proc.log())[index]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: poll() and worker_pids(proc.log())[index] != old, what=f"a new worker {index}")
    wait_for(lambda: poll() and proc.log().count("all 2 workers warm: SERVING") == restarts + 1, what="SERVING again")
    return set(worker_pids(proc.log()).values())


def test_workers_killed_again_and_again_leave_one_metrics_file_per_type_and_their_counts_never_go_down():
    """Probe 16 F10: each dead worker's counter and histogram files stayed in the metrics directory
    (2 files per restart, every one read by every scrape). They are folded into one archive per type:
    the directory holds the live workers' files and the archives, and the counts scraped during and
    after the restarts never go down and end at the number of calls made."""
    proc = start_server(*FLAGS, metrics=True)
    scrapes: list[dict[str, float]] = []

    def scraped() -> dict[str, float]:
        scrapes.append({name: proc.metrics().get(name, 0.0) for name in COUNTED})
        return scrapes[-1]

    try:
        directory = proc.log().split("aggregated from ")[1].split(")")[0]
        calls, kills = 0, 4
        with LossClient(proc.address, connections=4, timeout_s=60) as client:
            for kill in range(kills + 1):
                for _ in range(8):  # no call in flight at a kill: each is answered, and counted, once
                    checked_call(client, calls)
                    calls += 1
                    scraped()
                if kill == kills:
                    break
                live = kill_and_wait(proc, kill % 2, kill + 1, scraped)
                files = [name for name in os.listdir(directory) if name.endswith(".db")]
                assert {name for name in files if name not in ARCHIVES and int(name[:-3].rsplit("_", 1)[1]) not in live} == set(), files
                assert {"counter_archive.db", "histogram_archive.db"} <= set(files), files
        final = scraped()
        assert final[COUNTED[0]] == final[COUNTED[1]] == calls and final[COUNTED[2]] > 0, final
        for name in COUNTED:
            series = [s[name] for s in scrapes]
            assert all(a <= b for a, b in zip(series, series[1:], strict=False)), (name, series)
        assert proc.log().count("exited with signal SIGKILL") == kills and sample(proc, "lossd_worker_restarts_total") == kills
        assert stop_everything(proc) == 0, proc.log()
        assert not os.path.exists(directory)
    finally:
        stop_everything(proc)


def test_a_worker_sent_its_own_sigterm_finishes_its_calls_and_a_new_one_takes_its_place():
    """``kill -TERM <worker pid>`` (not the supervisor's): the worker drains as in a stop, its slot
    gets a new worker at once, and the log says so instead of reporting a death."""
    proc = start_server(*FLAGS, metrics=True)
    try:
        old, load = signal_worker_0_under_load(proc, signal.SIGTERM)
        assert not load.failures, load.failures[:3]
        log = proc.log()
        assert f"worker 0 (pid {old[0]}) got its own stop signal" in log, log
        assert f"worker 0 (pid {old[0]}) stopped (exit status 0)" in log and "exited with" not in log, log
        assert sample(proc, "lossd_worker_restarts_total") == 1 and sample(proc, "lossd_workers_ready") == 2
        assert worker_pids(proc.log())[1] == old[1]
        assert stop_everything(proc) == 0, proc.log()
    finally:
        stop_everything(proc)


def test_a_killed_supervisors_metrics_directory_is_removed_by_the_next_one():
    """A supervisor killed by SIGKILL cannot remove its /metrics directory; the next supervisor
    removes it once the orphaned workers have finished."""
    proc = start_server(*FLAGS, metrics=True)
    second = None
    try:
        directory = proc.log().split("aggregated from ")[1].split(")")[0]
        pids = worker_pids(proc.log())
        proc.signal(signal.SIGKILL)
        assert proc.proc.wait(30) == -signal.SIGKILL
        wait_for(lambda: not any(alive(pid) for pid in pids.values()), 60, "the orphaned workers to exit")
        assert os.path.isdir(directory)
        second = start_server(*FLAGS, metrics=True)
        assert not os.path.exists(directory) and directory in second.log(), second.log()
    finally:
        stop_everything(proc)
        if second is not None:
            assert stop_everything(second) == 0, second.log()


def test_workers_whose_supervisor_is_killed_drain_and_exit():
    proc = start_server(*FLAGS)
    try:
        pids = worker_pids(proc.log())
        assert len(pids) == 2 and all(alive(pid) for pid in pids.values())
        proc.signal(signal.SIGKILL)
        assert proc.proc.wait(30) == -signal.SIGKILL
        wait_for(lambda: not any(alive(pid) for pid in pids.values()), 60, "the orphaned workers to exit")
        assert proc.log().count("the supervisor is gone: stopping") == 2, proc.log()
    finally:
        stop_everything(proc)


def fresh_channel_call(server, seed: int, timeout_s: float = 10.0) -> None:
    """One Evaluate on a channel of its own (a new connection: the kernel picks its worker)."""
    g = np.random.default_rng(seed)
    request = LossRequest(g.standard_normal((4, 6)).astype(np.float32), g.integers(0, 6, 4))
    with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        pb_grpc.LossServiceStub(channel).Evaluate(core.build(request)[0], timeout=timeout_s)


def test_a_stopped_worker_is_killed_after_the_stall_timeout_and_replaced():
    """A hung worker (SIGSTOP here, a deadlock alike) does not exit, and the kernel kept handing it
    new connections: calls on fresh channels hung until their deadline, health checks timed out,
    and the supervisor reported 2 ready workers for as long as it was stopped. Its event loop does
    not answer the supervisor's pings: after --worker-stall-timeout-s it is killed and replaced."""
    proc = start_server(*FLAGS, "--worker-stall-timeout-s", "4", metrics=True)  # a starting worker gets 4x: 16 s
    stopped = None
    channels: dict = {}
    try:
        old = worker_pids(proc.log())
        channels = channel_per_worker(proc)
        assert health(channels[1]) == "SERVING"
        stopped = old[0]
        os.kill(stopped, signal.SIGSTOP)
        wait_for(lambda: f"worker 0 (pid {stopped}) has not answered" in proc.log(), 60, "the stall to be noticed")
        wait_for(lambda: health(channels[1]) == "NOT_SERVING", 30, "NOT_SERVING while worker 0 is replaced")
        wait_for(lambda: worker_pids(proc.log())[0] != stopped, 60, "a new worker 0")
        wait_for(lambda: proc.log().count("all 2 workers warm: SERVING") == 2, 120, "SERVING again")
        wait_for(lambda: not alive(stopped), 30, "the stopped worker to be gone")
        assert f"worker 0 (pid {stopped}) exited with signal SIGKILL" in proc.log()
        assert health(channels[1]) == "SERVING"
        new = worker_pids(proc.log())
        assert new[1] == old[1] and "has not answered" not in proc.log().split(f"started (pid {new[0]})")[1]
        assert sample(proc, "lossd_worker_restarts_total") == 1 and sample(proc, "lossd_workers_ready") == 2
        for seed in range(12):  # every fresh connection lands on a live worker
            fresh_channel_call(proc, seed)
        replacement, held = client_on_both_workers(proc)  # the new worker 0 answers too
        replacement.close()
        assert held[0] >= 1
        for channel in channels.values():
            channel.close()
        assert stop_everything(proc) == 0, proc.log()
    finally:
        for channel in channels.values():
            channel.close()
        if stopped is not None and alive(stopped):
            os.kill(stopped, signal.SIGCONT)
            os.kill(stopped, signal.SIGKILL)
        stop_everything(proc)


def test_a_second_signal_during_the_drain_stops_every_worker_cleanly():
    """The second signal skips what is left of the drain (grace 0). The stop once ran gRPC's
    shutdown twice at once there, and a worker died of SIGSEGV in 5 of 20 such stops."""
    for _ in range(6):
        proc = start_server(*FLAGS)
        try:
            with LossClient(proc.address, timeout_s=30) as client:
                client.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 2]))
            proc.signal(signal.SIGTERM)
            wait_for(lambda proc=proc: proc.log().count("(drain)") == 2, what="both workers draining")
            proc.signal(signal.SIGTERM)
            assert proc.proc.wait(60) == 0, proc.log()
            assert "signal SIG" not in proc.log(), proc.log()  # no worker ended by a signal
        finally:
            proc.stop()
