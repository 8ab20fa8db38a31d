"""Torch-parity validation: a request becomes a :class:`~.plan.Plan` or an InvalidInput.

Each check mirrors one of torch's own (with its message where torch has one); what torch
accepts is accepted. Checks run in torch's order so that a request with several problems is
told about the one torch would report.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from lossd_client.layout import default_class_axis

from .dtypes import output_dtype, probed_output_dtype
from .geometry import Geometry, class_axis_of, torch_layout
from .kernels import target_totals
from .plan import Plan
from .spec import BCE_WITH_LOGITS, CROSS_ENTROPY, EXTRAS, LOSSES, NLL, REDUCTIONS, InvalidInput, LossSpec, TargetKind, dtype_name


def _shape(shape: Sequence[int]) -> list[int]:
    return list(shape)


def _torch_size(shape: Sequence[int]) -> str:
    return f"torch.Size({list(shape)})"


def build_plan(
    spec: LossSpec,
    input_shape: tuple[int, ...],
    input_dtype: torch.dtype,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    *,
    target_streamed: bool = False,
) -> Plan:
    """Validate a request as torch would (``target`` may be a meta tensor when it is streamed).

    Everything but the class-index target values depends only on the options, shapes and dtypes:
    a plan validated for the same combination before is reused from a bounded cache (a template),
    and only the targets are resolved and checked (see :class:`_Templates`).
    """
    key = _TEMPLATES.key(spec, input_shape, input_dtype, target, weight, pos_weight, target_streamed)
    template = _TEMPLATES.get(key)
    if template is not None:
        return _from_template(template, target, weight, pos_weight)
    plan = _validate(spec, input_shape, input_dtype, target, weight, pos_weight, target_streamed)
    _TEMPLATES.put(key, plan, target, weight, pos_weight)
    return plan


def _validate(spec, input_shape, input_dtype, target, weight, pos_weight, target_streamed) -> Plan:
    if spec.loss not in LOSSES:
        raise InvalidInput("options.loss", f"unknown loss {spec.loss!r}")
    if spec.reduction not in REDUCTIONS:
        raise InvalidInput("options.reduction", f"{spec.reduction!r} is not a valid value for reduction")
    for extra in spec.extras:
        if extra not in EXTRAS:
            raise InvalidInput("options.extras", f"unknown extra {extra!r}; expected one of {', '.join(EXTRAS)}")
    if spec.loss == BCE_WITH_LOGITS:
        return _bce(spec, input_shape, input_dtype, target, weight, pos_weight)
    if pos_weight is not None:
        raise InvalidInput("options.pos_weight", f"only binary_cross_entropy_with_logits takes pos_weight, not {spec.loss}")
    if spec.loss == NLL and spec.label_smoothing != 0.0:
        raise InvalidInput("options.label_smoothing", "nll_loss has no label_smoothing; use cross_entropy")
    if not input_shape:
        if spec.loss == NLL:
            raise InvalidInput("input", "Expected 1 or more dimensions (got 0)")
        raise InvalidInput("input", "expected an input with a class axis ((C), (N, C) or (N, C, d1, ...)), got a 0-dim tensor")
    class_axis = class_axis_of(input_shape, spec.class_axis)
    tshape = tuple(target.shape)
    torch_target = torch_layout(tshape, class_axis) if len(tshape) == len(input_shape) else tshape
    # torch treats input and target of equal shape as class probabilities (cross_entropy)
    if spec.loss == CROSS_ENTROPY and torch_target == torch_layout(input_shape, class_axis):
        return _prob(spec, input_shape, input_dtype, target, weight, class_axis)
    return _class(spec, input_shape, input_dtype, target, weight, class_axis, target_streamed)


def _check_label_smoothing(spec: LossSpec) -> None:
    if spec.label_smoothing > 1.0:
        raise InvalidInput("options.label_smoothing", f"label_smoothing must be between 0.0 and 1.0. Got: {spec.label_smoothing:g}")


def _check_weight(weight: torch.Tensor | None, num_classes: int, prob: bool, ndim: int = 1) -> None:
    """torch's class-weight check: C elements, on one axis, except for class indices of an input
    with 3 or more axes, where torch (nll_loss2d) checks only the number of elements: a (1, C) or
    (C, 1) weight is then its C values in order (see :func:`_check_smoothed_weight` for what
    label smoothing adds). The number of axes is the input's in any layout: classes on another
    axis (class_axis) stand for the same call with them moved to dim 1, which has as many."""
    if weight is None or (weight.numel() == num_classes and (weight.dim() == 1 or (not prob and ndim >= 3))):
        return
    prefix = "cross_entropy: " if prob else ""
    raise InvalidInput(
        "options.weight",
        f"{prefix}weight tensor should be defined either for all {num_classes} classes or no classes but got weight tensor of shape: "
        f"{_shape(weight.shape)}",
    )


def _check_smoothed_weight(spec: LossSpec, weight: torch.Tensor | None, num_classes: int, ndim: int, counted: int) -> None:
    """What torch's label smoothing asks of a class weight that is not 1-d (only inputs with 3 or
    more axes get here): it views the weight as (1, weight.size(0), 1, ...), and for 'mean'
    gathers the weights of the counted targets along its first axis, which a weight with more
    axes fails as soon as one target counts. Checked where torch does, after the targets."""
    if weight is None or weight.dim() == 1 or spec.smoothing == 0.0:
        return
    view = "with label_smoothing > 0, torch views the class weight as [1, weight.size(0), 1, ...]"
    if weight.dim() == 0:
        raise InvalidInput("options.weight", f"Dimension specified as 0 but tensor has no dimensions ({view})")
    if weight.shape[0] != num_classes:
        shape = [1] * ndim
        shape[1] = weight.shape[0]
        raise InvalidInput(
            "options.weight",
            f"shape '{shape}' is invalid for input of size {weight.numel()} ({view}: its first axis must hold the {num_classes} classes)",
        )
    if spec.reduction == "mean" and counted:
        raise InvalidInput(
            "options.weight",
            "Index tensor must have the same number of dimensions as input tensor (with label_smoothing > 0 and reduction "
            "'mean', torch gathers the weights of the counted targets from the class weight along its first axis, which takes a "
            f"1-d weight; got weight tensor of shape: {_shape(weight.shape)})",
        )


def _dtypes(spec, kind, geometry, input_dtype, target, weight, pos_weight) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype, compute dtype): float64 is computed in float64, everything else in float32."""
    as_torch = kind is TargetKind.BCE or (geometry.class_axis == default_class_axis(len(geometry.input_shape)) and not spec.shift_targets)
    out = output_dtype(spec, kind, geometry.input_shape, input_dtype, target, weight, pos_weight, torch_layout=as_torch)
    return out, torch.float64 if out == torch.float64 else torch.float32


def _prob(spec, input_shape, input_dtype, target, weight, class_axis) -> Plan:
    if spec.ignore_index >= 0:
        raise InvalidInput("options.ignore_index", "ignore_index is not supported for floating point target (class probabilities)")
    _check_label_smoothing(spec)
    if not target.dtype.is_floating_point:
        raise InvalidInput("target", f"Expected floating point type for target with class probabilities, got {dtype_name(target.dtype)}")
    if spec.shift_targets:
        raise InvalidInput("options.shift_targets", "needs class-index targets, got class probabilities")
    if spec.extras or spec.sequence_stats:
        raise InvalidInput("options.extras", "extras and sequence statistics need class-index targets, got class probabilities")
    geometry = Geometry.of(input_shape, TargetKind.PROB, class_axis)
    _check_weight(weight, geometry.num_classes, prob=True)
    out, compute = _dtypes(spec, TargetKind.PROB, geometry, input_dtype, target, weight, None)
    output_shape = tuple(s for i, s in enumerate(input_shape) if i != class_axis)
    return Plan(spec, TargetKind.PROB, geometry, input_dtype, tuple(target.shape), target.dtype, output_shape, out, compute, weight)


def _class_output_shape(spec: LossSpec, input_shape, tshape, class_axis) -> tuple[int, ...]:
    """The shape torch expects of class-index targets (and gives 'none' losses); InvalidInput otherwise."""
    ndim = len(input_shape)
    if ndim == 1:
        if len(tshape) > 1:
            raise InvalidInput("target", f"0D or 1D target tensor expected, multi-target not supported, got {len(tshape)}D")
        if len(tshape) == 1 and tshape[0] != 1:
            raise InvalidInput("target", f"For 1D input, 1D target must have size 1, but got target size: {tshape[0]}")
        if len(tshape) == 1 and spec.label_smoothing > 0:
            raise InvalidInput(
                "target",
                "output with shape [] doesn't match the broadcast shape [1] (torch rejects a (1,) target for 1-d input with label_smoothing > 0)",
            )
        return ()
    expected = tuple(s for i, s in enumerate(input_shape) if i != class_axis)
    if ndim == 2 and class_axis == 1:
        if len(tshape) > 1:
            raise InvalidInput(
                "target", f"0D or 1D target tensor expected, multi-target not supported, got {len(tshape)}D shape {_shape(tshape)}"
            )
        tn = tshape[0] if tshape else 0
        if tn != input_shape[0]:
            raise InvalidInput("target", f"Expected input batch_size ({input_shape[0]}) to match target batch_size ({tn}).")
    elif tshape != expected:
        if len(tshape) >= 1 and len(tshape) == ndim - 1 and tshape[0] != expected[0] and class_axis == 1:
            raise InvalidInput("target", f"Expected input batch_size ({input_shape[0]}) to match target batch_size ({tshape[0]}).")
        raise InvalidInput("target", f"Expected target size {_shape(expected)}, got {_shape(tshape)}")
    return expected


def _check_class_layout(spec: LossSpec, input_shape, tshape, target_dtype, class_axis) -> None:
    """Two of torch's layout rules for class indices with spatial dimensions."""
    ndim = len(input_shape)
    if ndim == 3 and class_axis == 1 and input_shape[1] == 0 and math.prod(tshape) > 0:
        # torch views (N, 0, d) as 4-d with an inferred size, which fails for C = 0
        raise InvalidInput(
            "input",
            f"size mismatch (got input: {_shape(input_shape)} with 0 classes, target: {_shape(tshape)}); torch cannot evaluate a 3-d input with C = 0",
        )
    if ndim >= 3 and target_dtype == torch.uint8 and (math.prod(tshape) > 0 or spec.reduction == "none"):
        # torch's nll_loss2d path (inputs with spatial dims) takes int64 targets only
        # (an empty batch with mean / sum returns before the dtype check)
        raise InvalidInput(
            "target", "expected scalar type Long but found Byte (uint8 class indices are accepted only for (C) and (N, C) inputs, as torch)"
        )


def _class(spec, input_shape, input_dtype, target, weight, class_axis, target_streamed) -> Plan:
    _check_label_smoothing(spec)
    if target_streamed:
        raise InvalidInput("target", "class-index targets travel whole in the chunk header")
    tshape = tuple(target.shape)
    output_shape = _class_output_shape(spec, input_shape, tshape, class_axis)
    geometry = Geometry.of(input_shape, TargetKind.CLASS, class_axis)
    _check_weight(weight, geometry.num_classes, prob=False, ndim=len(input_shape))
    shaped, weight = weight, _as_vector(weight)
    _check_class_layout(spec, input_shape, tshape, target.dtype, class_axis)
    out, compute = _dtypes(spec, TargetKind.CLASS, geometry, input_dtype, target, weight, None)
    flat, valid = _resolve_targets(spec, target, geometry.num_classes)
    seq_len = tshape[-1] if tshape else 1
    weight_sum, counted = target_totals(flat, valid, weight, compute)
    _check_smoothed_weight(spec, shaped, geometry.num_classes, len(input_shape), counted)
    return Plan(
        spec,
        TargetKind.CLASS,
        geometry,
        input_dtype,
        tshape,
        target.dtype,
        output_shape,
        out,
        compute,
        weight,
        None,
        flat,
        valid,
        seq_len,
        weight_sum,
        counted,
    )


def _as_vector(weight: torch.Tensor | None) -> torch.Tensor | None:
    """An accepted class weight as the (C,) vector of its values, which is how torch uses one of
    any shape (a view of a contiguous one, as decoded weights are)."""
    return weight if weight is None or weight.dim() == 1 else weight.reshape(-1)


def class_target_nbytes(elements: int, *, int64: bool, shift: bool, weighted: bool = False) -> int:
    """The most memory decoding class-index targets takes beside the targets it is given, in bytes:
    :func:`_resolve_targets`' int64 copy of narrower targets (uint8: 8x their bytes), the shifted
    copy, the not-ignored mask and what finding the first target out of range takes (three masks
    and the positions); with class weights, what :func:`kernels.target_totals` makes to sum them
    (the gathered weights, their masked copy and its float64 scratch, the index copy). A server
    reserves it before decoding, from the target's wire header alone."""
    per_target = 8 * ((not int64) + shift) + 1 + 3 + 8
    if weighted:
        per_target += 8 + 8 + 8 + 8 + 1
    return elements * per_target


def _resolve_targets(spec: LossSpec, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat int64 class targets (shifted for causal LM scoring) and their not-ignored mask;
    InvalidInput naming the first target out of [0, C) that is not ignore_index."""
    tshape = tuple(target.shape)
    flat = target.reshape(-1)
    if flat.dtype != torch.int64:
        flat = flat.to(torch.int64)
    ignore = spec.ignore_index
    if spec.shift_targets:
        if not tshape:
            raise InvalidInput("options.shift_targets", "needs a target with a sequence axis, got a 0-dim target")
        t2 = flat.reshape(-1, tshape[-1]) if tshape[-1] > 0 else flat.reshape(0, 0)
        shifted = torch.full_like(t2, ignore)
        shifted[:, :-1] = t2[:, 1:]
        flat = shifted.reshape(-1)
    valid = flat != ignore
    if flat.numel() and not _all_within(flat, num_classes):
        bad = valid & ((flat < 0) | (flat >= num_classes))
        if bool(bad.any()):
            first = int(flat[bad.nonzero()[0, 0]])
            raise InvalidInput(
                "target", f"Target {first} is out of bounds. (expected class indices in [0, {num_classes}) or ignore_index {ignore})"
            )
    return flat, valid


def _all_within(values: torch.Tensor, upper: int) -> bool:
    """Every value in [0, upper): the common case, checked with one reduction."""
    low, high = torch.aminmax(values)
    return int(low) >= 0 and int(high) < upper


def _bce(spec, input_shape, input_dtype, target, weight, pos_weight) -> Plan:
    if spec.ignore_index != -100:  # torch raises TypeError for it; -100 is what an unset one means (as for kl_div)
        raise InvalidInput(
            "options.ignore_index",
            "binary_cross_entropy_with_logits() got an unexpected keyword argument 'ignore_index' (it takes weight, reduction and pos_weight only)",
        )
    tshape = tuple(target.shape)
    if tshape != input_shape:
        raise InvalidInput("target", f"Target size ({_torch_size(tshape)}) must be the same as input size ({_torch_size(input_shape)})")
    if spec.class_axis is not None or spec.shift_targets or spec.extras or spec.sequence_stats:
        raise InvalidInput("options", "class_axis, shift_targets, extras and sequence_stats apply to cross_entropy / nll_loss only")
    if spec.label_smoothing != 0.0:
        raise InvalidInput("options.label_smoothing", "binary_cross_entropy_with_logits has no label_smoothing")
    for name, w in (("options.weight", weight), ("options.pos_weight", pos_weight)):
        if w is None:
            continue
        try:
            b = broadcast_shapes(tuple(w.shape), input_shape)
        except RuntimeError as exc:
            raise InvalidInput(
                name, f"shape {_shape(w.shape)} is not broadcastable to the input shape {_shape(input_shape)}: {exc}"
            ) from None
        if tuple(b) != input_shape:
            raise InvalidInput(name, f"output with shape {_shape(input_shape)} doesn't match the broadcast shape {_shape(b)}")
    geometry = Geometry.of(input_shape, TargetKind.BCE, 0)
    out, compute = _dtypes(spec, TargetKind.BCE, geometry, input_dtype, target, weight, pos_weight)
    return Plan(spec, TargetKind.BCE, geometry, input_dtype, tshape, target.dtype, input_shape, out, compute, weight, pos_weight)


class _Templates:
    """A bounded LRU of validated plans by everything validation depends on except the tensors'
    values; only plans whose validation could not have depended on values are kept: inputs with
    elements (empty ones are checked by torch on the real tensors), and dtype combinations torch
    accepts for any target values (not only when every target is ignored)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()

    @staticmethod
    def key(spec, input_shape, input_dtype, target, weight, pos_weight, target_streamed) -> tuple | None:
        if not math.prod(input_shape) or target.device.type == "meta":
            return None
        if weight is not None and weight.dim() != 1 and spec.loss != BCE_WITH_LOGITS:
            return None  # a class weight that is not 1-d: the targets may decide (see _check_smoothed_weight)
        metas = tuple(None if w is None else (tuple(w.shape), w.dtype) for w in (weight, pos_weight))
        return (spec, input_shape, input_dtype, tuple(target.shape), target.dtype, metas, target_streamed)

    def get(self, key: tuple | None) -> Plan | None:
        if key is None or key not in self._plans:
            return None
        self._plans.move_to_end(key)
        return self._plans[key]

    def put(self, key: tuple | None, plan: Plan, target, weight, pos_weight) -> None:
        if key is None or not _valid_for_any_targets(plan, target, weight, pos_weight):
            return
        self._plans[key] = dataclasses.replace(plan, weight=None, pos_weight=None, target=None, valid=None)
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)


_TEMPLATES = _Templates()


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """``torch.broadcast_shapes`` of int shapes, with its errors and their texts, without importing
    ``torch._refs`` where it lives (33 MB of the server's memory, and 0.2 s of the event loop on the
    first request with a broadcast weight)."""
    common = [1] * max(len(shape) for shape in shapes)
    for arg_idx, shape in enumerate(shapes):
        for idx in range(-1, -1 - len(shape), -1):
            if shape[idx] == common[idx]:
                continue
            if common[idx] == 1:
                if shape[idx] < 0:
                    raise ValueError("Attempting to broadcast a dimension with negative length!")
                common[idx] = shape[idx]
            if shape[idx] != 1 and common[idx] != shape[idx]:
                raise RuntimeError(
                    f"Attempting to broadcast a dimension of length {shape[idx]} at {idx}! Mismatching argument at index "
                    f"{arg_idx} had {shape}; but expected shape should be broadcastable to {common}"
                )
    return tuple(common)


def _valid_for_any_targets(plan: Plan, target, weight, pos_weight) -> bool:
    """Whether torch accepts these dtypes whatever the targets (the plain dtype probe passes)."""
    if plan.kind is not TargetKind.CLASS:
        return True
    try:
        probed_output_dtype(
            plan.spec.loss, plan.kind, plan.input_dtype, target.dtype, None if weight is None else weight.dtype, None,
            plan.spec.label_smoothing > 0.0, plan.spec.reduction,
        )  # fmt: skip
    except InvalidInput:
        return False
    return True


def _from_template(template: Plan, target: torch.Tensor, weight, pos_weight) -> Plan:
    """The cached plan with this request's tensors: class-index targets resolved and checked."""
    t = template
    if t.kind is not TargetKind.CLASS:
        flat = valid = None
        weight_sum, counted = 0.0, 0
    else:
        flat, valid = _resolve_targets(t.spec, target, t.num_classes)
        weight_sum, counted = target_totals(flat, valid, weight, t.compute_dtype)
    # positional: dataclasses.replace() cost a third of a cached validation
    return Plan(
        t.spec, t.kind, t.geometry, t.input_dtype, t.target_shape, t.target_dtype, t.output_shape, t.output_dtype,
        t.compute_dtype, weight, pos_weight, flat, valid, t.seq_len, weight_sum, counted,
    )  # fmt: skip
