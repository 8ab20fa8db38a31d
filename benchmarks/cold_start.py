"""Cold start: process start to the first answered health check reporting SERVING.

For each of ``starts`` starts: ``subprocess.Popen`` of ``python -m lossd_server --port 0
--metrics-port 0`` (plus ``--device``), read the port from its log line ``listening on
HOST:PORT``, then call ``grpc.health.v1.Health/Check`` every 20 ms with a short deadline until it
answers SERVING; the time is measured from just before Popen. The floor server
(benchmarks.floor_server) is timed the same way to its first answered ``Evaluate`` call: the cost
of starting Python and grpc alone, for reference. Best and median of the starts are reported,
with the time to the ``listening`` log line (port bound) alongside.

    python -m benchmarks.cold_start [--starts 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import servers

POLL_S = 0.020
DEADLINE_S = 0.25
GIVE_UP_S = 120.0
LISTEN = re.compile(r"listening on [^ ]+:(\d+)")
# No reconnect backoff beyond the poll interval: a refused connection must not delay the next poll.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 20),
]


def lossd_command(device: str) -> list[str]:
    return [sys.executable, "-m", "lossd_server", "--port", "0", "--metrics-port", "0", "--device", device]


def floor_command() -> list[str]:
    return [sys.executable, "-m", "benchmarks.floor_server", "--port", "0"]


def _health_serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE_S)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _floor_answers(channel: grpc.Channel) -> bool:
    channel.unary_unary("/lossd.v1.LossService/Evaluate")(b"", timeout=DEADLINE_S)
    return True


def time_one(cmd: list[str], ready: Callable[[grpc.Channel], bool]) -> dict:
    """One start: seconds from Popen to the listening log line and to ``ready`` answering True."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=servers.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    lines: list[str] = []
    port: dict[str, float] = {}
    bound = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=servers.ROOT)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = LISTEN.search(line)
            if m and not bound.is_set():
                port["at"] = time.perf_counter() - t0
                port["port"] = int(m.group(1))
                bound.set()
        bound.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not bound.wait(GIVE_UP_S) or "port" not in port:
            raise RuntimeError(f"{' '.join(cmd)}: no 'listening on' line (rc={proc.poll()}):\n{''.join(lines)}")
        polls = 0
        with grpc.insecure_channel(f"127.0.0.1:{int(port['port'])}", options=CHANNEL_OPTIONS) as channel:
            while True:
                polls += 1
                tick = time.perf_counter()
                try:
                    if ready(channel):
                        break
                except grpc.RpcError:
                    pass
                if proc.poll() is not None or tick - t0 > GIVE_UP_S:
                    raise RuntimeError(f"{' '.join(cmd)}: not ready after {tick - t0:.1f} s (rc={proc.poll()}):\n{''.join(lines)}")
                time.sleep(max(0.0, POLL_S - (time.perf_counter() - tick)))
        seconds = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    return {"seconds": seconds, "listening_s": port["at"], "polls": polls}


def _summary(command: list[str], ready_when: str, starts: list[dict]) -> dict:
    secs = [s["seconds"] for s in starts]
    return {
        "command": " ".join(["python", *command[1:]]),
        "ready_when": ready_when,
        "best_s": min(secs),
        "median_s": statistics.median(secs),
        "listening_median_s": statistics.median(s["listening_s"] for s in starts),
        "starts": starts,
    }


def run(starts: int = 5, device: str = "cpu", log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Alternate lossd and floor starts (so both see the same machine), ``starts`` of each."""
    lossd, floor = [], []
    for i in range(starts):
        lossd.append(time_one(lossd_command(device), _health_serving))
        floor.append(time_one(floor_command(), _floor_answers))
        log(f"  start {i + 1}/{starts}: lossd {lossd[-1]['seconds']:.3f} s (listening {lossd[-1]['listening_s']:.3f} s), floor {floor[-1]['seconds']:.3f} s")
    return {
        "poll_interval_s": POLL_S,
        "poll_deadline_s": DEADLINE_S,
        "lossd": _summary(lossd_command(device), "grpc.health.v1 Check(service='') answers SERVING", lossd),
        "floor": _summary(floor_command(), "first Evaluate call answered", floor),
    }


def table(result: dict) -> str:
    head = f"{'server':<8} {'ready when':<50} {'best s':>7} {'median s':>8} {'listening s (median)':>20}  each start, s"
    lines = [head, "-" * len(head)]
    for name in ("lossd", "floor"):
        r = result[name]
        each = " ".join(f"{s['seconds']:.2f}" for s in r["starts"])
        lines.append(f"{name:<8} {r['ready_when']:<50} {r['best_s']:>7.3f} {r['median_s']:>8.3f} {r['listening_median_s']:>20.3f}  {each}")
    lines.append(f"lossd: {result['lossd']['command']}; health polled every {result['poll_interval_s'] * 1000:.0f} ms, deadline {result['poll_deadline_s'] * 1000:.0f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cold_start", description=__doc__.splitlines()[0])
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    result = run(args.starts, args.device)
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
