"""Worker processes on one host: throughput of ``lossd-server --workers N`` for each N of ``--workers-list``.

For each N one server runs with ``--workers N`` and gets, back to back:

- small calls: 64x1000 fp32 class-index requests (the small section's uniform pool), pre-serialised,
  as unary Evaluate calls from ``--clients`` client processes (spawned, started together), each with
  ``--connections-per-worker`` x N connections of their own (distinct subchannel pools: SO_REUSEPORT
  spreads connections, not calls, by a hash: N connections alone often leave a worker without one)
  and ``--in-flight`` calls outstanding, taken round robin over its connections; req/s over
  the span, the servers' CPU per call (utime + stime of every worker from /proc), and each worker's
  share of the calls (``lossd_worker_requests_total``);
- ``evaluate_many``: the same pool through ``AsyncLossClient(connections=...).evaluate_many`` (window 64,
  as many connections) in each client process;
- one large request: 2048x32000 fp32 (262 MB), ``reduction='none'``, through ``LossClient`` with one
  stream and with ``--connections-per-worker`` x N parallel streams (as many connections; the request
  is cut along its rows), best of ``--repeats``, GB/s of input.

The client processes share the host with the server: on a machine with few cores they cap what N
workers can show. ``python -m benchmarks.workers --workers-list 1,2,4,8 --clients 8`` on a larger host.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import sys
import time

from . import servers, workloads

IN_FLIGHT = 32
WINDOW = 64


# --------------------------------------------------------------------------- client processes
async def _unary_client(address: str, connections: int, in_flight: int, start_at: float, duration_s: float) -> dict:
    import grpc

    from .drivers import CHANNEL_OPTIONS, EVALUATE

    payloads = workloads.Workload("small", workloads.uniform(), in_flight).payloads
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(connections)]
    calls = [channel.unary_unary(EVALUATE) for channel in channels]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 30)
    counts = {"ok": 0, "errors": 0, "turn": 0}
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0, end = time.process_time(), time.time() + duration_s

    async def one_at_a_time() -> None:
        while time.time() < end:
            turn = counts["turn"]
            counts["turn"] += 1
            try:
                await calls[turn % connections](payloads[turn % len(payloads)], timeout=60)
                counts["ok"] += 1
            except grpc.aio.AioRpcError:
                counts["errors"] += 1

    await asyncio.gather(*(one_at_a_time() for _ in range(in_flight)))
    cpu = time.process_time() - cpu0
    for channel in channels:
        await channel.close()
    return {"ok": counts["ok"], "errors": counts["errors"], "client_cpu_s": cpu}


async def _stream_client(address: str, connections: int, window: int, start_at: float, duration_s: float) -> dict:
    from lossd_client import AsyncLossClient

    requests = workloads.uniform()
    counts = {"ok": 0, "errors": 0}
    async with AsyncLossClient(address, connections=connections, timeout_s=600, max_message_bytes=64 << 20) as client:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu0, end = time.process_time(), time.time() + duration_s

        def source():
            i = 0
            while time.time() < end:
                yield requests[i % len(requests)]
                i += 1

        async for result in client.evaluate_many(source(), window=window, return_exceptions=True):
            counts["errors" if isinstance(result, Exception) else "ok"] += 1
        cpu = time.process_time() - cpu0
    return {**counts, "client_cpu_s": cpu}


def client_process(how: str, address: str, connections: int, load: int, start_at: float, duration_s: float) -> dict:
    """One client process's cell (runs in a spawned process)."""
    run = _unary_client if how == "unary" else _stream_client
    return asyncio.run(run(address, connections, load, start_at, duration_s))


# --------------------------------------------------------------------------- one server
def _worker_pids(server: servers.Server) -> list[int]:
    return list(server.worker_pids().values()) or [server.proc.pid]  # --workers 1: the server itself


def _shares(before: dict[str, float], after: dict[str, float], method: str) -> list[float]:
    prefix = f'lossd_worker_requests_total{{method="{method}",worker="'
    counts = [after[k] - before.get(k, 0.0) for k in sorted(after) if k.startswith(prefix)]
    total = sum(counts)
    return [c / total for c in counts] if total else []


def small_cell(pool: concurrent.futures.Executor, server: servers.Server, how: str, args: argparse.Namespace, workers: int) -> dict:
    """Every client process at once against ``server``; req/s, CPU per call, each worker's share."""
    load = args.in_flight if how == "unary" else WINDOW
    pids = _worker_pids(server)
    start_at = time.time() + 3.0  # after every client process has connected
    connections = workers * args.connections_per_worker
    jobs = [pool.submit(client_process, how, server.address, connections, load, start_at, args.duration) for _ in range(args.clients)]
    time.sleep(max(0.0, start_at - time.time()))
    before, cpu0 = server.metrics(), sum(servers.cpu_seconds(p) for p in pids)
    results = [job.result(timeout=args.duration + 120) for job in jobs]
    server_cpu = sum(servers.cpu_seconds(p) for p in pids) - cpu0
    ok, errors = sum(r["ok"] for r in results), sum(r["errors"] for r in results)
    calls = max(1, ok + errors)
    return {
        "req_per_s": ok / args.duration,
        "errors": errors,
        "server_cpu_us": server_cpu / calls * 1e6,
        "client_cpu_us": sum(r["client_cpu_s"] for r in results) / calls * 1e6,
        # unary calls answered by each worker (evaluate_many: its streams, one per connection)
        "worker_shares": _shares(before, server.metrics(), "Evaluate" if how == "unary" else "EvaluatePacked"),
    }


def large_cell(address: str, streams: int, repeats: int) -> dict:
    """One 262 MB request through LossClient over ``streams`` parallel streams (best of ``repeats``)."""
    import torch
    from lossd_client import LossClient

    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2048, 32000, generator=gen), torch.randint(0, 32000, (2048,), generator=gen)
    best = float("inf")
    with LossClient(address, connections=streams, timeout_s=600) as client:
        client.cross_entropy(x[:64], t[:64], reduction="none")  # connections, server limit, warm paths
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.cross_entropy(x, t, reduction="none")
            best = min(best, time.perf_counter() - t0)
    return {"streams": streams, "seconds": best, "gb_per_s": x.numel() * 4 / best / 1e9}


def run(args: argparse.Namespace) -> list[dict]:
    """The worker table: one row per N of ``args.workers_list``."""
    rows = []
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.clients, mp_context=ctx) as pool:
        for n in args.workers_list:
            print(f"  --workers {n}", file=sys.stderr, flush=True)
            with servers.start_lossd("--workers", str(n), device=args.device, name=f"lossd-workers-{n}") as server:
                small_cell(pool, server, "unary", argparse.Namespace(**{**vars(args), "duration": 1.0}), n)  # warm every worker
                row = {"workers": n, "unary": small_cell(pool, server, "unary", args, n)}
                row["evaluate_many"] = small_cell(pool, server, "stream", args, n)
                row["large"] = [large_cell(server.address, k, args.repeats) for k in (1, n * args.connections_per_worker)]
            print(f"    {_line(row)}", file=sys.stderr, flush=True)
            rows.append(row)
    base = rows[0]
    for row in rows:
        for how in ("unary", "evaluate_many"):
            row[how]["x_first"] = row[how]["req_per_s"] / base[how]["req_per_s"] if base[how]["req_per_s"] else None
        row["large_x_one_stream"] = row["large"][-1]["gb_per_s"] / row["large"][0]["gb_per_s"]
    return rows


def _line(row: dict) -> str:
    large = " / ".join(f"{cell['gb_per_s']:.2f}" for cell in row["large"])
    return f"unary {row['unary']['req_per_s']:.0f} req/s, evaluate_many {row['evaluate_many']['req_per_s']:.0f} req/s, large {large} GB/s"


def table(rows: list[dict]) -> str:
    head = (
        f"{'workers':>7} {'unary req/s':>11} {'x first':>7} {'srv us/call':>11} {'worker shares':>15} "
        f"{'ev_many req/s':>13} {'x first':>7} {'large 1 stream':>14} {'large k streams':>15} {'k':>3} {'x 1 stream':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        u, e = r["unary"], r["evaluate_many"]
        shares = "/".join(f"{s:.2f}" for s in u["worker_shares"]) or "-"
        one, many = r["large"][0], r["large"][-1]
        lines.append(
            f"{r['workers']:>7} {u['req_per_s']:>11.0f} {u['x_first']:>7.2f} {u['server_cpu_us']:>11.0f} {shares:>15} "
            f"{e['req_per_s']:>13.0f} {e['x_first']:>7.2f} {one['gb_per_s']:>9.2f} GB/s {many['gb_per_s']:>10.2f} GB/s "
            f"{many['streams']:>3} {r['large_x_one_stream']:>10.2f}"
        )
    return "\n".join(lines)


def report(rows: list[dict], args: argparse.Namespace) -> str:
    """The table with its legend, as ``make bench`` prints it."""
    legend = (
        f"\nworker processes (--workers N; {args.clients} client processes on this host, {args.connections_per_worker} x N connections "
        f"each, unary {args.in_flight} in flight each / evaluate_many window {WINDOW}; x first: req/s / the first row's; "
        "srv us/call: CPU of every worker per call; shares: unary calls per worker; large: one 2048x32000 fp32 request, "
        "reduction='none', best of the repeats, over 1 and over k parallel streams)"
    )
    return legend + "\n" + table(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers-list", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2], help="worker counts (default 1,2)")
    p.add_argument("--clients", type=int, default=None, help="client processes for the small calls (default: CPUs // 2, 1..8)")
    p.add_argument("--in-flight", type=int, default=IN_FLIGHT, help="unary calls outstanding per client process")
    p.add_argument("--connections-per-worker", type=int, default=4, help="connections per client process and worker")


def defaults(args: argparse.Namespace, duration: float, repeats: int) -> argparse.Namespace:
    """The worker section's settings from the command line (shared with ``python -m benchmarks``)."""
    args.clients = args.clients or max(1, min(8, (os.cpu_count() or 2) // 2))
    args.duration, args.repeats = duration, repeats
    return args


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__)
    add_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per small-call cell")
    p.add_argument("--repeats", type=int, default=3, help="timed large requests per cell, best kept")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = run(defaults(args, args.duration, args.repeats))
    print(report(rows, args))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
