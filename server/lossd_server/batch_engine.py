"""Evaluate several compatible requests in one engine pass. Pure torch: no gRPC, no asyncio.

Class-index cross_entropy / nll_loss requests whose per-row maths is the same (loss kind, number
of classes, compute dtype, class weights by value, label smoothing) are flattened to rows, however
they are shaped: ``(C)``, ``(N, C)``, ``(N, C, d...)`` or ``class_axis=-1`` layouts all become
``(rows, C)``. One log_softmax / gather pass runs over the concatenation; the per-row terms are then
split back and each request is reduced on its own rows with the numerator and denominator torch
uses (:meth:`engine.Plan.class_partial`, :meth:`engine.Plan.finish`), so a caller's ``mean`` never
depends on who shared its batch. Target masks (ignore_index, shift_targets) were resolved per
request when its Plan was built, and extras / sequence statistics are computed on the request's own
rows, so those options do not split batches.

Other requests (probability targets, BCE, and any request too large to be worth copying into a
batch) are evaluated alone by :func:`engine.run`, which walks them in bounded row chunks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from . import engine


@dataclass(eq=False)
class Job:
    """One validated request: its plan and the tensors it was decoded into."""

    plan: engine.Plan
    input: torch.Tensor
    target: torch.Tensor


def weight_key(weight: torch.Tensor | None, dtype: torch.dtype) -> bytes | None:
    """Class weights compared by value, as the compute dtype sees them."""
    if weight is None:
        return None
    w = weight.detach().to(dtype).contiguous().reshape(-1)
    return hashlib.blake2b(w.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


def batch_key(plan: engine.Plan, fuse_max_bytes: int) -> Hashable:
    """Requests with equal keys may share one fused pass; a unique key means "evaluate alone"."""
    if plan.kind != "class" or plan.input_nbytes > fuse_max_bytes:
        return ("alone", id(plan))
    spec = plan.spec
    smoothing = spec.label_smoothing if spec.loss == engine.CROSS_ENTROPY and spec.label_smoothing > 0.0 else 0.0
    return ("class", spec.loss, plan.num_classes, plan.compute_dtype, weight_key(plan.weight, plan.compute_dtype), smoothing)


def job_rows(job: Job) -> int:
    return job.plan.rows


Checkpoint = Callable[[], None] | None


def evaluate_alone(
    job: Job, *, device: torch.device | str = "cpu", chunk_bytes: int = engine.DEFAULT_CHUNK_BYTES, checkpoint: Checkpoint = None
) -> engine.LossResult:
    return engine.run(job.plan, job.input, job.target, device=device, chunk_bytes=chunk_bytes, checkpoint=checkpoint)


def evaluate_fused(
    jobs: Sequence[Job], *, device: torch.device | str = "cpu", chunk_bytes: int = engine.DEFAULT_CHUNK_BYTES, checkpoint: Checkpoint = None
) -> list[engine.LossResult]:
    """Evaluate jobs sharing one batch key; a single job goes through the ordinary chunked path."""
    if len(jobs) == 1:
        return [evaluate_alone(jobs[0], device=device, chunk_bytes=chunk_bytes, checkpoint=checkpoint)]
    first = jobs[0].plan
    device = torch.device(device)
    rows = [j.plan._rows_of(j.plan.unit_view(j.input), "cpu") for j in jobs]
    for job, r in zip(jobs, rows, strict=True):
        if r.shape[0] != job.plan.rows or job.plan.target.shape[0] != job.plan.rows:
            raise engine.InvalidInput("input", f"holds {r.shape[0]} rows, its plan {job.plan.rows}")
    x = torch.cat(rows).to(device=device, non_blocking=True)
    t = torch.cat([j.plan.target for j in jobs]).to(device)
    valid = torch.cat([j.plan.valid for j in jobs]).to(device)
    try:
        terms = first.class_terms(x, t, valid)
    except (RuntimeError, IndexError, ValueError) as exc:
        raise engine.InvalidInput("input", f"torch rejected the request: {exc}") from exc
    if any(j.plan.spec.extras or j.plan.spec.sequence_stats for j in jobs):
        results = []
        start = 0
        for job in jobs:
            p = job.plan
            stop = start + p.rows
            results.append(p.finish(p.class_partial(terms.rows(start, stop), 0, p.units)))
            start = stop
        return results
    return _reduce_per_job(jobs, terms)


def _reduce_per_job(jobs: Sequence[Job], terms: engine.ClassTerms) -> list[engine.LossResult]:
    """Every job's numerator, denominator and count from three segment sums over the batch.

    The same float64 sums as Plan.class_partial, without a handful of small torch calls per job.
    """
    counts = [j.plan.rows for j in jobs]
    segment = torch.repeat_interleave(torch.arange(len(jobs), device=terms.losses.device), torch.tensor(counts, device=terms.losses.device))
    zeros = torch.zeros(len(jobs), dtype=torch.float64, device=terms.losses.device)
    loss_sums = zeros.index_add(0, segment, terms.losses.to(torch.float64)).tolist()
    weight_sums = zeros.index_add(0, segment, terms.wt.to(torch.float64)).tolist()
    counted = (
        torch.zeros(len(jobs), dtype=torch.int64, device=terms.losses.device).index_add(0, segment, terms.valid.to(torch.int64)).tolist()
    )
    losses = terms.losses.cpu() if any(j.plan.needs_losses() for j in jobs) else None
    results = []
    start = 0
    for i, job in enumerate(jobs):
        p = job.plan
        stop = start + p.rows
        part_losses = losses[start:stop] if losses is not None and p.needs_losses() else None
        results.append(p.finish(engine.Partial(0, p.units, part_losses, loss_sums[i], weight_sums[i], counted[i])))
        start = stop
    return results


def evaluate_batch(
    jobs: Sequence[Job], *, device: torch.device | str = "cpu", chunk_bytes: int = engine.DEFAULT_CHUNK_BYTES, checkpoint: Checkpoint = None
) -> list[engine.LossResult | BaseException]:
    """Evaluate one batch; one outcome per job, in order.

    When the fused pass fails, every job is re-run alone so that only the culprit fails.
    ``checkpoint`` is called between chunks and raises to stop (see engine.Plan.evaluate_units).
    """
    try:
        return list(evaluate_fused(jobs, device=device, chunk_bytes=chunk_bytes, checkpoint=checkpoint))
    except Exception as exc:  # noqa: BLE001 - isolated below
        if len(jobs) == 1:
            return [exc]
    outcomes: list[engine.LossResult | BaseException] = []
    for job in jobs:
        try:
            outcomes.append(evaluate_alone(job, device=device, chunk_bytes=chunk_bytes, checkpoint=checkpoint))
        except Exception as exc:  # noqa: BLE001 - reported for this job only
            outcomes.append(exc)
    return outcomes
