"""Comparing two models: two 2048x32000 bf16 logit sets (131 MB each) and their tokens, end to end,
as a ratio to the floor of moving both tensors.

Same data, same run, one row each:

- floor: the comparison exactly as ``lossd_client`` streams it (``lossd_client.compare.payloads``: a
  CompareHeader with the tokens, then 1 MiB messages carrying the same rows of both models) to
  benchmarks.floor_server's CompareChunked sink, which reads every message and computes nothing;
- lossd: ``LossClient.compare(reference, candidate, tokens)`` against a lossd server (CompareChunked,
  chosen by the client), with the per-token arrays and the llama.cpp summary back;
- in-process engine: ``lossd_server.engine.comparison`` on the same tensors in this process, no
  transport: what the computation alone costs here.

Seconds are the best of ``--repeats``; GB/s is both tensors' bytes over it; ``x floor`` is the
floor's seconds over the row's (1.0: as fast as moving the bytes). Server peak memory above idle as
in benchmarks.large (VmHWM reset after a small warm-up call).

    python -m benchmarks.compare [--repeats 3] [--device cpu] [--rows 2048] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import grpc
import torch
from lossd_client import LossClient, compare
from lossd_client.channel import channel_options

from . import servers
from .large import _best, _server_cell

ROWS, VOCAB = 2048, 32000
FLOOR = "floor: both tensors in 1 MiB chunks to a grpc.aio sink"
LOSSD = "lossd client.compare (CompareChunked)"
ENGINE = "in-process lossd engine (no transport)"


def data(rows: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 reference logits, a candidate near them (as a quantized copy would be), and tokens."""
    gen = torch.Generator().manual_seed(0)
    reference = (torch.randn(rows, vocab, generator=gen) * 3).to(torch.bfloat16)
    candidate = (reference.float() + 0.05 * torch.randn(rows, vocab, generator=gen)).to(torch.bfloat16)
    return reference, candidate, torch.randint(0, vocab, (rows,), generator=gen)


def _floor_call(channel: grpc.Channel, inputs: compare.CompareInputs) -> Callable[[], int]:
    call = channel.stream_unary("/lossd.v1.LossService/CompareChunked", request_serializer=None, response_deserializer=None)
    return lambda: len(call(compare.payloads(inputs), timeout=600))


def _engine_seconds(inputs: compare.CompareInputs, repeats: int, device: str) -> float:
    from lossd_server.engine import comparison

    ref, cand = inputs.reference, inputs.candidate
    plan = comparison.plan_comparison(ref.shape, ref.dtype, cand.shape, cand.dtype, inputs.tokens)
    seconds, _ = _best(lambda: plan.evaluate(ref, cand, device=torch.device(device)), repeats)
    return seconds


def run(args: argparse.Namespace, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """The comparison section: floor, lossd and in-process engine rows (see the module docstring)."""
    repeats = getattr(args, "repeats", None) or 3
    device = getattr(args, "device", "cpu")
    rows, vocab = getattr(args, "rows", ROWS), getattr(args, "vocab", VOCAB)
    reference, candidate, tokens = data(rows, vocab)
    inputs = compare.CompareInputs(reference, candidate, tokens)
    warm = compare.CompareInputs(reference[:64], candidate[:64], tokens[:64])
    nbytes = 2 * reference.numel() * reference.element_size()
    cells = {}
    with servers.start_floor() as floor, grpc.insecure_channel(floor.address, options=channel_options(-1, 5)) as channel:
        cells[FLOOR] = _server_cell(floor, _floor_call(channel, inputs), _floor_call(channel, warm), nbytes, repeats)
    log(f"  compare {FLOOR}: {cells[FLOOR]['seconds']:.3f} s")
    with servers.start_lossd(device=device) as lossd, LossClient(lossd.address, timeout_s=600) as client:
        summary = {}

        def call() -> None:
            summary["kld"] = client.compare(reference, candidate, tokens).summary.kld.value

        cells[LOSSD] = _server_cell(lossd, call, lambda: client.compare(reference[:64], candidate[:64], tokens[:64]), nbytes, repeats)
    log(f"  compare {LOSSD}: {cells[LOSSD]['seconds']:.3f} s")
    seconds = _engine_seconds(inputs, repeats, device)
    cells[ENGINE] = {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9, "peak_above_idle_mib": None, "peak_ratio": None}
    log(f"  compare {ENGINE}: {cells[ENGINE]['seconds']:.3f} s")
    floor_s = cells[FLOOR]["seconds"]
    table_rows = [{"config": name, "bytes": nbytes, **cell, "ratio_to_floor": floor_s / cell["seconds"]} for name, cell in cells.items()]
    workload = f"{rows}x{vocab} bf16 x 2 ({nbytes / 1e6:.0f} MB) + tokens"
    return {"workload": workload, "rows": table_rows, "repeats": repeats, "mean_kld": summary.get("kld")}


def table(result: dict) -> str:
    head = f"{'path':<56} {'seconds':>8} {'GB/s':>6} {'x floor':>7} {'server peak above idle':>24}"
    lines = [result["workload"], head, "-" * len(head)]
    for r in result["rows"]:
        mem = "-" if r["peak_above_idle_mib"] is None else f"{r['peak_above_idle_mib']:.0f} MiB ({r['peak_ratio']:.2f}x input)"
        lines.append(f"{r['config']:<56} {r['seconds']:>8.3f} {r['gb_per_s']:>6.2f} {r['ratio_to_floor']:>7.2f} {mem:>24}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=ROWS)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))  # as lossd's engine (one core for gRPC and the event loop)
    started = time.perf_counter()
    result = run(args)
    print(table(result))
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
