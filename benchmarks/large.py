"""Large requests: one 2048x32000 cross_entropy request (262 MB in fp32, 131 MB in bf16).

Same data, same run: (a) in-process torch, (b) the naive unary gRPC server (benchmarks.naive_server's
servicer, with its message limit raised to 2 GiB so the request fits in one message), (c) lossd
(LossClient streams it through EvaluateChunked by itself). End-to-end GB/s is request input bytes
over wall time of the call (best of ``--repeats``); server peak RSS is VmHWM after the calls minus
VmHWM after one small warm-up call, on a fresh server per dtype. ``--huge-gib N`` adds one lossd
request of N GiB of bf16 logits (above protobuf's 2 GiB message ceiling).

    python -m benchmarks.large [--repeats 3] [--huge-gib 2.1] [--device cpu]
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
import torch.nn.functional as F
from lossd_client import LossClient, LossRequest
from lossd_client import requests as rq
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc

from . import servers

ROWS, CLASSES = 2048, 32000
GIB = 1 << 30


def _best(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _naive_call(address: str, x: torch.Tensor, t: torch.Tensor) -> Callable[[], float]:
    """What a generic client does: build one EvaluateRequest, one unary call."""
    opts = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
    channel = grpc.insecure_channel(address, options=opts)
    stub = pb_grpc.LossServiceStub(channel)

    def call() -> float:
        msg, _ = rq.build(LossRequest(x, t))
        reply = stub.Evaluate(msg, timeout=600)
        return float(torch.frombuffer(bytearray(reply.loss.data), dtype=torch.float32)[0])

    return call


def _server_cell(server: servers.Server, call: Callable[[], object], warm: Callable[[], object], nbytes: int, repeats: int) -> dict:
    warm()
    time.sleep(0.2)
    idle = server.status_kib("VmHWM") * 1024
    seconds, _ = _best(call, repeats)
    peak = server.status_kib("VmHWM") * 1024 - idle
    return {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9, "peak_rss_above_idle_mib": peak / 2**20, "peak_rss_ratio": peak / nbytes}


def run(args: argparse.Namespace) -> dict:
    """The large-request section: one row per (dtype, configuration); see the module docstring."""
    repeats = getattr(args, "repeats", 3)
    device = getattr(args, "device", "cpu")
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(ROWS, CLASSES, generator=gen)
    t = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = x32.to(dtype)
        nbytes = x.numel() * x.element_size()
        name = f"{ROWS}x{CLASSES} {str(dtype).removeprefix('torch.')} ({nbytes / 1e6:.0f} MB)"
        seconds, _ = _best(lambda x=x, dev=torch.device(device): float(F.cross_entropy(x.to(dev), t.to(dev))), repeats)
        rows.append({"workload": name, "config": "(a) in-process F.cross_entropy", "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9})
        if dtype == torch.float32:  # the naive servicer answers through numpy, which has no bfloat16
            with _start_naive(device) as naive:
                cell = _server_cell(naive, _naive_call(naive.address, x, t), _naive_call(naive.address, x[:8], t[:8]), nbytes, repeats)
                rows.append({"workload": name, "config": "(b) naive unary gRPC", **cell})
        with servers.start_lossd(device=device) as lossd, LossClient(lossd.address, timeout_s=600) as client:
            cell = _server_cell(lossd, lambda x=x: client.cross_entropy(x, t), lambda x=x: client.cross_entropy(x[:8], t[:8]), nbytes, repeats)
            rows.append({"workload": name, "config": "(c) lossd (EvaluateChunked)", **cell})
    huge = None
    if getattr(args, "huge_gib", 0):
        huge = _huge(args.huge_gib, device)
    return {"rows": rows, "huge": huge}


def _huge(gib: float, device: str) -> dict:
    """One bf16 (B, T, V) request of ``gib`` GiB through lossd, checked against torch per sequence."""
    vocab, seq = 32000, 1024
    batch = max(1, int(gib * GIB / (seq * vocab * 2)) + 1)
    logits = torch.empty(batch, seq, vocab, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    block = torch.randn(seq, vocab, generator=gen).to(torch.bfloat16)
    for b in range(batch):
        logits[b] = block.roll(b, 0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
    nbytes = logits.numel() * 2
    with servers.start_lossd(device=device) as lossd, LossClient(lossd.address, timeout_s=3600) as client:
        client.perplexity(logits[:1, :8], tokens[:1, :8])
        idle = lossd.status_kib("VmHWM") * 1024
        t0 = time.perf_counter()
        result = client.perplexity(logits, tokens)
        seconds = time.perf_counter() - t0
        peak = lossd.status_kib("VmHWM") * 1024 - idle
    nll0 = float(F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:], reduction="sum"))
    nll_last = float(F.cross_entropy(logits[-1, :-1].float(), tokens[-1, 1:], reduction="sum"))
    ok = abs(result.sequence_nll_sum[0] - nll0) <= 1e-5 * abs(nll0) and abs(result.sequence_nll_sum[-1] - nll_last) <= 1e-5 * abs(nll_last)
    return {
        "shape": [batch, seq, vocab], "bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9,
        "peak_rss_above_idle_mib": peak / 2**20, "tokens": int(result.tokens), "corpus_perplexity": float(result.perplexity), "matches_torch": bool(ok),
    }


def _start_naive(device: str) -> servers.Server:
    cmd = [sys.executable, "-m", "benchmarks.large", "--serve-naive", "--device", device]
    return servers._launch("naive-large", cmd, None)


def _serve_naive(device: str) -> None:
    """benchmarks.naive_server's servicer with 2 GiB message limits (one 262 MB unary request)."""
    import signal
    import threading
    from concurrent import futures

    from .naive_server import NaiveServicer

    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    limit = 2**31 - 1
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
    pb_grpc.add_LossServiceServicer_to_server(NaiveServicer(torch.device(device)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"naive server listening on 127.0.0.1:{port}: SERVING", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(2).wait()


def table(result: dict) -> str:
    lines = [f"{'workload':<28} {'configuration':<32} {'seconds':>8} {'GB/s':>6} {'server peak RSS above idle':>27}"]
    for r in result["rows"]:
        rss = f"{r['peak_rss_above_idle_mib']:.0f} MiB ({r['peak_rss_ratio']:.2f}x)" if "peak_rss_ratio" in r else "-"
        lines.append(f"{r['workload']:<28} {r['config']:<32} {r['seconds']:>8.3f} {r['gb_per_s']:>6.2f} {rss:>27}")
    h = result.get("huge")
    if h:
        lines.append(
            f"huge: {h['shape']} bf16, {h['bytes'] / GIB:.2f} GiB in {h['seconds']:.1f} s ({h['gb_per_s']:.2f} GB/s), server peak RSS above idle "
            f"{h['peak_rss_above_idle_mib']:.0f} MiB, corpus perplexity {h['corpus_perplexity']:.2f}, matches torch: {h['matches_torch']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.large", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--huge-gib", type=float, default=0.0, help="also stream one bf16 request of this many GiB (e.g. 2.1)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--serve-naive", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_naive:
        _serve_naive(args.device)
        return
    result = run(args)
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["python -m benchmarks.large", *(argv if argv is not None else sys.argv[1:])]), "cpus": os.cpu_count(), **result}, f, indent=2)


if __name__ == "__main__":
    main()
