"""A client that opens HTTP/2 streams and resets them at once (rapid reset) on one path does not get
the calls of other paths refused. lossd's methods and the health checks are registered methods, which
gRPC core queues apart; behind one generic handler every path shared one queue, and 85,000 resets a
second on Evaluate or on an unknown path got 22 of 26 health checks (and 3 of 11 Evaluate calls)
answered CANCELLED by gRPC before lossd saw them. The flood is written as raw HTTP/2 frames (a few
bytes each: no HTTP/2 library needed), from one connection, for 3 s.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lossd_client import LossClient
from lossd_client.errors import LossdError
from serverproc import start_server

FLOOD_S = 3.0
HEADERS, RST_STREAM, SETTINGS = 0x1, 0x3, 0x4
END_HEADERS, CANCEL = 0x4, 0x8


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def header_block(path: str, authority: str) -> bytes:
    """HPACK literals without indexing or Huffman coding (every name and value under 127 bytes)."""
    fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    return b"".join(b"\x00" + bytes([len(n)]) + n.encode() + bytes([len(v)]) + v.encode() for n, v in fields)


def rapid_reset(address: str, path: str, seconds: float) -> int:
    """Streams opened and reset at once on one connection for ``seconds``; how many."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    done = threading.Event()

    def drain() -> None:  # the server's frames are read and dropped, so that its writes never block
        sock.settimeout(0.5)
        while not done.is_set():
            try:
                if not sock.recv(1 << 16):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    block = header_block(path, address)
    sent, stream = 0, 1
    try:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0))
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            batch = []
            for _ in range(200):
                batch.append(frame(HEADERS, END_HEADERS, stream, block) + frame(RST_STREAM, 0, stream, struct.pack(">I", CANCEL)))
                stream += 2
            try:
                sock.sendall(b"".join(batch))
            except OSError:  # the server closed the connection: that ends the flood too
                break
            sent += len(batch)
    finally:
        done.set()
        sock.close()
        reader.join(5)
    return sent


def checks_during_flood(server, path: str, check) -> tuple[int, list[str]]:
    """``check()`` every 0.1 s while ``path`` is flooded: the flood's size and the outcomes."""
    outcomes: list[str] = []
    flooding = threading.Event()
    flooding.set()

    def probe() -> None:
        while flooding.is_set():
            outcomes.append(check())
            time.sleep(0.1)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        sent = rapid_reset(server.address, path, FLOOD_S)
    finally:
        flooding.clear()
        prober.join(30)
    return sent, outcomes


@pytest.fixture(scope="module")
def server():
    proc = start_server()
    yield proc
    proc.stop()


@pytest.mark.parametrize("path", ["/lossd.v1.LossService/Evaluate", "/no.Such/Method"])
def test_health_checks_are_answered_while_another_path_is_flooded_with_reset_streams(server, path):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def check() -> str:
            try:
                return health_pb2.HealthCheckResponse.ServingStatus.Name(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
            except grpc.RpcError as exc:
                return exc.code().name

        assert check() == "SERVING"
        sent, outcomes = checks_during_flood(server, path, check)
    assert sent > 10_000
    assert outcomes and set(outcomes) == {"SERVING"}, (sent, outcomes)


def test_evaluate_calls_are_answered_while_an_unknown_path_is_flooded_with_reset_streams(server):
    x, t = np.random.default_rng(0).standard_normal((8, 100), dtype=np.float32), np.arange(8)
    with LossClient(server.address, timeout_s=5) as client:
        expected = client.cross_entropy(x, t)

        def check() -> str:
            try:
                return "same" if client.cross_entropy(x, t) == expected else "different"
            except LossdError as exc:
                return type(exc).__name__

        sent, outcomes = checks_during_flood(server, "/no.Such/Method", check)
    assert sent > 10_000
    assert outcomes and set(outcomes) == {"same"}, (sent, outcomes)
