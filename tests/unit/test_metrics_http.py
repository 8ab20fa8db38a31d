"""lossd_server.metrics_http: /metrics answers as prometheus-client's own server did, within its limits.

In-process, on loopback: a listener of this module and, for comparison, prometheus-client's
``start_http_server`` (what lossd served before probe 17), both over one registry. The limits
are checked by their outcome (the server closed the connection, answered 503/431/414, holds no
more threads than its cap), never by how long anything took; the deadlines are shortened here so
that the bounded loops stay short.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time

import pytest
from lossd_server import metrics_http
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("lossd_test_calls", "calls", ["method"], registry=registry).labels("Evaluate").inc(3)
    Histogram("lossd_test_latency_seconds", "latency", registry=registry).observe(0.25)
    return registry


class BigCollector:
    """Many megabytes of samples: a response that a client which does not read cannot take whole."""

    def collect(self):
        family = GaugeMetricFamily("lossd_test_big", "big", labels=["key"])
        for i in range(100_000):
            family.add_metric([f"{i:060d}"], i)
        yield family


@pytest.fixture
def served():
    """Start ``metrics_http.serve`` over a registry (after the test's monkeypatching); stopped at the end."""
    servers = []

    def serve(registry: CollectorRegistry | None = None) -> metrics_http.MetricsHTTPServer:
        httpd = metrics_http.serve("127.0.0.1", 0, registry or _registry())
        servers.append(httpd)
        return httpd

    yield serve
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def exchange(port: int, request: bytes, timeout_s: float = 30.0) -> bytes:
    """Send ``request``, read until the server closes; what came back (``<RESET>`` appended on a reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        return read_to_close(sock)


def read_to_close(sock: socket.socket) -> bytes:
    out = bytearray()
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        out += b"<RESET>"
    return bytes(out)


def parsed(response: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """(status line, headers but Date, body gunzipped), to compare two servers' answers."""
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = [tuple(line.split(b": ", 1)) for line in lines if not line.startswith(b"Date:")]
    if (b"Content-Encoding", b"gzip") in headers:
        body = gzip.decompress(body)
        headers = [h for h in headers if h[0] != b"Content-Length"]
    return status, headers, body


REQUESTS = [
    b"GET /metrics HTTP/1.1\r\nHost: lossd\r\n\r\n",
    b"GET /metrics HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n",
    b"GET /metrics?name[]=lossd_test_calls_total HTTP/1.1\r\n\r\n",
    b"GET /metrics HTTP/1.1\n\n",
    b"HEAD /metrics HTTP/1.1\r\n\r\n",
    b"OPTIONS /metrics HTTP/1.1\r\n\r\n",
    b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"GET /favicon.ico HTTP/1.1\r\n\r\n",
    b"NONSENSE\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",  # http.server's cap on headers: 431
]


def test_every_answer_is_the_one_prometheus_clients_own_server_gave():
    registry = _registry()
    before, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    now = metrics_http.serve("127.0.0.1", 0, registry)
    try:
        for request in REQUESTS:
            old = exchange(before.server_address[1], request)
            new = exchange(now.server_address[1], request)
            assert parsed(new) == parsed(old), request
        ok = parsed(exchange(now.server_address[1], REQUESTS[0]))
        assert ok[0] == b"HTTP/1.0 200 OK" and b'lossd_test_calls_total{method="Evaluate"} 3.0' in ok[2]
    finally:
        for httpd in (before, now):
            httpd.shutdown()
            httpd.server_close()


def _threads_of(httpd: metrics_http.MetricsHTTPServer) -> list[threading.Thread]:
    """The threads serving a connection (ThreadingMixIn names none: they run process_request_thread)."""
    return [t for t in threading.enumerate() if getattr(t, "_target", None) == httpd.process_request_thread]


def _connection_threads(httpd: metrics_http.MetricsHTTPServer) -> int:
    return len(_threads_of(httpd))


def _wait(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def test_connections_past_the_cap_are_answered_503_and_get_no_thread(served, monkeypatch):
    monkeypatch.setattr(metrics_http, "HEAD_TIMEOUT_S", 120.0)  # the idle ones stay for the whole test
    httpd = served()
    port = httpd.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(metrics_http.MAX_CONNECTIONS)]
    try:
        _wait(lambda: _connection_threads(httpd) == metrics_http.MAX_CONNECTIONS, "a thread for each idle connection")
        for _ in range(3 * metrics_http.MAX_CONNECTIONS):
            answer = exchange(port, b"")  # closed by the server at once, without reading a request
            assert answer.startswith(b"HTTP/1.0 503 Service Unavailable\r\n") or answer in (b"", b"<RESET>"), answer
            assert _connection_threads(httpd) <= metrics_http.MAX_CONNECTIONS
        assert _connection_threads(httpd) == metrics_http.MAX_CONNECTIONS
    finally:
        for sock in idle:
            sock.close()
    _wait(lambda: _connection_threads(httpd) == 0, "the idle connections' threads to end")
    assert exchange(port, REQUESTS[0]).startswith(b"HTTP/1.0 200 OK")


def test_a_head_that_trickles_in_is_closed_at_the_head_deadline(served, monkeypatch):
    monkeypatch.setattr(metrics_http, "HEAD_TIMEOUT_S", 0.5)
    httpd = served()
    port = httpd.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        closed = False
        for _ in range(400):  # a byte every 50 ms: 20 s, 40 times the deadline
            try:
                sock.send(b"a")
            except OSError:
                closed = True
                break
            time.sleep(0.05)
            sock.setblocking(False)
            try:
                closed = sock.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed = True
            sock.setblocking(True)
            if closed:
                break
        assert closed, "the server kept a head trickling in a byte at a time"
    # silent connections, and a request line that never gets its blank line (HTTP/0.9 style)
    assert exchange(port, b"") == b""
    assert exchange(port, b"GET /metrics\r\n") == b""
    _wait(lambda: _connection_threads(httpd) == 0, "every connection's thread to end")


def test_a_head_split_over_many_reads_is_served(served):
    httpd = served()
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=30) as sock:
        for piece in (b"GET /metrics HT", b"TP/1.1\r\nHost: x\r", b"\n\r", b"\n"):
            sock.sendall(piece)
            time.sleep(0.05)
        assert read_to_close(sock).startswith(b"HTTP/1.0 200 OK")


def test_a_head_past_the_byte_cap_is_answered_431_or_414(served):
    httpd = served()
    port = httpd.server_address[1]
    cap = metrics_http.MAX_HEAD_BYTES
    line = b"GET /metrics HTTP/1.1\r\n"
    headers = line + b"X-Big: " + b"a" * (cap - len(line) - 7)
    assert len(headers) == cap
    assert exchange(port, headers).startswith(b"HTTP/1.0 431 ")
    assert exchange(port, b"GET /" + b"a" * (cap - 5)).startswith(b"HTTP/1.0 414 ")
    fits = line + b"X-Big: " + b"a" * (cap - len(line) - 11) + b"\r\n\r\n"
    assert len(fits) == cap and exchange(port, fits).startswith(b"HTTP/1.0 200 OK")
    # the probe's hoard: 99 lines of 65,000 bytes and no end. The server stops reading at the cap.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(line + (b"X-Hoard: " + b"h" * 65_000 + b"\r\n") * 99)
            answer = read_to_close(sock)
        except (BrokenPipeError, ConnectionResetError):
            answer = b"<closed while sending>"
    assert answer.startswith(b"HTTP/1.0 431 ") or answer in (b"<RESET>", b"<closed while sending>"), answer[:80]
    _wait(lambda: _connection_threads(httpd) == 0, "every connection's thread to end")


def test_a_client_that_does_not_read_the_response_is_dropped(served, monkeypatch):
    monkeypatch.setattr(metrics_http, "SEND_TIMEOUT_S", 0.5)
    aborted: list[BaseException] = []
    write = metrics_http.DeadlineWriter.write

    def recording(self, data):
        try:
            return write(self, data)
        except ConnectionAbortedError as exc:
            aborted.append(exc)
            raise

    monkeypatch.setattr(metrics_http.DeadlineWriter, "write", recording)
    registry = CollectorRegistry()
    registry.register(BigCollector())
    assert len(generate_latest(registry)) > 8_000_000  # more than the kernel buffers of both ends hold here
    httpd = served(registry)
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        _wait(lambda: aborted, "the server to give the response up", timeout_s=120)
        _wait(lambda: _connection_threads(httpd) == 0, "the connection's thread to end")
        assert sock.recv(15) == b"HTTP/1.0 200 OK"  # it had started; what it could not send is dropped
    assert "did not take the response within 0.5s" in str(aborted[0])
    assert exchange(httpd.server_address[1], REQUESTS[0]).startswith(b"HTTP/1.0 200 OK")  # and it serves on


def test_read_head_stops_at_the_blank_line_and_at_the_cap():
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody")
        assert metrics_http.read_head(a, time.monotonic() + 10) == b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"
        b.sendall(b"GET / HTTP/1.1\r\nA: b\r\n")
        b.sendall(b"\r")
        b.sendall(b"\n")
        assert metrics_http.read_head(a, time.monotonic() + 10).endswith(b"A: b\r\n\r\n")
        b.sendall(b"x" * 100)
        with pytest.raises(metrics_http.HeadTooLarge):
            metrics_http.read_head(a, time.monotonic() + 10, limit=64)
        assert metrics_http.read_head(a, time.monotonic() + 0.2) is None  # nothing more came: the deadline
        b.shutdown(socket.SHUT_WR)
        assert metrics_http.read_head(a, time.monotonic() + 10) is None  # closed before a whole head


def test_shutdown_stops_listening_without_waiting_for_a_connection(served, monkeypatch):
    monkeypatch.setattr(metrics_http, "HEAD_TIMEOUT_S", 120.0)
    httpd = served()
    port = httpd.server_address[1]
    assert exchange(port, REQUESTS[0]).startswith(b"HTTP/1.0 200 OK")
    _wait(lambda: _connection_threads(httpd) == 0, "the answered connection's thread to end")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as idle:
        _wait(lambda: _connection_threads(httpd) == 1, "the idle connection's thread")
        httpd.shutdown()
        httpd.server_close()  # returns while the connection's (daemon) thread still waits for its head
        (thread,) = _threads_of(httpd)
        assert thread.daemon
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10)
        assert not [t for t in threading.enumerate() if t.name == "lossd-metrics-http"]
        idle.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")  # a request already accepted is still answered
        assert read_to_close(idle).startswith(b"HTTP/1.0 200 OK")
