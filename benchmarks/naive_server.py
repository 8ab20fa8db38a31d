"""The naive baseline: a synchronous grpc.server with a thread pool, no batching.

frombuffer -> torch.nn.functional -> bytes, on the same lossd.v1 proto. Only what the benchmark
sends is supported (loss kind, reduction, ignore_index, label_smoothing, weight, pos_weight);
no validation beyond what torch itself does.

Run: ``python -m benchmarks.naive_server --port 0`` (prints ``listening on 127.0.0.1:<port>``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from concurrent import futures

import grpc
import torch
import torch.nn.functional as F
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc

DTYPES = {
    pb.FLOAT32: torch.float32, pb.FLOAT16: torch.float16, pb.BFLOAT16: torch.bfloat16, pb.FLOAT64: torch.float64,
    pb.INT64: torch.int64, pb.UINT8: torch.uint8,
}
WIRE = {v: k for k, v in DTYPES.items()}
warnings.filterwarnings("ignore", message="The given buffer is not writable")
REDUCTIONS = {pb.REDUCTION_UNSPECIFIED: "mean", pb.MEAN: "mean", pb.SUM: "sum", pb.NONE: "none"}


def to_tensor(msg: pb.Tensor) -> torch.Tensor:
    dtype = DTYPES[msg.dtype]
    if not msg.data:
        return torch.empty(tuple(msg.shape), dtype=dtype)
    return torch.frombuffer(msg.data, dtype=dtype).reshape(tuple(msg.shape))


class NaiveServicer(pb_grpc.LossServiceServicer):
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def Evaluate(self, request: pb.EvaluateRequest, context) -> pb.EvaluateResponse:
        o = request.options
        x = to_tensor(request.input).to(self.device)
        t = to_tensor(request.target).to(self.device)
        reduction = REDUCTIONS[o.reduction]
        w = to_tensor(o.weight).to(self.device) if o.HasField("weight") else None
        try:
            if o.loss == pb.BINARY_CROSS_ENTROPY_WITH_LOGITS:
                pw = to_tensor(o.pos_weight).to(self.device) if o.HasField("pos_weight") else None
                loss = F.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw, reduction=reduction)
            else:
                ignore = o.ignore_index if o.HasField("ignore_index") else -100
                if o.loss == pb.NLL:
                    loss = F.nll_loss(x, t, weight=w, ignore_index=ignore, reduction=reduction)
                else:
                    loss = F.cross_entropy(x, t, weight=w, ignore_index=ignore, reduction=reduction, label_smoothing=o.label_smoothing)
        except (RuntimeError, ValueError, IndexError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        loss = loss.cpu().contiguous()
        out = pb.Tensor(dtype=WIRE[loss.dtype], shape=list(loss.shape), data=loss.reshape(-1).view(torch.uint8).numpy().tobytes())
        return pb.EvaluateResponse(id=request.id, loss=out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--torch-threads", type=int, default=0, help="0: one less than the CPU count, as lossd")
    args = p.parse_args(argv)
    torch.set_num_threads(args.torch_threads or max(1, (os.cpu_count() or 1) - 1))
    server = grpc.server(
        futures.ThreadPoolExecutor(args.threads),
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    pb_grpc.add_LossServiceServicer_to_server(NaiveServicer(torch.device(args.device)), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"naive server listening on {args.host}:{port}: SERVING", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(2).wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
