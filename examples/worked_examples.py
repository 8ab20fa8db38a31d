"""The worked examples, evaluated by a lossd server and by local torch side by side.

    python examples/worked_examples.py [--target HOST:PORT]

Without --target a throwaway server is started on 127.0.0.1. Every printed number is computed,
remotely and locally; the script exits non-zero if they disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F
from lossd_client import LossClient


def examples() -> list[tuple[str, str, dict]]:
    g = torch.Generator().manual_seed(0)
    # A masked text-generation batch: 2 sequences of 6 tokens over a 10-token vocabulary, the
    # second one right-padded; padding targets are -100 and do not count.
    lm_logits = torch.randn(2, 6, 10, generator=g)
    lm_targets = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, -100, -100, -100]])
    return [
        ("[[1, 2, 3]] scored against class 2", "cross_entropy", dict(input=torch.tensor([[1.0, 2.0, 3.0]]), target=torch.tensor([2]))),
        (
            "masked text generation: (B, T, V) logits moved to torch's (B, V, T) layout, padding = -100",
            "cross_entropy",
            dict(input=lm_logits.transpose(1, 2), target=lm_targets),
        ),
        (
            "weighted classes: class 1 counts three times as much, the mean divides by sum w[y]",
            "cross_entropy",
            dict(input=torch.tensor([[2.0, 0.5, 0.1], [0.2, 1.5, 0.3], [0.1, 0.2, 3.0]]), target=torch.tensor([0, 1, 1]), weight=torch.tensor([1.0, 3.0, 1.0])),
        ),
        (
            "label smoothing 0.1 with an ignored target",
            "cross_entropy",
            dict(input=torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), target=torch.tensor([2, -100]), label_smoothing=0.1),
        ),
        ("per-token losses (reduction='none')", "nll_loss", dict(input=torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]), 1), target=torch.tensor([2, 0]), reduction="none")),
        (
            "multi-label BCE with pos_weight",
            "binary_cross_entropy_with_logits",
            dict(input=torch.tensor([[0.5, -1.0, 2.0]]), target=torch.tensor([[1.0, 0.0, 1.0]]), pos_weight=torch.tensor([1.0, 2.0, 0.5])),
        ),
    ]


def run(client: LossClient) -> bool:
    ok = True
    for title, fn, kwargs in examples():
        remote = getattr(client, fn)(**kwargs)
        local = getattr(F, fn)(**kwargs)
        same = remote.dtype == local.dtype and torch.allclose(remote, local, rtol=1.3e-6, atol=1e-5)
        ok &= same
        print(f"{title}\n  lossd: {remote}\n  torch: {local}\n  {'match' if same else 'MISMATCH'}\n")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="a running server; default: start one")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        target = args.target
        if target is None:
            from _server import local_server

            target = stack.enter_context(local_server())
        with LossClient(target, timeout_s=60) as client:
            return 0 if run(client) else 1


if __name__ == "__main__":
    sys.exit(main())
