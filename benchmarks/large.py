"""Large requests: one 2048x32000 cross_entropy request, reduction='none' (262 MB in fp32, 131 MB in bf16).

Same data, same run, one row per (dtype, path):

- in-process ``F.cross_entropy`` and in-process ``lossd_server.engine.evaluate``, each in a fresh subprocess;
- the floor: the same request as ``lossd_client`` streams it (``core.chunk_payloads``: a ChunkHeader,
  then 1 MiB row chunks, pre-serialised, over a channel with ``LossClient``'s options) to
  benchmarks.floor_server's ``EvaluateChunked`` sink, which reads every message and computes nothing;
- the naive unary gRPC server (benchmarks.naive_server's servicer with 2 GiB message limits);
- lossd streaming (``LossClient.evaluate`` switches to EvaluateChunked by itself);
- lossd same-host shared memory (server ``--allow-client-shm``, ``LossClient(shared_memory=True)``).

End-to-end GB/s is request input bytes over wall time of the call (best of ``--repeats``); every row's
throughput is also given as a ratio to in-process ``F.cross_entropy``'s and to the floor's (same dtype,
same run). Peak memory
above idle: the process's peak RSS is reset (``/proc/<pid>/clear_refs``) after a small warm-up call, then
VmHWM after the timed calls minus VmRSS before them; in-process rows measure their own subprocess with
its inputs already allocated, server rows measure the server process (a fresh one per dtype).
``--huge-gib N`` adds one lossd request of N GiB of bf16 logits (above protobuf's 2 GiB message ceiling).

    python -m benchmarks.large [--repeats 3] [--huge-gib 2.1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
import torch
import torch.nn.functional as F
from lossd_client import LossClient, LossRequest, core
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from lossd_client.channel import channel_options  # the channel LossClient opens (limits, retries, retry buffer)

from . import servers

ROWS, CLASSES = 2048, 32000
GIB = 1 << 30
TORCH = "in-process F.cross_entropy"
ENGINE = "in-process lossd engine"
FLOOR = "floor: 1 MiB chunks to a grpc.aio sink"
NAIVE = "naive unary gRPC"
STREAM = "lossd streaming (EvaluateChunked)"
SHM = "lossd shared memory"
PATHS = (TORCH, ENGINE, FLOOR, NAIVE, STREAM, SHM)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _status_kib(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak(pid: int | str) -> int:
    """Reset the process's VmHWM to its current RSS where the kernel allows it; return that baseline in bytes."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return _status_kib(pid, "VmHWM") * 1024
    return _status_kib(pid, "VmRSS") * 1024


def _best(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, CLASSES, generator=gen)
    t = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    return x.to(dtype), t


def _cell(seconds: float, peak: float, nbytes: int) -> dict:
    return {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9, "peak_above_idle_mib": peak / 2**20, "peak_ratio": peak / nbytes}


def _inproc(path: str, dtype_name: str, repeats: int, device: str) -> dict:
    """Runs inside a fresh subprocess: time one in-process path, report its own peak RSS above the inputs."""
    from lossd_server import allocator, engine

    # glibc tuned as the server tunes it at start-up, for both paths: with glibc's defaults the
    # engine's per-chunk temporaries stay on the heap and a bfloat16 run kept 0-2x its input resident
    allocator.tune()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    x, t = _data(DTYPES[dtype_name])
    dev = torch.device(device)
    spec = engine.LossSpec(reduction="none")
    if path == TORCH:
        def call(x: torch.Tensor = x, t: torch.Tensor = t) -> torch.Tensor:
            return F.cross_entropy(x.to(dev), t.to(dev), reduction="none").cpu()
    else:
        def call(x: torch.Tensor = x, t: torch.Tensor = t) -> torch.Tensor:
            return engine.evaluate(spec, x, t, device=dev).loss
    call(x[:8], t[:8])
    base = _reset_peak("self")
    seconds, out = _best(call, repeats)
    peak = _status_kib("self", "VmHWM") * 1024 - base
    del out
    return _cell(seconds, peak, x.numel() * x.element_size())


def _inproc_cell(path: str, dtype_name: str, repeats: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.large", "--inproc", path, "--dtype", dtype_name, "--repeats", str(repeats), "--device", device]
    env = dict(os.environ, PYTHONPATH=servers.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=servers.ROOT, env=env, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _naive_call(address: str, x: torch.Tensor, t: torch.Tensor) -> Callable[[], int]:
    """What a generic client does: build one EvaluateRequest, one unary call."""
    opts = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
    stub = pb_grpc.LossServiceStub(grpc.insecure_channel(address, options=opts))

    def call() -> int:
        msg, _ = core.build(LossRequest(x, t, reduction="none"))
        return len(stub.Evaluate(msg, timeout=600).loss.data)

    return call


def _floor_call(channel: grpc.Channel, x: torch.Tensor, t: torch.Tensor) -> Callable[[], int]:
    """LossClient's chunked transfer without LossClient: the same serialised chunks, to a sink that only reads them."""
    call = channel.stream_unary("/lossd.v1.LossService/EvaluateChunked", request_serializer=None, response_deserializer=None)

    def send() -> int:
        return len(call(core.chunk_payloads(LossRequest(x, t, reduction="none"), core.DEFAULT_CHUNK_BYTES), timeout=600))

    return send


def _server_cell(server: servers.Server, call: Callable[[], object], warm: Callable[[], object], nbytes: int, repeats: int) -> dict:
    warm()
    time.sleep(0.2)
    base = _reset_peak(server.proc.pid)
    seconds, _ = _best(call, repeats)
    return _cell(seconds, server.status_kib("VmHWM") * 1024 - base, nbytes)


def _lossd_cell(x: torch.Tensor, t: torch.Tensor, device: str, repeats: int, shm: bool) -> dict:
    flags = ("--allow-client-shm",) if shm else ()
    with servers.start_lossd(*flags, device=device) as lossd, LossClient(lossd.address, timeout_s=600, shared_memory=shm) as client:
        def call(x: torch.Tensor = x, t: torch.Tensor = t) -> object:
            return client.evaluate(LossRequest(x, t, reduction="none")).loss

        return _server_cell(lossd, call, lambda: call(x[:64], t[:64]), x.numel() * x.element_size(), repeats)


def run(args: argparse.Namespace, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """The large-request section: one row per (dtype, path); see the module docstring."""
    repeats = getattr(args, "repeats", 3)
    device = getattr(args, "device", "cpu")
    rows = []
    for dtype_name, dtype in DTYPES.items():
        x, t = _data(dtype)
        nbytes = x.numel() * x.element_size()
        name = f"{ROWS}x{CLASSES} {dtype_name} ({nbytes / 1e6:.0f} MB)"
        cells = {}
        for path in (TORCH, ENGINE):
            cells[path] = _inproc_cell(path, dtype_name, repeats, device)
            log(f"  {name} {path}: {cells[path]['seconds']:.3f} s")
        with servers.start_floor() as floor, grpc.insecure_channel(floor.address, options=channel_options(-1, 5)) as channel:
            cells[FLOOR] = _server_cell(floor, _floor_call(channel, x, t), _floor_call(channel, x[:64], t[:64]), nbytes, repeats)
        log(f"  {name} {FLOOR}: {cells[FLOOR]['seconds']:.3f} s")
        with _start_naive(device) as naive:
            cells[NAIVE] = _server_cell(naive, _naive_call(naive.address, x, t), _naive_call(naive.address, x[:8], t[:8]), nbytes, repeats)
        log(f"  {name} {NAIVE}: {cells[NAIVE]['seconds']:.3f} s")
        cells[STREAM] = _lossd_cell(x, t, device, repeats, shm=False)
        log(f"  {name} {STREAM}: {cells[STREAM]['seconds']:.3f} s")
        cells[SHM] = _lossd_cell(x, t, device, repeats, shm=True)
        log(f"  {name} {SHM}: {cells[SHM]['seconds']:.3f} s")
        base, floor_s = cells[TORCH]["seconds"], cells[FLOOR]["seconds"]
        for path in PATHS:
            secs = cells[path]["seconds"]
            rows.append(
                {"workload": name, "dtype": dtype_name, "config": path, "bytes": nbytes, **cells[path], "ratio_to_torch": base / secs, "ratio_to_floor": floor_s / secs}
            )
        del x, t
    huge = _huge(args.huge_gib, device) if getattr(args, "huge_gib", 0) else None
    return {"rows": rows, "huge": huge, "repeats": repeats, "reduction": "none"}


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
        base = _reset_peak(lossd.proc.pid)
        t0 = time.perf_counter()
        result = client.perplexity(logits, tokens)
        seconds = time.perf_counter() - t0
        peak = lossd.status_kib("VmHWM") * 1024 - base
    nll0 = float(F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:], reduction="sum"))
    nll_last = float(F.cross_entropy(logits[-1, :-1].float(), tokens[-1, 1:], reduction="sum"))
    ok = abs(result.sequence_nll_sum[0] - nll0) <= 1e-5 * abs(nll0) and abs(result.sequence_nll_sum[-1] - nll_last) <= 1e-5 * abs(nll_last)
    return {
        "shape": [batch, seq, vocab], "bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9,
        "peak_above_idle_mib": peak / 2**20, "tokens": int(result.tokens), "corpus_perplexity": float(result.perplexity), "matches_torch": bool(ok),
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
    head = f"{'workload':<28} {'path':<38} {'seconds':>8} {'GB/s':>6} {'x torch':>7} {'x floor':>7} {'peak memory above idle':>24}"
    lines = [head, "-" * len(head)]
    last = None
    for r in result["rows"]:
        if last is not None and r["workload"] != last:
            lines.append("")
        last = r["workload"]
        mem = f"{r['peak_above_idle_mib']:.0f} MiB ({r['peak_ratio']:.2f}x input)"
        lines.append(
            f"{r['workload']:<28} {r['config']:<38} {r['seconds']:>8.3f} {r['gb_per_s']:>6.2f} {r['ratio_to_torch']:>7.2f} {r['ratio_to_floor']:>7.2f} {mem:>24}"
        )
    h = result.get("huge")
    if h:
        lines.append(
            f"huge: {h['shape']} bf16, {h['bytes'] / GIB:.2f} GiB in {h['seconds']:.1f} s ({h['gb_per_s']:.2f} GB/s), server peak RSS above idle "
            f"{h['peak_above_idle_mib']:.0f} MiB, corpus perplexity {h['corpus_perplexity']:.2f}, matches torch: {h['matches_torch']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.large", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--huge-gib", type=float, default=0.0, help="also stream one bf16 request of this many GiB (e.g. 2.1)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--serve-naive", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inproc", choices=(TORCH, ENGINE), help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_naive:
        _serve_naive(args.device)
        return
    if args.inproc:
        print(json.dumps(_inproc(args.inproc, args.dtype, args.repeats, args.device)))
        return
    result = run(args)
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["python -m benchmarks.large", *(argv if argv is not None else sys.argv[1:])]), "cpus": os.cpu_count(), **result}, f, indent=2)


if __name__ == "__main__":
    main()
