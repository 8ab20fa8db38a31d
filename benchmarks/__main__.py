"""``python -m benchmarks [--quick] [--skip-small] [--skip-large] [--skip-workers] [--skip-cold] [--skip-compare] [--device cpu|cuda] [--out PATH]``: one run.

Small requests, every workload through every configuration back to back (same run, same data):
(a) in-process torch, (F) the floor (benchmarks.floor_server: a bare grpc.aio server that receives
the bytes and answers an empty message), (b) the naive unbatched gRPC server, (c) lossd with
batching off, (d) lossd with batching on (unary), (e) lossd evaluate_many. Unary rows send the same
pre-serialised request bytes to every server. Each row: req/s, p50/p99 latency, server CPU per call
(utime + stime of the server process from /proc/PID/stat over the cell), client CPU per call
(time.process_time() of this process over the cell), and ratios to the floor and to the naive
server. Then a bounded soak of small requests reporting the server's RSS after warm-up and at the end.

Large requests (benchmarks.large): one 2048x32000 request in fp32 and bf16 through in-process torch,
the in-process lossd engine, the floor's client-streaming sink, the naive unary gRPC server, lossd
streaming and lossd shared memory; printed, stored in the same JSON and plotted to a PNG next to it.

Workers (benchmarks.workers): ``--workers N`` for each N of ``--workers-list`` (default 1,2): small-call
throughput from several client processes with 4 x N connections each (unary and evaluate_many), each
worker's share, and one 262 MB request over one stream and over N parallel streams.

Cold start (benchmarks.cold_start): Popen of ``python -m lossd_server --port 0 --metrics-port 0`` to
the first health check answering SERVING, best and median of ``--cold-starts``; the floor server's
start to its first answered call for reference.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time

import torch

from . import chart, cold_start, compare, drivers, large, servers, workers, workloads
from .report import Row, add_ratios, table, write_json
from .workloads import Workload

HERE = os.path.dirname(os.path.abspath(__file__))
A, F, B, C, D, E = (
    "(a) in-process F.*",
    "(F) floor: bare grpc.aio",
    "(b) naive gRPC (thread pool)",
    "(c) lossd batching off",
    "(d) lossd batching on, unary",
    "(e) lossd evaluate_many",
)


def build_workloads() -> list[Workload]:
    uniform = workloads.uniform()
    return [
        Workload("64x1000 fp32, 1 in flight", uniform, 1),
        Workload("64x1000 fp32, 16 in flight", uniform, 16),
        Workload("64x1000 fp32, 64 in flight", uniform, 64),
        Workload("mixed, 64 in flight", workloads.mixed(), 64),
    ]


def batch_figures(before: dict[str, float], after: dict[str, float]) -> dict:
    batches = after.get("lossd_batch_requests_count", 0) - before.get("lossd_batch_requests_count", 0)
    if batches <= 0:
        return {}
    reqs = after["lossd_batch_requests_sum"] - before.get("lossd_batch_requests_sum", 0)
    rows = after["lossd_batch_rows_sum"] - before.get("lossd_batch_rows_sum", 0)
    return {"batches": int(batches), "batch_requests_mean": reqs / batches, "batch_rows_mean": rows / batches}


def warm(server: servers.Server, ws: list[Workload]) -> None:
    for w in ws:
        drivers.unary(server.address, w, 8, 1.0, 200)


def run_cell(server: servers.Server, w: Workload, config: str, how: str, duration: float, max_count: int) -> Row:
    """One (workload, configuration) cell, bounded by ``duration`` and ``max_count``, with the server's CPU over it."""
    before = server.metrics()
    driver = drivers.stream if how == "stream" else drivers.unary
    m = driver(server.address, w, w.in_flight, duration, max_count, server.cpu_s)
    extra = batch_figures(before, server.metrics())
    srv = f"{m.server_cpu_us:6.0f}" if m.server_cpu_us is not None else "     -"
    print(f"  {config:<30} {w.name:<26} {m.req_per_s:8.0f} req/s  server {srv} us/call  client {m.client_cpu_us:6.0f} us/call", file=sys.stderr, flush=True)
    return Row.of(w.name, config, w.in_flight, m, server_peak_rss_mib=server.peak_rss_mib(), **extra)


def soak(server: servers.Server, count: int, warmup: int) -> dict:
    w = Workload("soak: 8x100 fp32", workloads.small(), 64)
    drivers.stream(server.address, w, 64, 600.0, warmup)
    rss_warm = server.rss_mib()
    m = drivers.stream(server.address, w, 64, 600.0, count)
    return {
        "requests": warmup + m.count,
        "errors": m.errors,
        "req_per_s": m.req_per_s,
        "rss_after_warmup_mib": rss_warm,
        "rss_end_mib": server.rss_mib(),
        "peak_rss_mib": server.peak_rss_mib(),
    }


def small_section(args: argparse.Namespace, ws: list[Workload], duration: float, max_count: int) -> tuple[list[Row], dict]:
    rows: list[Row] = []
    print("(a) in-process", file=sys.stderr, flush=True)
    for w in ws:
        rows.append(Row.of(w.name, A, 1, drivers.in_process(w, duration, max_count, args.device)))
    with contextlib.ExitStack() as stack:
        floor = stack.enter_context(servers.start_floor())
        naive = stack.enter_context(servers.start_naive(args.device))
        off = stack.enter_context(servers.start_lossd("--max-wait-ms", "0", device=args.device, name="lossd-off"))
        on = stack.enter_context(servers.start_lossd("--max-wait-ms", args.max_wait_ms, device=args.device, name="lossd-on"))
        for server in (floor, naive, off, on):
            warm(server, ws)
        # Every configuration of a workload runs back to back (five cells, seconds apart), so the
        # ratios of one workload see the same load from whatever else shares this machine.
        cells = ((F, floor, "unary"), (B, naive, "unary"), (C, off, "unary"), (D, on, "unary"), (E, on, "stream"))
        for w in ws:
            print(w.name, file=sys.stderr, flush=True)
            for config, server, how in cells:
                rows.append(run_cell(server, w, config, how, duration, max_count))
    with servers.start_lossd("--max-wait-ms", args.max_wait_ms, device=args.device, name="lossd-soak") as soaked:
        print("soak", file=sys.stderr, flush=True)
        soak_figures = soak(soaked, args.soak, 2000)
    order = {w.name: i for i, w in enumerate(ws)}
    configs = {c: i for i, c in enumerate((A, F, B, C, D, E))}
    rows.sort(key=lambda r: (order[r.workload], configs[r.config]))
    add_ratios(rows, floor=F, naive=B)
    return rows, soak_figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="shorter cells (about 1 s each) and a shorter soak")
    p.add_argument("--device", default="cpu", help="device for the servers and the in-process baseline (cpu, cuda)")
    p.add_argument("--duration", type=float, default=None, help="seconds per cell (default 4, --quick 1)")
    p.add_argument("--max-wait-ms", default="2", help="lossd --max-wait-ms for the batching configurations")
    p.add_argument("--soak", type=int, default=20000, help="requests in the soak after warm-up")
    p.add_argument("--skip-small", action="store_true", help="leave out the small-request section and the soak")
    p.add_argument("--skip-large", action="store_true", help="leave out the large-request section")
    p.add_argument("--skip-workers", action="store_true", help="leave out the worker-process section")
    workers.add_arguments(p)
    p.add_argument("--skip-cold", action="store_true", help="leave out the cold-start section")
    p.add_argument("--skip-compare", action="store_true", help="leave out comparing two 2048x32000 bf16 logit sets (benchmarks.compare)")
    p.add_argument("--cold-starts", type=int, default=5, help="starts of lossd (and of the floor) in the cold-start section")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per large-request cell, best kept (default 3, --quick 1)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    p.add_argument("--png", default=None, help="large-request chart (default: --out with .png)")
    args = p.parse_args(argv)
    duration = args.duration or (1.0 if args.quick else 4.0)
    max_count = 200_000
    started = time.perf_counter()
    ws = build_workloads()
    rows: list[Row] = []
    sections: dict = {}

    threads = max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)  # the same intra-op threads as lossd and the naive server use
    if not args.skip_small:
        rows, sections["soak"] = small_section(args, ws, duration, max_count)
    if not args.skip_large:
        print("large requests", file=sys.stderr, flush=True)
        args.repeats = args.repeats or (1 if args.quick else 3)
        sections["large"] = large.run(args)
    if not args.skip_workers:
        print("worker processes", file=sys.stderr, flush=True)
        sections["workers"] = workers.run(workers.defaults(argparse.Namespace(**vars(args)), duration, 1 if args.quick else 3))
    if not args.skip_cold:
        print("cold start", file=sys.stderr, flush=True)
        sections["cold_start"] = cold_start.run(args.cold_starts, args.device)
    if not args.skip_compare:
        print("comparing two models", file=sys.stderr, flush=True)
        sections["compare"] = compare.run(args)

    if rows:
        print(
            "small requests (same run, same pre-serialised bytes to every unary server; srv/cli us/call: CPU of the server "
            "process (/proc/PID/stat) / of this client process per call; x floor, x (b): req/s ratio to (F), to (b); "
            "srv CPU x floor: server CPU per call / (F)'s)"
        )
        print(table(rows))
        soak_figures = sections["soak"]
        print(
            f"\nsoak: {soak_figures['requests']} requests (8x100 fp32, evaluate_many window 64), "
            f"{soak_figures['req_per_s']:.0f} req/s, errors {soak_figures['errors']}; server RSS after warm-up "
            f"{soak_figures['rss_after_warmup_mib']:.1f} MiB, at the end {soak_figures['rss_end_mib']:.1f} MiB "
            f"(peak {soak_figures['peak_rss_mib']:.1f} MiB)"
        )
    machine = chart.machine_line(torch.__version__, args.device)
    png = None
    if "large" in sections:
        print(
            f"\nlarge requests (reduction='none', best of {args.repeats}; x torch, x floor: throughput / in-process F.cross_entropy's, "
            "/ the floor's (same bytes in 1 MiB chunks to a grpc.aio sink), same dtype)"
        )
        print(large.table(sections["large"]))
        png = args.png or os.path.splitext(args.out)[0] + ".png"
        chart.plot_large(sections["large"], png, machine)
    if "workers" in sections:
        print(workers.report(sections["workers"], workers.defaults(argparse.Namespace(**vars(args)), duration, 1)))
    if "cold_start" in sections:
        print(f"\ncold start (Popen to ready, {args.cold_starts} starts each)")
        print(cold_start.table(sections["cold_start"]))
    if "compare" in sections:
        print(f"\ncomparing two models end to end (best of {sections['compare']['repeats']}; x floor: the floor's seconds / the row's)")
        print(compare.table(sections["compare"]))
    meta = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "cpu": chart.cpu_model(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "duration_per_cell_s": duration,
        "max_wait_ms": args.max_wait_ms,
        "total_s": time.perf_counter() - started,
        "finished_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "notes": "(a) runs one call after another in every workload (no concurrency); "
        "every workload runs (F), (b), (c), (d), (e) back to back against four servers started together; "
        "unary rows send the same pre-serialised bytes through a raw channel.unary_unary; "
        "server_cpu_us: utime+stime of the server process from /proc/PID/stat over the cell / calls answered; "
        "client_cpu_us: time.process_time() of the benchmark process over the cell / calls answered; "
        "batch req/rows: mean executed batch size from the server's /metrics over the cell; "
        "peak RSS: VmHWM of the server process at the end of the cell (lifetime peak); ratio_to_floor / ratio_to_naive: req/s ratio to "
        "(F) / (b) of the same workload; server_cpu_ratio_to_floor: server CPU per call / (F)'s; "
        "large: see benchmarks/large.py (peak memory above idle counts mapped shared-memory pages of the shm path; "
        "ratio_to_floor: throughput / the floor row's of the same dtype); workers: see benchmarks/workers.py; "
        "cold_start: see benchmarks/cold_start.py",
    }
    write_json(args.out, meta, rows, sections)
    print(f"\nwritten to {os.path.relpath(args.out)}{' and ' + os.path.relpath(png) if png else ''} in {meta['total_s']:.0f} s")


if __name__ == "__main__":
    main()
