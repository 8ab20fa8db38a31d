"""Loss evaluation with exact torch.nn.functional semantics. Pure torch: no gRPC, no asyncio.

A request becomes an immutable :class:`Plan` once its shapes, dtypes, options and (class-index)
target values have been validated exactly as torch validates them (:mod:`.validate`, with torch's
dtype rules probed from torch itself in :mod:`.dtypes`). The input is read only by
:meth:`Plan.evaluate_units`, which walks it in units (:mod:`.geometry`) and chunks sized from a
byte budget; :mod:`.kernels` hold the arithmetic per kind of target and :mod:`.finish` turns the
:class:`Partial` results into what torch returns. Because numerator and denominator of every mean
are explicit float64 totals, batches of several requests (batch_engine) and requests streamed in
chunks give every caller exactly its own torch result.

Half and bfloat16 inputs are computed with float32 accumulation and answered in torch's output
dtype; float64 input is computed in float64.

kl_div has its own plan (:mod:`.kl_plan`, over :mod:`.kl_div`) with the same interface; the
comparison of two models' logits lives in :mod:`.compare` and :mod:`.comparison`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .finish import divide
from .kernels import class_partial, class_terms
from .kl_plan import KlDivLossPlan, plan_kl
from .plan import Checkpoint, Plan
from .results import ClassTerms, LossResult, Partial, SequenceStats, merge_partials
from .spec import (
    BCE_WITH_LOGITS,
    CROSS_ENTROPY,
    DEFAULT_CHUNK_BYTES,
    EXTRAS,
    KL_DIV,
    LOSSES,
    NLL,
    REDUCTIONS,
    InvalidDtype,
    InvalidInput,
    LossSpec,
    TargetKind,
)
from .validate import build_plan, class_target_nbytes

__all__ = [
    "BCE_WITH_LOGITS",
    "CROSS_ENTROPY",
    "DEFAULT_CHUNK_BYTES",
    "EXTRAS",
    "KL_DIV",
    "LOSSES",
    "NLL",
    "REDUCTIONS",
    "Checkpoint",
    "ClassTerms",
    "InvalidDtype",
    "InvalidInput",
    "KlDivLossPlan",
    "LossResult",
    "LossSpec",
    "Partial",
    "Plan",
    "SequenceStats",
    "TargetKind",
    "class_partial",
    "class_target_nbytes",
    "class_terms",
    "divide",
    "evaluate",
    "merge_partials",
    "plan",
    "run",
]


def plan(
    spec: LossSpec,
    input_shape: Sequence[int],
    input_dtype: torch.dtype,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    *,
    target_streamed: bool = False,
) -> Plan | KlDivLossPlan:
    """Validate a request as torch would; raise InvalidInput naming the field when torch would reject it."""
    if spec.loss == KL_DIV:
        return plan_kl(spec, tuple(int(s) for s in input_shape), input_dtype, target, weight, pos_weight)
    return build_plan(spec, tuple(int(s) for s in input_shape), input_dtype, target, weight, pos_weight, target_streamed=target_streamed)


def run(
    p: Plan | KlDivLossPlan,
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    checkpoint: Callable[[], None] | None = None,
) -> LossResult:
    """Evaluate a validated plan on its whole input (``checkpoint``: see :meth:`Plan.evaluate_units`)."""
    if p.kind is TargetKind.KL:
        return p.run(input, target, device=device, chunk_bytes=chunk_bytes, checkpoint=checkpoint)
    target_units = p.unit_view(target) if p.kind in (TargetKind.PROB, TargetKind.BCE) else None
    partial = p.evaluate_units(
        p.unit_view(input), 0, target_units=target_units, device=device, chunk_bytes=chunk_bytes, checkpoint=checkpoint
    )
    return p.finish(partial)


def evaluate(
    spec: LossSpec,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    *,
    device: torch.device | str = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> LossResult:
    """Validate and evaluate one request; the engine's whole job in one call."""
    return run(plan(spec, input.shape, input.dtype, target, weight, pos_weight), input, target, device=device, chunk_bytes=chunk_bytes)
