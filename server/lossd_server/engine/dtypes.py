"""torch's dtype rules, learnt from torch itself on tiny tensors.

Which target dtypes a loss accepts, when weights must match the input, how BCE promotes: those
rules live in torch's kernels, and probing them is the only way to match them exactly. Probes
are cached by the dtypes and flags that decide them.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .spec import CLASS_TARGET_DTYPES, FLOAT_DTYPES, NLL, InvalidDtype, InvalidInput, LossSpec, TargetKind, dtype_name

_TORCH_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError)


@functools.cache
def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@functools.lru_cache(maxsize=512)
def probed_output_dtype(
    loss: str,
    kind: TargetKind,
    input_dtype: torch.dtype,
    target_dtype: torch.dtype,
    weight_dtype: torch.dtype | None,
    pos_weight_dtype: torch.dtype | None,
    label_smoothing_on: bool,
    reduction: str = "mean",
    ignored_target: int | None = None,
) -> torch.dtype:
    """Run torch itself on one-element tensors of these dtypes; torch's output dtype.

    Raises InvalidInput with torch's own message when torch rejects the combination.
    ``ignored_target``: probe with a target that is ignored (ignore_index), for requests whose
    every target is ignored: torch skips some dtype checks when nothing is gathered.
    """
    x = torch.zeros(1, 2, dtype=input_dtype)
    w = None if weight_dtype is None else torch.ones(2, dtype=weight_dtype)
    try:
        if kind is TargetKind.BCE:
            x1 = torch.zeros(2, dtype=input_dtype)
            t1 = torch.zeros(2, dtype=target_dtype)
            w1 = None if weight_dtype is None else torch.ones(2, dtype=weight_dtype)
            pw = None if pos_weight_dtype is None else torch.ones(2, dtype=pos_weight_dtype)
            out = F.binary_cross_entropy_with_logits(x1, t1, weight=w1, pos_weight=pw)
        elif kind is TargetKind.PROB:
            out = F.cross_entropy(x, torch.zeros(1, 2, dtype=target_dtype), weight=w)
        else:
            t = torch.zeros(1, dtype=target_dtype)
            ignore = -100
            if ignored_target is not None:
                t.fill_(ignored_target)
                ignore = ignored_target
            if loss == NLL:
                out = F.nll_loss(x, t, weight=w, ignore_index=ignore)
            else:
                ls = 0.5 if label_smoothing_on else 0.0
                out = F.cross_entropy(x, t, weight=w, ignore_index=ignore, label_smoothing=ls, reduction=reduction)
    except _TORCH_ERRORS as exc:
        raise _dtype_error(kind, input_dtype, target_dtype, weight_dtype, pos_weight_dtype, exc) from exc
    return out.dtype


def _dtype_error(kind, input_dtype, target_dtype, weight_dtype, pos_weight_dtype, exc) -> InvalidDtype:
    text = str(exc).split("\n")[0]
    if input_dtype not in FLOAT_DTYPES:
        return InvalidDtype(
            "input", f"expected a floating dtype (float32, float64, float16, bfloat16), got {dtype_name(input_dtype)} ({text})"
        )
    if kind is TargetKind.CLASS and target_dtype not in CLASS_TARGET_DTYPES:
        return InvalidDtype("target", f"expected class indices of dtype int64 or uint8 (as torch), got {dtype_name(target_dtype)} ({text})")
    if kind is TargetKind.PROB and not target_dtype.is_floating_point:
        return InvalidDtype("target", f"expected a floating dtype for class probabilities, got {dtype_name(target_dtype)} ({text})")
    if weight_dtype is not None and ("weight" in text or "scalar type" in text) and kind is not TargetKind.BCE:
        return InvalidDtype(
            "options.weight", f"expected dtype {dtype_name(input_dtype)} like the input, got {dtype_name(weight_dtype)} ({text})"
        )
    if kind is TargetKind.BCE and not target_dtype.is_floating_point:
        return InvalidDtype("target", f"expected a floating dtype for BCE targets, got {dtype_name(target_dtype)} ({text})")
    field = "options.pos_weight" if pos_weight_dtype is not None and kind is TargetKind.BCE else "options.weight"
    return InvalidDtype(field if weight_dtype or pos_weight_dtype else "input", f"dtype combination rejected by torch: {text}")


def output_dtype(spec: LossSpec, kind: TargetKind, input_shape: tuple[int, ...], input_dtype: torch.dtype, target: torch.Tensor,
                 weight: torch.Tensor | None, pos_weight: torch.Tensor | None, *, torch_layout: bool) -> torch.dtype:  # fmt: skip
    """torch's output dtype for this request, or InvalidInput when torch rejects its dtypes.

    ``torch_layout``: the input is in torch's own (N, C, ...) layout, so that an empty input can
    be given to torch as it is (torch skips some dtype checks when there is nothing to compute).
    """
    if _numel(input_shape) == 0 and torch_layout and target.device.type != "meta":
        return _empty_output_dtype(spec, kind, input_shape, input_dtype, target, weight, pos_weight)
    probe = _probe(spec, kind, input_dtype, target, weight, pos_weight)
    try:
        return probe()
    except InvalidInput:
        ignored = _all_ignored_value(spec, kind, target)
        if ignored is None:
            raise
        return probe(ignored)


def _probe(spec: LossSpec, kind: TargetKind, input_dtype: torch.dtype, target, weight, pos_weight) -> functools.partial:
    return functools.partial(
        probed_output_dtype,
        spec.loss,
        kind,
        input_dtype,
        target.dtype,
        None if weight is None else weight.dtype,
        None if pos_weight is None else pos_weight.dtype,
        spec.label_smoothing > 0.0,
        spec.reduction,
    )


def _all_ignored_value(spec: LossSpec, kind: TargetKind, target: torch.Tensor) -> int | None:
    """ignore_index, when it fits the target dtype and every class target equals it."""
    ignore = spec.ignore_index
    if kind is not TargetKind.CLASS or target.device.type == "meta" or spec.shift_targets or not target.numel():
        return None
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        return None
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore <= info.max:
        return None
    return ignore if bool((target == ignore).all()) else None


def _empty_output_dtype(spec, kind, input_shape, input_dtype, target, weight, pos_weight) -> torch.dtype:
    """Empty inputs: torch itself on the real (empty) tensors, shrunk (see :func:`small_empties`)."""
    probe = _probe(spec, kind, input_dtype, target, weight, pos_weight)
    x, target, weight, pos_weight = small_empties(torch.empty(input_shape, dtype=input_dtype), target, weight, pos_weight)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind is TargetKind.BCE:
                out = F.binary_cross_entropy_with_logits(x, target, weight, reduction=spec.reduction, pos_weight=pos_weight)
            elif spec.loss == NLL:
                out = F.nll_loss(x, target, weight, ignore_index=spec.ignore_index, reduction=spec.reduction)
            else:
                out = F.cross_entropy(
                    x, target, weight, ignore_index=spec.ignore_index, reduction=spec.reduction, label_smoothing=spec.label_smoothing
                )
    except _TORCH_ERRORS as exc:
        probe()  # a dtype problem: raises with a precise message
        text = str(exc).split("\n")[0]
        raise InvalidInput("target" if kind is TargetKind.CLASS else "input", f"rejected by torch: {text}") from exc
    return out.dtype


def small_empties(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors, with every zero-element one replaced by an empty tensor of the same dtype
    whose sizes above those of the other tensors are small stand-ins (equal sizes get equal
    stand-ins, larger sizes larger ones), so torch's shape checks give the same verdict.

    torch's own empty-input paths walk leading dimensions: an empty (2**34, 5, 0) input took
    torch 2.4 s; a tensor with elements has sizes bounded by the bytes that were sent.
    """
    kept = [d for t in tensors if t is not None and t.numel() for d in t.shape]
    floor = max([64, *kept]) + 1
    big = sorted({d for t in tensors if t is not None and not t.numel() for d in t.shape if d >= floor})
    stand_in = {d: floor + i for i, d in enumerate(big)}
    return [t if t is None or t.numel() else torch.empty(tuple(stand_in.get(d, d) for d in t.shape), dtype=t.dtype) for t in tensors]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
