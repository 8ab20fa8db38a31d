"""Score a real (tiny) causal language model with lossd: per-sequence and corpus perplexity.

A character-level GRU is trained for a few seconds on examples/data/river_notes.txt. Its logits for
held-out text, (B, T, V) in bfloat16 exactly as a model would emit them, go to the service with the
token ids: class_axis=-1 and the causal shift are done server-side. The results are checked against
a local torch computation; the script exits 1 on a mismatch.

    python examples/perplexity.py                 # starts (and stops) its own server
    python examples/perplexity.py --target HOST:PORT
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lossd_client import LossClient

sys.path.insert(0, os.path.dirname(__file__))
from _server import local_server  # noqa: E402

TEXT = Path(__file__).parent / "data" / "river_notes.txt"


class CharGRU(torch.nn.Module):
    def __init__(self, vocab: int, embed: int = 48, hidden: int = 128) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, embed)
        self.gru = torch.nn.GRU(embed, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(tokens))
        return self.head(out)


def train(
    model: CharGRU, data: torch.Tensor, *, seconds: float = math.inf, max_steps: int = 2000, seq_len: int = 64, batch: int = 32
) -> tuple[int, float]:
    """Next-character training for about ``seconds`` or ``max_steps`` steps, whichever ends first
    (a fixed number of steps gives the same model on every run); returns (steps, last loss)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    deadline = time.monotonic() + seconds
    steps, loss = 0, math.nan
    while time.monotonic() < deadline and steps < max_steps:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq_len] for s in starts])
        y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts])
        out = model(x)
        loss_t = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss_t.backward()
        opt.step()
        steps, loss = steps + 1, loss_t.item()
    return steps, loss


def local_perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-sequence and corpus perplexity by hand: float32 math on the bf16 logits, causal shift."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none").double()
    per_seq = torch.exp(nll.mean(1))
    return per_seq, math.exp(float(nll.mean()))


def score(target: str, logits: torch.Tensor, tokens: torch.Tensor) -> int:
    with LossClient(target, timeout_s=120) as client:
        result = client.perplexity(logits, tokens)
    per_seq, corpus = local_perplexity(logits, tokens)
    print(f"{'seq':>4} {'tokens':>6} {'perplexity (lossd)':>19} {'perplexity (torch)':>19}")
    for i, (got, want) in enumerate(zip(result.sequence_perplexity, per_seq.tolist(), strict=True)):
        print(f"{i:>4} {int(result.sequence_tokens[i]):>6} {got:>19.4f} {want:>19.4f}")
    print(f"corpus perplexity: lossd {result.perplexity:.4f}, torch {corpus:.4f} over {result.tokens} tokens")
    ok = torch.allclose(torch.as_tensor(result.sequence_perplexity), per_seq, rtol=1e-4) and math.isclose(result.perplexity, corpus, rel_tol=1e-4)
    ok = ok and result.token_nll.dtype == torch.float32 and tuple(result.token_nll.shape) == tuple(tokens.shape)
    print("agrees with local torch" if ok else "MISMATCH with local torch")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", help="host:port of a running lossd server (default: start one)")
    p.add_argument("--train-seconds", type=float, default=12.0)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    text = TEXT.read_text(encoding="utf-8")
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text])
    split = int(len(data) * 0.9)
    model = CharGRU(len(vocab))
    steps, loss = train(model, data[:split], seconds=args.train_seconds)
    print(f"trained a character GRU on {TEXT.name} ({len(text)} characters, V={len(vocab)}): {steps} steps, loss {loss:.3f}")

    held_out = data[split:]
    length = min(args.length, (len(held_out) - 1) // args.sequences)
    tokens = held_out[: args.sequences * length].reshape(args.sequences, length)
    with torch.no_grad():
        logits = model(tokens).to(torch.bfloat16)  # (B, T, V) as the model emits them
    print(f"scoring held-out text: logits {tuple(logits.shape)} {logits.dtype}")

    if args.target:
        return score(args.target, logits, tokens)
    with local_server() as address:
        return score(address, logits, tokens)


if __name__ == "__main__":
    sys.exit(main())
