"""Compare a model with a copy of it whose weights were rounded to bfloat16 (or int8), token by token.

The character-level GRU of examples/perplexity.py is trained for a fixed number of steps (120 by
default: about 8 seconds on a 2-core VM) from fixed seeds on examples/data/river_notes.txt, so a
run prints the same figures every time on the same machine and torch build; a copy gets its weights rounded to bf16 (``--int8``: symmetric
per-tensor int8). Both models' logits for held-out text go to the service with the token ids
(``client.compare``, causal shift done server-side), which answers per-token KL divergence, each
model's probability and NLL of the next character, argmax agreement and llama.cpp's
``--kl-divergence`` summary. The script prints that table and checks it against the same statistics
computed locally (torch in float64 for the per-token values, ``compare_stats.summarize`` for the
summary); it exits 1 on a mismatch.

    python examples/compare_models.py                 # starts (and stops) its own server
    python examples/compare_models.py --target HOST:PORT --int8
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from lossd_client import LossClient
from lossd_client.compare_stats import format_table, summarize

sys.path.insert(0, os.path.dirname(__file__))
from _server import local_server  # noqa: E402
from perplexity import TEXT, CharGRU, train  # noqa: E402


def rounded_copy(model: torch.nn.Module, int8: bool) -> torch.nn.Module:
    """The model with every weight rounded to bf16, or to symmetric per-tensor int8, and back to float32."""
    candidate = copy.deepcopy(model)
    with torch.no_grad():
        for p in candidate.parameters():
            if int8:
                scale = p.abs().max().clamp_min(1e-12) / 127
                p.copy_((p / scale).round().clamp(-127, 127) * scale)
            else:
                p.copy_(p.to(torch.bfloat16).float())
    return candidate


def local_values(reference: torch.Tensor, candidate: torch.Tensor, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """The per-token values by hand, in float64: KL(reference || candidate), the next token's NLL under
    each model (causal shift: the last position scores nothing), argmax agreement."""
    lr, lc = F.log_softmax(reference.double(), -1), F.log_softmax(candidate.double(), -1)
    nxt = tokens[:, 1:].unsqueeze(-1)
    values = {
        "kl": F.kl_div(lc, lr, log_target=True, reduction="none").sum(-1)[:, :-1],
        "argmax_agree": reference.argmax(-1)[:, :-1] == candidate.argmax(-1)[:, :-1],
        "nll_ref": -lr[:, :-1].gather(-1, nxt).squeeze(-1),
        "nll_cand": -lc[:, :-1].gather(-1, nxt).squeeze(-1),
    }
    values["delta_p"] = values["nll_cand"].neg().exp() - values["nll_ref"].neg().exp()
    return {name: v.numpy() for name, v in values.items()}


def check(result, reference: torch.Tensor, candidate: torch.Tensor, tokens: torch.Tensor) -> bool:
    """The service's per-token values and summary against local torch."""
    local = local_values(reference, candidate, tokens)
    kl = result.kl[:, :-1].double().numpy()
    worst = float(np.abs(kl - local["kl"]).max())
    worst_nll = float(np.abs(result.nll_cand[:, :-1].double().numpy() - local["nll_cand"]).max())
    mine = summarize(**local)
    # (name, lossd, torch, relative and absolute tolerance: float32 per-token values against float64)
    pairs = [
        ("Mean KLD", result.summary.kld.value, mine.kld.value, 0.0, 1e-7),
        ("Mean PPL(Q)", result.summary.ppl_cand.value, mine.ppl_cand.value, 1e-5, 0.0),
        ("Mean PPL(base)", result.summary.ppl_ref.value, mine.ppl_ref.value, 1e-5, 0.0),
        ("PPL(Q)/PPL(base)", result.summary.ppl_ratio.value, mine.ppl_ratio.value, 1e-5, 0.0),
        ("RMS Δp", result.summary.delta_p_rms.value, mine.delta_p_rms.value, 0.0, 1e-6),
        ("Same top p", result.summary.same_top_p.value, mine.same_top_p.value, 0.0, 1e-12),
    ]
    print(f"per-token |KL lossd - torch| <= {worst:.2e}, |NLL(Q) lossd - torch| <= {worst_nll:.2e}")
    for name, got, want, _, _ in pairs:
        print(f"  {name:<17} lossd {got:.6g}   torch {want:.6g}")
    same_tokens = result.summary.tokens == mine.tokens == tokens.shape[0] * (tokens.shape[1] - 1)
    close = all(math.isclose(got, want, rel_tol=rel, abs_tol=tol) for _, got, want, rel, tol in pairs)
    ok = same_tokens and close and worst < 1e-5 and worst_nll < 1e-5
    print("agrees with local torch" if ok else "MISMATCH with local torch")
    return ok


def run(client: LossClient, *, train_steps: int = 120, int8: bool = False, sequences: int = 8, length: int = 256) -> bool:
    """Train, round, compare through ``client``, print the table; True when it agrees with local torch."""
    torch.manual_seed(0)
    text = TEXT.read_text(encoding="utf-8")
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text])
    split = int(len(data) * 0.9)
    model = CharGRU(len(vocab))
    steps, loss = train(model, data[:split], max_steps=train_steps)
    candidate = rounded_copy(model, int8)
    print(f"trained a character GRU ({steps} steps, loss {loss:.3f}); candidate: its weights rounded to {'int8' if int8 else 'bf16'}")
    held_out = data[split:]
    length = min(length, (len(held_out) - 1) // sequences)
    tokens = held_out[: sequences * length].reshape(sequences, length)
    with torch.no_grad():
        reference_logits, candidate_logits = model(tokens), candidate(tokens)  # (B, T, V) float32
    result = client.compare(reference_logits, candidate_logits, tokens, shift_targets=True)
    print(format_table(result.summary))
    return check(result, reference_logits, candidate_logits, tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", help="host:port of a running lossd server (default: start one)")
    p.add_argument("--train-steps", type=int, default=120, help="training steps (a fixed count: the same figures on every run)")
    p.add_argument("--int8", action="store_true", help="round the candidate's weights to int8 instead of bf16")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.target:
        with LossClient(args.target, timeout_s=120) as client:
            return 0 if run(client, train_steps=args.train_steps, int8=args.int8) else 1
    with local_server() as address, LossClient(address, timeout_s=120) as client:
        return 0 if run(client, train_steps=args.train_steps, int8=args.int8) else 1


if __name__ == "__main__":
    sys.exit(main())
