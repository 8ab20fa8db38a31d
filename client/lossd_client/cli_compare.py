"""``lossd-client compare REF CAND``: compare two models' saved logits token by token.

    lossd-client compare base.npz quantized.safetensors --shift            # llama.cpp's table
    lossd-client compare base.pt candidate.pt --tokens tokens.npz --json
    lossd-client compare base.npz candidate.npz --output per_token.npz --top-k 5

Both files are read with ``lossd-client score``'s loaders (``.npz``, ``.safetensors`` memory-mapped,
``.pt`` with ``weights_only=True``) and its array names (``--logits-key``; tokens: ``--target-key``).
The tokens come from ``--tokens FILE`` or else from the reference file; without any, every
position counts and only the KL divergence and "same top p" statistics are printed. The logits
are ``(..., V)`` with the vocabulary last; comparisons larger than one message stream through
CompareChunked by themselves, with a progress bar of the bytes sent. The table is llama.cpp's
``llama-perplexity --kl-divergence`` block (:func:`lossd_client.compare_stats.format_table`);
``--json`` prints the same numbers (fractions, not percent; null where a value is not finite).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from . import compare, core
from .cli import EXIT_OK, LOGITS_KEYS, TARGET_KEYS, CliError, _client, _progress_factory, check_output, load_file, pick, save_output
from .compare_stats import format_table


def _tokens(args: argparse.Namespace, reference_arrays: Mapping[str, Any], reference_path: Path) -> Any:
    """The tokens: from --tokens FILE, else the reference file's target array, else None."""
    if args.tokens is not None:
        path = Path(args.tokens)
        return pick(load_file(path), args.target_key, TARGET_KEYS, "target", path, token_ids=True)
    if args.target_key is not None or any(name in reference_arrays for name in TARGET_KEYS):
        return pick(reference_arrays, args.target_key, TARGET_KEYS, "target", reference_path, token_ids=True)
    return None


def _finite(value: Any) -> Any:
    """JSON without NaN / Infinity: non-finite floats become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _save(path: str, result: compare.CompareResult) -> None:
    arrays = {name: compare.as_numpy(getattr(result, name)) for name in compare.DENSE_OUTPUTS if getattr(result, name) is not None}
    for name in ("reference_top_k", "candidate_top_k"):
        top = getattr(result, name)
        if top is not None:
            arrays[f"{name}_ids"], arrays[f"{name}_logprobs"] = compare.as_numpy(top.ids), compare.as_numpy(top.logprobs)
    np.savez(path, **arrays)


def cmd_compare(args: argparse.Namespace) -> int:
    if args.top_k and not args.output:
        raise CliError("--top-k returns per-position classes: save them with --output FILE.npz")
    check_output(args.output)
    ref_path, cand_path = Path(args.reference), Path(args.candidate)
    ref_arrays = load_file(ref_path)
    reference = pick(ref_arrays, args.logits_key, LOGITS_KEYS, "logits", ref_path)
    candidate = pick(load_file(cand_path), args.logits_key, LOGITS_KEYS, "logits", cand_path)
    tokens = _tokens(args, ref_arrays, ref_path)
    total = core.tensors_nbytes(reference, candidate, tokens)
    bar = _progress_factory(not args.no_progress)(total=total, desc=f"{ref_path.name} vs {cand_path.name}")
    try:
        with _client(args) as client:
            result = client.compare(
                reference, candidate, tokens, ignore_index=args.ignore_index, shift_targets=args.shift, top_k=args.top_k,
                timeout_s=args.timeout_s, progress=lambda n: bar.update(max(0, min(n, total - bar.n))),
            )  # fmt: skip
        bar.update(total - bar.n)
    finally:
        bar.close()
    if args.output:
        save_output(lambda: _save(args.output, result), args.output)
    shape = [int(d) for d in reference.shape]
    if args.json:
        doc = {"reference": str(ref_path), "candidate": str(cand_path), "shape": shape, "summary": result.summary.to_dict()}
        doc["totals"] = asdict(result.totals)
        print(json.dumps(_finite(doc), indent=2))
    else:
        print(f"reference: {ref_path}\ncandidate: {cand_path}\nlogits {tuple(shape)}, tokens {'given' if tokens is not None else 'none'}")
        print(format_table(result.summary), end="")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """The ``compare`` subcommand, on ``lossd-client``'s subparsers."""
    p = sub.add_parser("compare", help="compare two models' saved logits token by token (llama.cpp's --kl-divergence table)")
    p.add_argument("reference", metavar="REF", help="the reference (base) model's logits: .npz, .safetensors or .pt")
    p.add_argument("candidate", metavar="CAND", help="the candidate (Q) model's logits, same shape")
    p.add_argument("--tokens", metavar="FILE", help="token ids (default: the reference file's target array, if any)")
    p.add_argument("--logits-key", help=f"array name of the logits in both files (default: first of {', '.join(LOGITS_KEYS)})")
    p.add_argument("--target-key", help=f"array name of the tokens (default: first of {', '.join(TARGET_KEYS)})")
    p.add_argument("--shift", action="store_true", help="causal LM: position t is scored against token t+1")
    p.add_argument("--ignore-index", type=int, default=-100, help="tokens with this value do not count")
    p.add_argument("--top-k", type=int, default=0, help="with --output: also save each model's top K classes per position")
    p.add_argument("--output", metavar="FILE.npz", help="save the per-position arrays (kl, argmax_agree, counted, p_*, nll_*, delta_p)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_compare)
