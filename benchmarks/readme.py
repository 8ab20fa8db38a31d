"""The README's benchmark figures, rendered from one ``make bench`` run's JSON.

``python -m benchmarks.readme [RESULTS]`` (default ``benchmarks/results/latest.json``, the run
``make bench`` just wrote) copies that run's JSON and chart to ``docs/bench-cpu.json`` and
``docs/bench-cpu.png`` and rewrites the README between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` from it, so that every figure there comes from the one run whose JSON is
committed beside it. ``--check`` only compares: exit 1 when the README's block is not what
``docs/bench-cpu.json`` renders to (the test suite runs it, so the figures cannot drift from
their run by hand edits).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS_JSON = ROOT / "docs" / "bench-cpu.json"
DOCS_PNG = ROOT / "docs" / "bench-cpu.png"
BEGIN = "<!-- bench:begin: rendered by `python -m benchmarks.readme` from docs/bench-cpu.json; edits here are overwritten -->"
END = "<!-- bench:end -->"

FLOOR, NAIVE = "(F) floor: bare grpc.aio", "(b) naive gRPC (thread pool)"
OFF, ON, MANY = "(c) lossd batching off", "(d) lossd batching on, unary", "(e) lossd evaluate_many"
SMALL_WORKLOADS = ("64x1000 fp32, 1 in flight", "64x1000 fp32, 16 in flight", "64x1000 fp32, 64 in flight", "mixed, 64 in flight")
LARGE_PATHS = (
    ("in-process F.cross_entropy", "in-process `F.cross_entropy`"),
    ("in-process lossd engine", "in-process lossd engine"),
    ("floor: 1 MiB chunks to a grpc.aio sink", "floor: 1 MiB chunks to a `grpc.aio` sink"),
    ("naive unary gRPC", "naive unary gRPC"),
    ("lossd streaming (EvaluateChunked)", "lossd streaming (`EvaluateChunked`, automatic)"),
    ("lossd shared memory", "lossd same-host shared memory"),
)


def _small(rows: list[dict], workload: str, config: str) -> dict | None:
    return next((r for r in rows if r["workload"] == workload and r["config"] == config), None)


def _large(result: dict, dtype: str, config: str) -> dict | None:
    return next((r for r in result["rows"] if r["dtype"] == dtype and r["config"] == config), None)


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_head(*columns: str) -> list[str]:
    """A markdown table's header row and separator."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def header(meta: dict) -> str:
    when = meta.get("finished_utc", "date not recorded")
    return (
        f"Figures below: one `{meta['command']}` run ({when}, {meta['total_s']:.0f} s), {meta['cpu']}, {meta['cpus']} cores "
        f"shared by client and server, torch {meta['torch']}, device {meta['device']}, {meta['duration_per_cell_s']:g} s per "
        "small-call cell. Its JSON is `docs/bench-cpu.json`."
    )


def large_table(result: dict) -> str:
    dtypes = ("float32", "bfloat16")
    names = {dtype: next(r["workload"] for r in result["rows"] if r["dtype"] == dtype).rsplit("(", 1)[-1].rstrip(")") for dtype in dtypes}
    lines = table_head(
        f"one 2048×32000 request, `reduction='{result['reduction']}'` (best of {result['repeats']})",
        *(
            column
            for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16"))
            for column in (f"{short} ({names[dtype]}) s", "× torch", "× floor", "peak above idle")
        ),
    )
    for config, label in LARGE_PATHS:
        cells = []
        for dtype in dtypes:
            r = _large(result, dtype, config)
            if r is None:
                cells += ["-"] * 4
                continue
            peak = "-" if r["peak_above_idle_mib"] is None else f"{r['peak_above_idle_mib']:.0f} MiB"
            cells += [f"{r['seconds']:.3f}", _x(r["ratio_to_torch"]), _x(r["ratio_to_floor"]), peak]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def small_table(rows: list[dict]) -> str:
    lines = table_head(
        "64×1000 fp32 class targets, req/s (server CPU µs per call; × floor's CPU)",
        "1 in flight",
        "16 in flight",
        "64 in flight",
        "mixed shapes/options, 64 in flight",
    )
    for config in (FLOOR, NAIVE, OFF, ON, MANY):
        cells = []
        for workload in SMALL_WORKLOADS:
            r = _small(rows, workload, config)
            if r is None:
                cells.append("-")
                continue
            cpu = "-" if r["server_cpu_us"] is None else f"{r['server_cpu_us']:.0f}"
            ratio = "" if config == FLOOR or r["server_cpu_ratio_to_floor"] is None else f"; {r['server_cpu_ratio_to_floor']:.2f}×"
            cells.append(f"{r['req_per_s']:.0f} ({cpu}{ratio})")
        lines.append(f"| {config.replace('grpc.aio', '`grpc.aio`')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _target(name: str, value: str, met: bool | None) -> str:
    return f"| {name} | {value} | {'-' if met is None else 'yes' if met else '**no**'} |"


def targets_table(run: dict) -> str:
    """The performance targets (issue 12) against this run's figures."""
    rows, large, cold = run.get("rows", []), run.get("large"), run.get("cold_start")
    lines = table_head("target", "this run", "met?")
    one = _small(rows, SMALL_WORKLOADS[0], ON)
    if one:
        naive = _small(rows, SMALL_WORKLOADS[0], NAIVE)
        lines.append(
            _target(
                "unary, 1 in flight ≥ 0.9× the naive server",
                f"{one['req_per_s']:.0f} vs {naive['req_per_s']:.0f} req/s = {one['ratio_to_naive']:.2f}×",
                one["ratio_to_naive"] >= 0.9,
            )
        )
        cpu = [_small(rows, w, ON)["server_cpu_ratio_to_floor"] for w in SMALL_WORKLOADS[:3]]
        lines.append(
            _target(
                "server CPU per unary call ≤ 1.25× the floor's (1 / 16 / 64 in flight)",
                " / ".join(f"{c:.2f}×" for c in cpu),
                max(cpu) <= 1.25,
            )
        )
        at64 = _small(rows, SMALL_WORKLOADS[2], ON)
        lines.append(_target("unary, 64 in flight ≥ 0.9× the floor", f"{at64['ratio_to_floor']:.2f}×", at64["ratio_to_floor"] >= 0.9))
        many = _small(rows, SMALL_WORKLOADS[2], MANY)
        lines.append(
            _target(
                "`evaluate_many`, 64 in flight ≥ 3× the naive server",
                f"{many['ratio_to_naive']:.2f}× ({many['ratio_to_floor']:.2f}× the floor)",
                many["ratio_to_naive"] >= 3,
            )
        )
    if large:
        for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
            r = _large(large, dtype, LARGE_PATHS[4][0])
            lines.append(_target(f"one large {short} request ≥ 0.8× the floor", f"{r['ratio_to_floor']:.2f}×", r["ratio_to_floor"] >= 0.8))
        fp32, bf16 = (_large(large, d, LARGE_PATHS[1][0]) for d in ("float32", "bfloat16"))
        lines.append(
            _target("engine ≥ 3× in-process `F.cross_entropy`, fp32", f"{fp32['ratio_to_torch']:.2f}×", fp32["ratio_to_torch"] >= 3)
        )
        slower = bf16["seconds"] / fp32["seconds"]
        lines.append(_target("bf16 engine no slower than fp32", f"{slower:.2f}× fp32's time", slower <= 1.0))
        peaks = [
            _large(large, d, c)["peak_above_idle_mib"] for d in ("float32", "bfloat16") for c in (LARGE_PATHS[4][0], LARGE_PATHS[1][0])
        ]
        lines.append(
            _target(
                "extra memory ≤ 64 MB (streaming, engine; fp32, bf16)",
                " / ".join(f"{p:.0f}" for p in peaks) + " MiB",
                max(peaks) * 2**20 <= 64e6,
            )
        )
    if cold:
        median = cold["lossd"]["median_s"]
        lines.append(
            _target(
                "cold start (process start to health SERVING) ≤ 1.5 s",
                f"median {median:.2f} s, best {cold['lossd']['best_s']:.2f} s",
                median <= 1.5,
            )
        )
    return "\n".join(lines)


def others(run: dict) -> str:
    parts = []
    soak = run.get("soak")
    if soak:
        parts.append(
            f"Soak: {soak['requests']:,} requests of 8×100 through `evaluate_many`, {soak['req_per_s']:,.0f} req/s, {soak['errors']} errors, "
            f"server RSS {soak['rss_after_warmup_mib']:.1f} MiB after warm-up and {soak['rss_end_mib']:.1f} MiB at the end."
        )
    compare = run.get("compare")
    if compare:
        by = {r["config"].split(" ")[0]: r for r in compare["rows"]}
        lossd, floor, engine = by["lossd"], by["floor:"], by["in-process"]
        parts.append(
            f"Comparing two models ({compare['workload']}, `client.compare`): {lossd['seconds']:.3f} s end to end, "
            f"{lossd['ratio_to_floor']:.2f}× the floor of moving both tensors ({floor['seconds']:.3f} s); the comparison itself "
            f"takes {engine['seconds']:.3f} s in-process."
        )
    cold = run.get("cold_start")
    if cold:
        each = ", ".join(f"{s['seconds']:.2f}" for s in cold["lossd"]["starts"])
        parts.append(
            f"Cold start (process start to health SERVING): {each} s; the floor server {cold['floor']['median_s']:.2f} s (median)."
        )
    return "\n\n".join(parts)


def workers_table(rows: list[dict]) -> str:
    lines = table_head(
        "`--workers`",
        "unary req/s (× one worker)",
        "`evaluate_many` req/s",
        "server CPU / unary call",
        "unary calls per worker",
        "262 MB request, 1 stream",
        "over k streams",
    )
    for r in rows:
        u, e = r["unary"], r["evaluate_many"]
        one, many = r["large"][0], r["large"][-1]
        shares = " / ".join(f"{s:.2f}" for s in u["worker_shares"])
        lines.append(
            f"| {r['workers']} | {u['req_per_s']:.0f} ({u['x_first']:.2f}×) | {e['req_per_s']:.0f} | {u['server_cpu_us']:.0f} µs | {shares} "
            f"| {one['gb_per_s']:.2f} GB/s | {many['gb_per_s']:.2f} GB/s (k = {many['streams']}) |"
        )
    return "\n".join(lines)


def render(run: dict) -> str:
    """The README's block for ``run`` (the JSON ``python -m benchmarks`` writes)."""
    blocks = [header(run["meta"])]
    if run.get("large"):
        blocks += ["![large-request throughput and memory per path](docs/bench-cpu.png)", large_table(run["large"])]
    if run.get("rows"):
        blocks.append(small_table(run["rows"]))
    blocks.append("Targets (issue 12) against this run:\n\n" + targets_table(run))
    if others(run):
        blocks.append(others(run))
    if run.get("workers"):
        blocks.append("Worker processes (`benchmarks/workers.py`, same run):\n\n" + workers_table(run["workers"]))
    return "\n\n".join([BEGIN, *blocks, END])


def replace_block(text: str, block: str) -> str:
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise SystemExit(f"{README.name} has no {BEGIN!r} ... {END!r} block")
    return text[:start] + block + text[stop + len(END) :]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    p.add_argument("--check", action="store_true", help="exit 1 when the README's block is not what docs/bench-cpu.json renders to")
    args = p.parse_args(argv)
    text = README.read_text()
    if args.check:
        expected = replace_block(text, render(json.loads(DOCS_JSON.read_text())))
        if expected != text:
            print(
                f"{README.name}'s benchmark figures differ from {DOCS_JSON.relative_to(ROOT)}: run python -m benchmarks.readme",
                file=sys.stderr,
            )
            return 1
        return 0
    results = pathlib.Path(args.results)
    run = json.loads(results.read_text())
    shutil.copyfile(results, DOCS_JSON)
    png = results.with_suffix(".png")
    if png.exists():
        shutil.copyfile(png, DOCS_PNG)
    README.write_text(replace_block(text, render(run)))
    print(
        f"{README.name}: figures of {results} ({run['meta'].get('finished_utc', 'date not recorded')}); copied to {DOCS_JSON.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
