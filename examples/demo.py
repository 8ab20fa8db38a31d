"""`make demo`: start a lossd server, use it the three ways the service is for, stop it.

1. remote scoring of model outputs (the worked examples, remote next to local torch),
2. many small scoring calls streamed over one connection (evaluate_many),
3. per-token perplexity of language-model logits ((B, T, V), causal shift done by the server),
4. comparing a model with its bf16-rounded copy token by token (llama.cpp's --kl-divergence table).
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from _server import local_server
from compare_models import run as run_compare_models
from lossd_client import LossClient, LossRequest, combine
from worked_examples import run as run_worked_examples


def main() -> int:
    print("starting a lossd server on 127.0.0.1 ...")
    with local_server() as target, LossClient(target, timeout_s=60) as client:
        info = client.server_info()
        print(f"server {target}: lossd {info.version}, torch {info.torch_version}, device {info.device}, health {client.health()}\n")

        print("== 1. remote scoring: lossd next to local torch")
        ok = run_worked_examples(client)

        print("== 2. 2,000 small scoring calls over one stream (evaluate_many)")
        rng = np.random.default_rng(0)
        items = [LossRequest(rng.standard_normal((16, 100), dtype=np.float32), rng.integers(0, 100, 16)) for _ in range(2000)]
        start = time.perf_counter()
        results = list(client.evaluate_many(items, window=64))
        elapsed = time.perf_counter() - start
        local = [F.cross_entropy(torch.from_numpy(r.input), torch.from_numpy(r.target)).item() for r in items]
        worst = max(abs(float(res.loss) - want) for res, want in zip(results, local, strict=True))
        corpus = combine(results)
        want_corpus = float(np.mean(local))
        print(f"  {len(results)} results in {elapsed:.2f}s ({len(results) / elapsed:,.0f} req/s); max |lossd - torch| = {worst:.2e}")
        print(f"  corpus mean from loss_sum/weight_sum: {corpus:.6f} (torch: {want_corpus:.6f})\n")
        ok &= worst < 1e-5 and math.isclose(corpus, want_corpus, rel_tol=1e-6)

        print("== 3. per-token perplexity of (B, T, V) bf16 logits, shift done by the server")
        g = torch.Generator().manual_seed(1)
        logits = torch.randn(3, 32, 500, generator=g).to(torch.bfloat16)
        tokens = torch.randint(0, 500, (3, 32), generator=g)
        tokens[2, 20:] = -100
        ppl = client.perplexity(logits, tokens)
        shifted = F.pad(tokens, (0, 1), value=-100)[:, 1:]
        nll = F.cross_entropy(logits.float().reshape(-1, 500), shifted.reshape(-1), reduction="none").reshape(3, 32)
        counted = (shifted != -100).sum(1)
        want_seq = torch.exp(nll.sum(1) / counted).tolist()
        want_corpus_ppl = math.exp(nll.sum().item() / counted.sum().item())
        print(f"  per-sequence perplexity: {np.round(ppl.sequence_perplexity, 3).tolist()} (torch: {[round(v, 3) for v in want_seq]})")
        print(f"  corpus perplexity: {ppl.perplexity:.4f} over {ppl.tokens} tokens (torch: {want_corpus_ppl:.4f})")
        print(f"  per-token NLL dtype: {ppl.token_nll.dtype} (float32 accumulation, not rounded to bf16)")
        ok &= np.allclose(ppl.sequence_perplexity, want_seq, rtol=1e-5) and math.isclose(ppl.perplexity, want_corpus_ppl, rel_tol=1e-5)

        print("\n== 4. a character model against its bf16-rounded copy, token by token (client.compare)")
        ok &= run_compare_models(client, train_steps=75)
    print("\ndemo", "OK: every number matched local torch" if ok else "FAILED: a number differed from torch")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
