"""Request pools: the same data for every configuration of a run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from lossd_client import LossRequest, core
from lossd_client._proto.lossd.v1 import loss_pb2 as pb


@dataclass
class Workload:
    name: str
    requests: list[LossRequest]
    in_flight: int

    def __post_init__(self) -> None:
        self.messages: list[pb.EvaluateRequest] = [core.build(r)[0] for r in self.requests]
        self.payloads: list[bytes] = [m.SerializeToString() for m in self.messages]  # what the unary drivers send
        self.rows = [_rows(r) for r in self.requests]

    @property
    def mean_rows(self) -> float:
        return float(np.mean(self.rows))


def _rows(r: LossRequest) -> int:
    shape = np.shape(r.input)
    if r.loss == "binary_cross_entropy_with_logits":
        return int(shape[0]) if shape else 1
    if len(shape) <= 1:
        return 1
    return int(np.prod(shape)) // int(shape[1])


def uniform(n: int = 64, c: int = 1000, pool: int = 32, seed: int = 0) -> list[LossRequest]:
    """``pool`` distinct (n, c) fp32 logits with class-index targets."""
    rng = np.random.default_rng(seed)
    return [LossRequest(rng.standard_normal((n, c), dtype=np.float32), rng.integers(0, c, n)) for _ in range(pool)]


def mixed(pool: int = 256, seed: int = 1) -> list[LossRequest]:
    """Shapes (C), (N, C), (N, C, d); CE / NLL / BCE; reductions, weights, smoothing, ignored targets."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(pool):
        c = int(rng.choice([10, 100, 1000]))
        n = int(rng.integers(1, 129))
        reduction = ("mean", "sum", "none")[i % 3]
        x = rng.standard_normal((n, c), dtype=np.float32)
        t = rng.integers(0, c, n)
        kind = i % 8
        if kind in (1, 5):
            t[rng.random(n) < 0.2] = -100
        if kind == 2:
            out.append(LossRequest(x, t, weight=np.linspace(0.5, 2, c, dtype=np.float32), reduction=reduction))
        elif kind == 3:
            out.append(LossRequest(x, t, label_smoothing=0.1, reduction=reduction))
        elif kind == 4:
            logp = F.log_softmax(torch.from_numpy(x), 1).numpy()
            out.append(LossRequest(logp, t, loss="nll_loss", reduction=reduction))
        elif kind == 5:
            d = int(rng.integers(2, 8))
            x3 = rng.standard_normal((max(1, n // d), c, d), dtype=np.float32)
            t3 = rng.integers(0, c, (max(1, n // d), d))
            out.append(LossRequest(x3, t3, reduction=reduction))
        elif kind == 6:
            y = rng.random((n, 16), dtype=np.float32)
            out.append(LossRequest(rng.standard_normal((n, 16), dtype=np.float32), y, loss="binary_cross_entropy_with_logits", reduction=reduction))
        elif kind == 7:
            out.append(LossRequest(x[0], t[:1].reshape(()).copy() if t[0] >= 0 else np.array(0), reduction=reduction))
        else:
            out.append(LossRequest(x, t, reduction=reduction))
    return out


def small(pool: int = 64, seed: int = 2) -> list[LossRequest]:
    """Small requests for the soak: (8, 100) fp32."""
    rng = np.random.default_rng(seed)
    return [LossRequest(rng.standard_normal((8, 100), dtype=np.float32), rng.integers(0, 100, 8)) for _ in range(pool)]
