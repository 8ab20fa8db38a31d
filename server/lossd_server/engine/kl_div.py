"""``torch.nn.functional.kl_div`` with torch's exact semantics, evaluated in bounded chunks. Pure torch.

torch (2.13) computes, element by element over the broadcast of ``input`` and ``target``::

    log_target=False:  xlogy(target, target) - target * input
    log_target=True:   exp(target) * (target - input)

then reduces: ``none`` keeps the elements, ``sum`` / ``mean`` sum them (``mean`` divides by their
count), ``batchmean`` sums and divides by ``input.size(0)`` (not by the broadcast batch; no
division for a 0-dim input). The legacy keywords ``size_average`` / ``reduce`` override
``reduction`` (see :func:`lossd_client.layout.legacy_reduction`), but a ``reduction='batchmean'`` passed beside them
still divides the result, whatever it is, by ``input.size(0)`` exactly as torch does;
``'elementwise_mean'`` is a deprecated alias of ``'mean'``.

What torch accepts is decided by torch itself: dtypes, the reduction string and ``log_target`` by
calling ``F.kl_div`` on tiny tensors (0-dim where the operand is) with the request's dtypes and options (cached), which
also records the warnings torch emits for these options ('mean' is not the true KL divergence,
deprecated keywords); shapes by torch's broadcasting rule, with torch's own message. torch 2.13
warns about nothing shape related here: any broadcastable pair is accepted silently.

Evaluation (:func:`evaluate_kl_div_rows`) walks the broadcast output in blocks bounded by a byte
budget. When torch's result dtype is float32 or float64 (any pair that is not two half-precision
tensors of one dtype) each block runs torch's own operation sequence in the request's dtypes, so
every per-element loss is bit for bit torch's. When the result is float16 / bfloat16 both
operands are upcast to float32 block by block and computed there (float32 accumulation), then
rounded once to the output dtype. The float64 sum of the per-element losses (``loss_sum``) and the
reduction's denominator are kept apart, so chunks of one request and several requests combine
exactly: ``loss = loss_sum / denominator``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lossd_client.layout import KL_DIV, legacy_reduction
from lossd_client.reduction import accumulation_dtypes, quotient, total

from ._exact import HALF_DTYPES, divide, dtype_name, fsum, itemsize, to_compute
from .scratch import sum64, temporary, upcast
from .spec import DEFAULT_CHUNK_BYTES, InvalidDtype, InvalidInput

#: Reduction strings torch's kl_div takes ('elementwise_mean' is its deprecated alias of 'mean').
KL_DIV_REDUCTIONS = ("mean", "sum", "none", "batchmean")

__all__ = [
    "KL_DIV_REDUCTIONS",
    "KlDivPartial",
    "KlDivPlan",
    "KlDivResult",
    "divide",
    "evaluate_kl_div",
    "evaluate_kl_div_rows",
    "finish_kl_div",
    "legacy_reduction",
    "merge_kl_div_partials",
    "plan_kl_div",
]


@dataclass(frozen=True)
class KlDivPlan:
    """A validated ``kl_div`` call: everything but the tensor values.

    Rows are the positions along dim 0 of the broadcast output (a 0-dim output is one row). An
    operand whose dim 0 is the output's (``input_by_rows`` / ``target_by_rows``) is passed to
    :func:`evaluate_kl_div_rows` one row range at a time; an operand broadcast along dim 0 (fewer
    dims, or size 1 there while the output is larger) is passed whole with every row range.
    """

    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    target_shape: tuple[int, ...]
    target_dtype: torch.dtype
    log_target: bool
    #: The reduction torch's kernel applies: 'none', 'sum' or 'mean' (batchmean runs as 'sum').
    reduction: str
    #: ``input.size(0)`` when torch divides the reduced result by it (reduction='batchmean' and a
    #: non-0-dim input, legacy keywords or not), else None.
    batch_divisor: int | None
    #: Broadcast shape of input and target: the shape of the per-element losses.
    output_shape: tuple[int, ...]
    #: torch's result dtype (the promotion of the input and target dtypes).
    output_dtype: torch.dtype
    #: float32 when the output is half / bfloat16, else the output dtype.
    compute_dtype: torch.dtype
    #: The warnings torch emits for this call, in order (texts only).
    warnings: tuple[str, ...]
    rows: int
    input_by_rows: bool
    target_by_rows: bool
    #: Which operands are 0-dim in torch's call. torch ranks a 0-dim operand below a dimensioned one
    #: in type promotion, so it must reach the elementwise formula 0-dim, however it was viewed.
    scalar_operands: tuple[bool, bool] = (False, False)

    @property
    def row_elements(self) -> int:
        """Output elements per row."""
        return math.prod(self.output_shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.output_shape)

    @property
    def result_shape(self) -> tuple[int, ...]:
        """Shape of the tensor torch returns: the broadcast shape for 'none', else ()."""
        return self.output_shape if self.reduction == "none" else ()

    @property
    def denominator(self) -> float:
        """What ``loss_sum`` is divided by: numel for 'mean', 1 for 'sum' (and 'batchmean', which
        runs as 'sum'), each times the batch divisor when there is one. For 'none' it is the
        divisor every element is divided by (1 or the batch divisor)."""
        base = float(self.numel) if self.reduction == "mean" else 1.0
        return base * (self.batch_divisor if self.batch_divisor is not None else 1)

    @property
    def exact_elements(self) -> bool:
        """Per-element losses are computed by torch's own operation sequence (bit for bit torch's)."""
        return self.output_dtype not in HALF_DTYPES


@dataclass
class KlDivPartial:
    """Evaluation of output rows ``[row_start, row_stop)``."""

    row_start: int
    row_stop: int
    #: Reduction 'none': the losses of these rows, shaped ``(rows, *output_shape[1:])`` (the
    #: output shape itself for a 0-dim output), in the output dtype, batch divisor applied. Else None.
    losses: torch.Tensor | None
    #: float64 sum of the per-element losses (before any batch divisor).
    loss_sum: float
    #: Output elements evaluated.
    numel: int


@dataclass
class KlDivResult:
    """What torch returns (``loss``: value, shape and dtype) plus the exact float64 totals behind it."""

    loss: torch.Tensor
    loss_sum: float
    denominator: float
    numel: int
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- validation
@functools.lru_cache(maxsize=512)
def _probe(
    input_dtype: torch.dtype,
    target_dtype: torch.dtype,
    input_0d: bool,
    target_0d: bool,
    reduction: str | None,
    size_average: bool | None,
    reduce: bool | None,
    log_target: bool,
) -> tuple[torch.dtype, tuple[str, ...]]:
    """Call torch's kl_div on tiny tensors with these dtypes and options.

    Each probe tensor is 0-dim when the operand is (type promotion ranks a 0-dim tensor below a
    dimensioned one: a 0-dim float32 input with a float16 target gives float16), else 1-d.
    Returns torch's result dtype and the warnings it emitted; raises InvalidInput naming the
    field when torch rejects the call (torch checks the options first, then the dtypes).
    """
    x = torch.zeros(() if input_0d else 2, dtype=input_dtype)
    t = torch.zeros(() if target_0d else 2, dtype=target_dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = F.kl_div(x, t, size_average=size_average, reduce=reduce, reduction=reduction, log_target=log_target)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
            raise _probe_error(input_dtype, target_dtype, exc) from exc
    return out.dtype, tuple(str(w.message) for w in caught)


def _probe_error(input_dtype: torch.dtype, target_dtype: torch.dtype, exc: Exception) -> InvalidInput | InvalidDtype:
    text = str(exc).split("\n")[0]
    if isinstance(exc, ValueError) and "reduction" in text:
        return InvalidInput("options.reduction", f"{text} (expected one of {', '.join(KL_DIV_REDUCTIONS)})")
    if isinstance(exc, TypeError) and "log_target" in text:
        return InvalidInput("options.log_target", text)

    def unsupported(dtype: torch.dtype) -> bool:
        return not dtype.is_floating_point or dtype.is_complex or dtype.itemsize == 1

    field = "input" if unsupported(input_dtype) or not unsupported(target_dtype) else "target"
    dtype = input_dtype if field == "input" else target_dtype
    return InvalidDtype(field, f"dtype {dtype_name(dtype)} rejected by torch's kl_div: {text}")


def _broadcast(input_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """torch's broadcast of ``target`` (tensor a) with ``input`` (tensor b), with torch's CPU message."""
    ndim = max(len(input_shape), len(target_shape))
    out = [1] * ndim
    for i in range(ndim - 1, -1, -1):
        offset = ndim - 1 - i
        a = target_shape[len(target_shape) - 1 - offset] if offset < len(target_shape) else 1
        b = input_shape[len(input_shape) - 1 - offset] if offset < len(input_shape) else 1
        if a != b and a != 1 and b != 1:
            raise InvalidInput(
                "target",
                f"The size of tensor a ({a}) must match the size of tensor b ({b}) at non-singleton dimension {i}"
                f" (target shape {list(target_shape)} does not broadcast with input shape {list(input_shape)})",
            )
        out[i] = b if a == 1 else a
    _check_allocatable(out, f" (the broadcast of target shape {list(target_shape)} with input shape {list(input_shape)})")
    return tuple(out)


def _check_allocatable(sizes: list[int], context: str) -> None:
    """torch's checks as it allocates an output of ``sizes`` (which may hold no element): its
    storage size, a running product in uint64, then its contiguous strides in int64. Empty operands
    broadcast to [2**40, 2**40, 0] passed every other check and failed in the engine (INTERNAL)."""
    product = 1
    for size in sizes:
        product *= size
        if product >= 2**64:
            raise InvalidInput("target", f"Storage size calculation overflowed with sizes={sizes}{context}")
    stride = 1
    for size in reversed(sizes[1:]):
        stride *= max(size, 1)
        if stride >= 2**63:
            raise InvalidInput("target", f"Stride calculation overflowed{context}")


#: The reduction torch's kernel applies for a reduction string ('batchmean' runs as 'sum', then divides).
_KERNEL_REDUCTION = {"batchmean": "sum", "elementwise_mean": "mean"}


def plan_kl_div(
    input_shape: Sequence[int],
    input_dtype: torch.dtype,
    target_shape: Sequence[int],
    target_dtype: torch.dtype,
    *,
    reduction: str = "mean",
    log_target: bool = False,
    size_average: bool | None = None,
    reduce: bool | None = None,
) -> KlDivPlan:
    """Validate a kl_div call as torch would; raise InvalidInput naming the field where torch raises.

    Fields: ``options.reduction``, ``options.log_target``, ``options.size_average``,
    ``options.reduce``, ``input`` / ``target`` (dtype), ``target`` (shape not broadcastable).
    """
    input_shape = tuple(int(s) for s in input_shape)
    target_shape = tuple(int(s) for s in target_shape)
    for name, value in (("options.size_average", size_average), ("options.reduce", reduce)):
        if value is not None and not isinstance(value, bool):
            raise InvalidInput(name, f"expected a bool or None, got {type(value).__name__}")
    legacy = size_average is not None or reduce is not None
    if not legacy and not isinstance(reduction, str):
        raise InvalidInput("options.reduction", f"{reduction} is not a valid value for reduction")
    if not isinstance(log_target, bool):
        raise InvalidInput("options.log_target", f"kl_div(): argument 'log_target' must be bool, not {type(log_target).__name__}")
    probe_reduction = reduction if isinstance(reduction, str) else None
    output_dtype, warned = _probe(
        input_dtype, target_dtype, len(input_shape) == 0, len(target_shape) == 0, probe_reduction, size_average, reduce, log_target
    )
    output_shape = _broadcast(input_shape, target_shape)

    effective = legacy_reduction(size_average, reduce) if legacy else _KERNEL_REDUCTION.get(reduction, reduction)
    batch_divisor = input_shape[0] if reduction == "batchmean" and len(input_shape) != 0 else None

    ndim = len(output_shape)

    def by_rows(shape: tuple[int, ...]) -> bool:
        return ndim >= 1 and len(shape) == ndim and shape[0] == output_shape[0]

    return KlDivPlan(
        scalar_operands=(not input_shape, not target_shape),
        input_shape=input_shape,
        input_dtype=input_dtype,
        target_shape=target_shape,
        target_dtype=target_dtype,
        log_target=log_target,
        reduction=effective,
        batch_divisor=batch_divisor,
        output_shape=output_shape,
        output_dtype=output_dtype,
        compute_dtype=torch.float32 if output_dtype in HALF_DTYPES else output_dtype,
        warnings=warned,
        rows=output_shape[0] if ndim else 1,
        input_by_rows=by_rows(input_shape),
        target_by_rows=by_rows(target_shape),
    )


# ---------------------------------------------------------------------------- evaluation
def _blocks(shape: tuple[int, ...], budget: int) -> Iterator[tuple[slice, ...]]:
    """Index tuples of blocks covering a tensor of ``shape``, each at most ``budget`` elements
    where possible: runs of leading-dim positions, or, when one position is larger than the
    budget, single positions split further along the next dims (innermost: runs of elements)."""
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    if inner <= budget or len(shape) == 1:
        step = max(1, budget // max(1, inner))
        for a in range(0, shape[0], step):
            yield (slice(a, min(shape[0], a + step)),)
        return
    for i in range(shape[0]):
        for rest in _blocks(shape[1:], budget):
            yield (slice(i, i + 1), *rest)


def _operand_block(operand: torch.Tensor, out_ndim: int, index: tuple[slice, ...]) -> torch.Tensor:
    """The part of a (right-aligned, broadcast) operand that a block ``index`` of the output reads."""
    lead = out_ndim - operand.dim()
    parts = []
    for d in range(operand.dim()):
        s = index[lead + d] if lead + d < len(index) else slice(None)
        parts.append(slice(0, 1) if operand.shape[d] == 1 else s)
    return operand[tuple(parts)]


def _elementwise(plan: KlDivPlan, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """torch's kl_div elements (aten::kl_div's formula, in the same operation order, with the
    operands 0-dim where torch's were: that decides the dtype each operation runs in)."""
    x, t = (v.reshape(-1)[:1].reshape(()) if scalar and v.dim() else v for v, scalar in zip((x, t), plan.scalar_operands, strict=True))
    # operands of one shape and dtype: the products go into this thread's scratch buffers
    alike = x.shape == t.shape and x.dtype == t.dtype
    a = temporary("kl_div.a", x) if alike else None
    b = temporary("kl_div.b", x) if alike else None
    if plan.log_target:
        return torch.mul(torch.exp(t, out=a), torch.sub(t, x, out=b), out=a)
    return torch.sub(torch.xlogy(t, t, out=a), torch.mul(t, x, out=b), out=a)


def _in_float32(name: str, v: torch.Tensor, device) -> torch.Tensor:
    if v.device.type == "cpu" and torch.device(device).type == "cpu":
        return upcast(v, torch.float32, reuse=True, name=name)
    return to_compute(v, torch.float32, device)


def evaluate_kl_div_rows(
    plan: KlDivPlan,
    input: torch.Tensor,
    target: torch.Tensor,
    row_start: int = 0,
    *,
    device: torch.device | str = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> KlDivPartial:
    """Evaluate the output rows ``[row_start, row_start + n)``.

    ``input`` / ``target`` are the operands restricted to those rows when the plan says they go
    by rows (``input[row_start:row_start + n]``), whole otherwise. The work is split into blocks
    of about ``chunk_bytes`` bytes of compute-dtype elements, so half-precision operands are
    upcast one block at a time. Raises InvalidInput if a chunk does not fit the plan.
    """
    n = _check_chunk(plan, input, target, row_start)
    out_ndim = len(plan.output_shape)
    chunk_shape = (n, *plan.output_shape[1:]) if out_ndim else ()
    numel = math.prod(chunk_shape)
    losses = torch.empty(chunk_shape, dtype=plan.output_dtype) if plan.reduction == "none" else None
    budget = max(1, chunk_bytes // itemsize(plan.compute_dtype))
    sums = []
    for index in _blocks(chunk_shape, budget):
        x = _operand_block(input, out_ndim, index)
        t = _operand_block(target, out_ndim, index)
        if plan.exact_elements:
            block = _elementwise(plan, x.to(device), t.to(device))
        else:
            block = _elementwise(plan, _in_float32("kl_div.input", x, device), _in_float32("kl_div.target", t, device))
        block_shape = tuple(s.stop - s.start for s in index) + chunk_shape[len(index) :]
        block = block.expand(block_shape)  # only when both operands are broadcast along a dim
        sums.append(sum64(block))
        if losses is not None:
            if plan.batch_divisor is not None:
                block = block / plan.batch_divisor
            losses[index] = block  # the converting copy rounds as block.to(output_dtype) does
    return KlDivPartial(row_start, row_start + n, losses, fsum(sums), numel)


def _check_chunk(plan: KlDivPlan, input: torch.Tensor, target: torch.Tensor, row_start: int) -> int:
    n = None
    for name, t, shape, dtype, by_rows in (
        ("input", input, plan.input_shape, plan.input_dtype, plan.input_by_rows),
        ("target", target, plan.target_shape, plan.target_dtype, plan.target_by_rows),
    ):
        if t.dtype != dtype:
            raise InvalidInput(name, f"chunk dtype {dtype_name(t.dtype)} differs from the request's {dtype_name(dtype)}")
        if by_rows:
            if t.dim() != len(shape) or tuple(t.shape[1:]) != shape[1:]:
                raise InvalidInput(name, f"chunk shape {list(t.shape)} does not hold rows of shape {list(shape[1:])}")
            if n is not None and t.shape[0] != n:
                raise InvalidInput(name, f"chunk has {t.shape[0]} rows, the other operand's chunk {n}")
            n = t.shape[0]
        elif tuple(t.shape) != shape:
            raise InvalidInput(name, f"an operand broadcast along dim 0 travels whole: expected shape {list(shape)}, got {list(t.shape)}")
    if n is None:  # 0-dim output: one row, both operands whole
        n = plan.rows
    if row_start < 0 or row_start + n > plan.rows:
        raise InvalidInput("input", f"rows [{row_start}, {row_start + n}) are outside the output's {plan.rows} rows")
    return n


def merge_kl_div_partials(parts: Sequence[KlDivPartial]) -> KlDivPartial:
    """Concatenate partials of consecutive row ranges (in order)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    losses = None if first.losses is None else torch.cat([p.losses for p in parts])
    return KlDivPartial(
        first.row_start,
        parts[-1].row_stop,
        losses,
        fsum([p.loss_sum for p in parts]),
        sum(p.numel for p in parts),
    )


def finish_kl_div(plan: KlDivPlan, partial: KlDivPartial) -> KlDivResult:
    """Turn the partial covering every row into what torch returns."""
    if (partial.row_start, partial.row_stop) != (0, plan.rows):
        raise ValueError(f"partial covers rows [{partial.row_start}, {partial.row_stop}), not [0, {plan.rows})")
    if plan.reduction == "none":
        loss = partial.losses.reshape(plan.output_shape)
    else:
        # 'mean' sums in float32 for 16-bit floats (at::mean), 'sum' (and 'batchmean') in the output dtype
        acc = accumulation_dtypes(KL_DIV, dtype_name(plan.output_dtype), plan.reduction)
        value = quotient(total(partial.loss_sum, KL_DIV), plan.denominator, *acc)  # a zero sum is +0.0, as torch's
        loss = torch.tensor(value, dtype=torch.float64).to(plan.output_dtype)
    return KlDivResult(loss, partial.loss_sum, plan.denominator, partial.numel, plan.warnings)


def evaluate_kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    log_target: bool = False,
    *,
    device: torch.device | str = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> KlDivResult:
    """``F.kl_div(input, target, size_average, reduce, reduction, log_target)``: validate and evaluate."""
    plan = plan_kl_div(
        input.shape,
        input.dtype,
        target.shape,
        target.dtype,
        reduction=reduction,
        log_target=log_target,
        size_average=size_average,
        reduce=reduce,
    )
    partial = evaluate_kl_div_rows(plan, input, target, 0, device=device, chunk_bytes=chunk_bytes)
    return finish_kl_div(plan, partial)
