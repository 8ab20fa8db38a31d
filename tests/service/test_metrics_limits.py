"""Probe 17 F1: a real server's /metrics port under idle, slow and oversized connections.

prometheus-client's listener gave every connection a thread and a file descriptor for as long as
the client liked: 2,000 idle connections held 2,011 threads, a header sent a byte a second was
never closed, 100 hoarded heads took gigabytes, and once the file descriptors ran out the gRPC
port stopped accepting. lossd_server.metrics_http bounds all of it. Checked here on a single
process and on a ``--workers 2`` supervisor, by outcome: every such connection is closed by the
server (a 503, a 431 or an end of stream), the process's threads, file descriptors (both from
/proc/<pid>/status and /proc/<pid>/fd, sampled while the connections are held) and resident memory
stay within the cap, and gRPC calls are answered meanwhile. Every server is stopped by its pid.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
from lossd_client import LossClient
from lossd_server.metrics_http import MAX_CONNECTIONS, MAX_HEAD_BYTES
from serverproc import start_server
from workerprocs import stop_everything

#: Threads or file descriptors a process may gain for other reasons while a test holds connections.
SLACK = 4
#: Connections each test opens: several times the cap.
CONNECTIONS = 6 * MAX_CONNECTIONS
#: How long a client waits for the server to answer or close (the limits close within seconds).
WAIT_S = 30.0


@pytest.fixture(scope="module", params=["one process", "--workers 2"])
def server(request):
    """A server with /metrics; for ``--workers 2`` the process whose counts are checked is the supervisor."""
    if request.param == "one process":
        proc = start_server(metrics=True)
        yield proc
        proc.stop()
    else:
        proc = start_server("--workers", "2", "--drain-s", "0.2", "--grace-s", "30", metrics=True)
        try:
            yield proc
        finally:
            assert stop_everything(proc) == 0, proc.log()


def counts(pid: int) -> dict[str, int]:
    """Threads, open file descriptors and resident kB of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return {
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss_kb": int(status["VmRSS"].split()[0]),
    }


class Peak:
    """The highest :func:`counts` of a process, sampled in a thread while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.high = counts(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for key, value in counts(self.pid).items():
                self.high[key] = max(self.high[key], value)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def grpc_served(server) -> None:
    """A call and a health check on a new connection are answered."""
    with LossClient(server.address, timeout_s=30) as client:
        loss = client.cross_entropy(np.array([[0.0, 0.0]], dtype=np.float32), np.array([1]))
        assert abs(float(loss) - np.log(2)) < 1e-6
        assert client.health() == "SERVING"


def scrape(server) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=WAIT_S) as reply:
        assert reply.status == 200
        return reply.read()


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.metrics_port), timeout=WAIT_S)


def outcome(sock: socket.socket) -> str:
    """How the server ended the connection: ``503``/``431``/... (an answer then the end of the
    stream), ``closed`` (the end of the stream, or a reset, without an answer). A client still
    waiting after WAIT_S gets ``socket.timeout``: the server kept the connection."""
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data[9:12].decode() if data.startswith(b"HTTP/1.") else "closed" if not data else f"? {bytes(data[:40])!r}"


def baseline(server) -> dict[str, int]:
    grpc_served(server)  # whatever a first call starts is there before the counts are taken
    scrape(server)
    return counts(server.proc.pid)


def test_idle_connections_get_at_most_the_cap_of_threads_and_are_closed_at_the_head_deadline(server):
    before = baseline(server)
    with Peak(server.proc.pid) as peak:
        socks = [connect(server) for _ in range(CONNECTIONS)]
        try:
            grpc_served(server)
            outcomes = [outcome(sock) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
    assert set(outcomes) <= {"503", "closed"}, outcomes
    assert "503" in outcomes and "closed" in outcomes, outcomes  # refused past the cap; the others at the deadline
    assert peak.high["threads"] <= before["threads"] + MAX_CONNECTIONS + SLACK, (before, peak.high)
    assert peak.high["fds"] <= before["fds"] + MAX_CONNECTIONS + SLACK, (before, peak.high)
    assert b"lossd_" in scrape(server)
    grpc_served(server)


def test_heads_sent_a_byte_at_a_time_are_closed(server):
    before = baseline(server)
    socks = [connect(server) for _ in range(2 * MAX_CONNECTIONS)]
    closed: set[int] = set()
    with Peak(server.proc.pid) as peak:
        try:
            for sock in socks:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            for _ in range(240):  # a byte to each every 0.25 s: 60 s at most
                for i, sock in enumerate(socks):
                    if i not in closed and _send_byte_or_closed(sock):
                        closed.add(i)
                if len(closed) == len(socks):
                    break
                time.sleep(0.25)
            grpc_served(server)
        finally:
            for sock in socks:
                sock.close()
    assert len(closed) == len(socks), f"{len(socks) - len(closed)} connections still open"
    assert peak.high["threads"] <= before["threads"] + MAX_CONNECTIONS + SLACK, (before, peak.high)
    assert b"lossd_" in scrape(server)


def _send_byte_or_closed(sock: socket.socket) -> bool:
    """Send one byte; whether the server has closed the connection (an answer, an end of stream, a reset)."""
    sock.setblocking(False)
    try:
        sock.recv(65536)
        return True  # an answer (503) or the end of the stream
    except BlockingIOError:
        pass
    except OSError:
        return True
    finally:
        sock.setblocking(True)
    try:
        sock.send(b"a")
    except OSError:
        return True
    return False


def test_hoarded_heads_are_cut_at_the_byte_cap_and_cost_no_memory(server):
    """The probe's hoard: 99 header lines of 65,000 bytes (within http.server's own limits) and no end."""
    before = baseline(server)
    hoard = b"GET /metrics HTTP/1.1\r\n" + (b"X-Hoard: " + b"h" * 65_000 + b"\r\n") * 99
    results: list[str] = []

    def one() -> None:
        with connect(server) as sock:
            try:
                sock.sendall(hoard)
            except (BrokenPipeError, ConnectionResetError):
                results.append("closed")
                return
            results.append(outcome(sock))

    with Peak(server.proc.pid) as peak:
        threads = [threading.Thread(target=one, daemon=True) for _ in range(2 * MAX_CONNECTIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(2 * WAIT_S)
    assert len(results) == len(threads) and set(results) <= {"431", "503", "closed"}, results
    sent_mib = len(threads) * len(hoard) / 2**20
    grown_mib = (peak.high["rss_kb"] - before["rss_kb"]) / 1024
    assert grown_mib < 64, f"resident memory grew {grown_mib:.0f} MiB for {sent_mib:.0f} MiB of hoarded heads"
    assert len(hoard) > 300 * MAX_HEAD_BYTES
    assert b"lossd_" in scrape(server)
    grpc_served(server)
