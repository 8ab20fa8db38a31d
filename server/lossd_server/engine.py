"""Loss evaluation with exact torch.nn.functional semantics. Pure torch: no gRPC, no asyncio.

A request becomes a :class:`Plan` once its shapes, dtypes, options and (class-index) target
values have been validated exactly as torch validates them. The input itself is only read by
:meth:`Plan.evaluate_units`, which walks it in *units*: the leading positions before the class
axis (one row of C logits when the classes are the last axis; one (C, d1..dk) slab for torch's
(N, C, d1..dk) layout; one leading slice for BCE). Units are evaluated in chunks sized from a byte
budget, so half-precision input is upcast one chunk at a time and no full-size float32 copy or
full-size log_softmax is ever materialised. Per-element losses, their float64 sum (the numerator
of torch's mean) and the denominator torch uses are accumulated into a :class:`Partial`;
:meth:`Plan.finish` turns the partials into what torch returns. Because the numerator and
denominator are explicit, batches of several requests (see :func:`evaluate_batch`) and requests
streamed in chunks give every caller exactly its own torch result.

Half and bfloat16 inputs are computed with float32 accumulation and answered in torch's output
dtype; float64 input is computed in float64.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

CROSS_ENTROPY = "cross_entropy"
NLL = "nll_loss"
BCE_WITH_LOGITS = "binary_cross_entropy_with_logits"
LOSSES = (CROSS_ENTROPY, NLL, BCE_WITH_LOGITS)
REDUCTIONS = ("mean", "sum", "none")
EXTRAS = ("target_logprob", "entropy", "target_rank", "argmax_correct")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CLASS_TARGET_DTYPES = (torch.int64, torch.uint8)

#: Bytes of compute-dtype logits evaluated per chunk. Large enough to amortise per-call
#: overhead, small enough to stay in cache-friendly territory and bound extra memory.
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024


class InvalidInput(ValueError):
    """The request is invalid; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class LossSpec:
    """The options of one loss call, as torch.nn.functional takes them."""

    loss: str = CROSS_ENTROPY
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    class_axis: int | None = None
    shift_targets: bool = False
    extras: tuple[str, ...] = ()
    sequence_stats: bool = False


@dataclass
class SequenceStats:
    nll_sum: list[float]
    tokens: list[int]
    mean_nll: list[float]
    perplexity: list[float]
    is_greedy: list[bool]


@dataclass
class LossResult:
    """What torch returns (``loss``) plus the exact float64 totals behind a mean."""

    loss: torch.Tensor
    loss_sum: float
    weight_sum: float
    counted: int
    sequences: SequenceStats | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Partial:
    """Evaluation of a contiguous range of units ``[unit_start, unit_stop)``."""

    unit_start: int
    unit_stop: int
    losses: torch.Tensor | None  # per element, compute dtype, on CPU; None unless needed
    loss_sum: float
    weight_sum: float
    counted: int
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    seq_loss: torch.Tensor | None = None  # (rows,) float64 weighted loss, for sequence stats
    seq_weight: torch.Tensor | None = None
    seq_counted: torch.Tensor | None = None
    seq_greedy: torch.Tensor | None = None


@dataclass
class ClassTerms:
    """Per-row tensors of a class-index evaluation; ``rows(a, b)`` views a row range."""

    x: torch.Tensor
    logp: torch.Tensor
    picked: torch.Tensor
    tc: torch.Tensor
    valid: torch.Tensor
    losses: torch.Tensor
    wt: torch.Tensor

    def rows(self, a: int, b: int) -> ClassTerms:
        return ClassTerms(*(getattr(self, f)[a:b] for f in ("x", "logp", "picked", "tc", "valid", "losses", "wt")))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(shape: Sequence[int]) -> list[int]:
    return list(shape)


@functools.lru_cache(maxsize=512)
def _torch_output_dtype(
    loss: str,
    kind: str,
    input_dtype: torch.dtype,
    target_dtype: torch.dtype,
    weight_dtype: torch.dtype | None,
    pos_weight_dtype: torch.dtype | None,
    label_smoothing_on: bool,
    reduction: str = "mean",
    ignored_target: int | None = None,
) -> torch.dtype:
    """Run torch itself on one-element tensors of these dtypes.

    torch's dtype rules (which target dtypes are accepted, when weights must match, how BCE
    promotes) live in its kernels; probing them is the only way to match them exactly.
    Raises InvalidInput with torch's own message when torch rejects the combination.
    ``ignored_target``: probe with a target that is ignored (ignore_index), for requests whose
    every target is ignored: torch skips some dtype checks when nothing is gathered.
    """
    x = torch.zeros(1, 2, dtype=input_dtype)
    w = None if weight_dtype is None else torch.ones(2, dtype=weight_dtype)
    try:
        if kind == "bce":
            x1 = torch.zeros(2, dtype=input_dtype)
            t1 = torch.zeros(2, dtype=target_dtype)
            w1 = None if weight_dtype is None else torch.ones(2, dtype=weight_dtype)
            pw = None if pos_weight_dtype is None else torch.ones(2, dtype=pos_weight_dtype)
            out = F.binary_cross_entropy_with_logits(x1, t1, weight=w1, pos_weight=pw)
        elif kind == "prob":
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
    except (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError) as exc:
        raise _dtype_error(kind, input_dtype, target_dtype, weight_dtype, pos_weight_dtype, exc) from exc
    return out.dtype


def _dtype_error(kind, input_dtype, target_dtype, weight_dtype, pos_weight_dtype, exc) -> InvalidInput:
    text = str(exc).split("\n")[0]
    if input_dtype not in FLOAT_DTYPES:
        return InvalidInput(
            "input", f"expected a floating dtype (float32, float64, float16, bfloat16), got {_dtype_name(input_dtype)} ({text})"
        )
    if kind == "class" and target_dtype not in CLASS_TARGET_DTYPES:
        return InvalidInput(
            "target", f"expected class indices of dtype int64 or uint8 (as torch), got {_dtype_name(target_dtype)} ({text})"
        )
    if kind == "prob" and not target_dtype.is_floating_point:
        return InvalidInput("target", f"expected a floating dtype for class probabilities, got {_dtype_name(target_dtype)} ({text})")
    if weight_dtype is not None and ("weight" in text or "scalar type" in text) and kind != "bce":
        return InvalidInput(
            "options.weight", f"expected dtype {_dtype_name(input_dtype)} like the input, got {_dtype_name(weight_dtype)} ({text})"
        )
    if kind == "bce" and not target_dtype.is_floating_point:
        return InvalidInput("target", f"expected a floating dtype for BCE targets, got {_dtype_name(target_dtype)} ({text})")
    field = "options.pos_weight" if pos_weight_dtype is not None and kind == "bce" else "options.weight"
    return InvalidInput(field if weight_dtype or pos_weight_dtype else "input", f"dtype combination rejected by torch: {text}")


def _normalise_axis(axis: int, ndim: int, field_name: str) -> int:
    if not -ndim <= axis < ndim:
        raise InvalidInput(field_name, f"axis {axis} is out of range for an input with {ndim} dimensions")
    return axis % ndim


class Plan:
    """A validated request: everything but the bulk input values.

    Build with :func:`plan`. ``input_shape`` / ``input_dtype`` describe the input; the input
    values arrive through :meth:`evaluate_units` (whole, or in chunks when streamed).
    """

    def __init__(
        self,
        spec: LossSpec,
        input_shape: tuple[int, ...],
        input_dtype: torch.dtype,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        pos_weight: torch.Tensor | None,
        *,
        target_streamed: bool = False,
    ) -> None:
        self.spec = spec
        self.input_shape = tuple(int(s) for s in input_shape)
        self.input_dtype = input_dtype
        self.target_dtype = target.dtype
        self.target_shape = tuple(target.shape)
        self.weight = weight
        self.pos_weight = pos_weight
        self.target_streamed = target_streamed
        self._probe_target = target
        try:
            self._validate_and_layout(target)
        finally:
            self._probe_target = None

    # ------------------------------------------------------------------ validation
    def _validate_and_layout(self, target: torch.Tensor) -> None:
        spec = self.spec
        shape = self.input_shape
        ndim = len(shape)
        if spec.loss not in LOSSES:
            raise InvalidInput("options.loss", f"unknown loss {spec.loss!r}")
        if spec.reduction not in REDUCTIONS:
            raise InvalidInput("options.reduction", f"{spec.reduction!r} is not a valid value for reduction")
        for extra in spec.extras:
            if extra not in EXTRAS:
                raise InvalidInput("options.extras", f"unknown extra {extra!r}; expected one of {', '.join(EXTRAS)}")
        if spec.loss == BCE_WITH_LOGITS:
            self._validate_bce(target)
            return
        if self.pos_weight is not None:
            raise InvalidInput("options.pos_weight", f"only binary_cross_entropy_with_logits takes pos_weight, not {spec.loss}")
        if spec.loss == NLL and spec.label_smoothing != 0.0:
            raise InvalidInput("options.label_smoothing", "nll_loss has no label_smoothing; use cross_entropy")
        if ndim == 0:
            if spec.loss == NLL:
                raise InvalidInput("input", "Expected 1 or more dimensions (got 0)")
            raise InvalidInput("input", "expected an input with a class axis ((C), (N, C) or (N, C, d1, ...)), got a 0-dim tensor")
        if spec.class_axis is None:
            self.class_axis = 0 if ndim == 1 else 1
        else:
            self.class_axis = _normalise_axis(spec.class_axis, ndim, "options.class_axis")
        self.num_classes = shape[self.class_axis]
        # torch treats input and target of equal shape as class probabilities (cross_entropy).
        torch_layout_shape = self._torch_layout(shape)
        torch_target_shape = self._torch_layout(self.target_shape) if len(self.target_shape) == ndim else self.target_shape
        is_prob = spec.loss == CROSS_ENTROPY and tuple(torch_target_shape) == tuple(torch_layout_shape)
        self.kind = "prob" if is_prob else "class"
        if self.kind == "prob":
            self._validate_prob()
        else:
            self._validate_class(target)

    def _torch_layout(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape the input would have in torch's class-axis-1 layout."""
        shape = list(shape)
        default = 0 if len(shape) == 1 else 1
        if self.class_axis != default and len(shape) > 1:
            shape.insert(1, shape.pop(self.class_axis))
        return tuple(shape)

    def _check_dtypes(self, kind: str) -> None:
        target = self._probe_target
        torch_layout = kind == "bce" or (self.class_axis == (0 if len(self.input_shape) == 1 else 1) and not self.spec.shift_targets)
        if math.prod(self.input_shape) == 0 and torch_layout and target is not None and target.device.type != "meta":
            self.output_dtype = self._empty_output_dtype(kind, target)
        else:
            try:
                self.output_dtype = self._probed_output_dtype(kind)
            except InvalidInput:
                ignored = self._all_ignored_value(kind, target)
                if ignored is None:
                    raise
                self.output_dtype = self._probed_output_dtype(kind, ignored)
        self.compute_dtype = torch.float64 if self.output_dtype == torch.float64 else torch.float32

    def _empty_output_dtype(self, kind: str, target: torch.Tensor) -> torch.dtype:
        """Empty inputs: torch itself on the real (empty) tensors; its kernels skip some dtype
        checks when there is nothing to compute, so probing with one element would differ."""
        spec = self.spec
        x, target, weight, pos_weight = _small_empties(
            torch.empty(self.input_shape, dtype=self.input_dtype), target, self.weight, self.pos_weight
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if kind == "bce":
                    out = F.binary_cross_entropy_with_logits(x, target, weight, reduction=spec.reduction, pos_weight=pos_weight)
                elif spec.loss == NLL:
                    out = F.nll_loss(x, target, weight, ignore_index=spec.ignore_index, reduction=spec.reduction)
                else:
                    out = F.cross_entropy(
                        x,
                        target,
                        weight,
                        ignore_index=spec.ignore_index,
                        reduction=spec.reduction,
                        label_smoothing=spec.label_smoothing,
                    )
        except (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError) as exc:
            self._probed_output_dtype(kind)  # a dtype problem: raises with a precise message
            text = str(exc).split("\n")[0]
            raise InvalidInput("target" if kind == "class" else "input", f"rejected by torch: {text}") from exc
        return out.dtype

    def _all_ignored_value(self, kind: str, target: torch.Tensor | None) -> int | None:
        """ignore_index, when it fits the target dtype and every class target equals it."""
        ignore = self.spec.ignore_index
        if kind != "class" or target is None or target.device.type == "meta" or self.spec.shift_targets or not target.numel():
            return None
        info = torch.iinfo(target.dtype) if not target.dtype.is_floating_point and target.dtype != torch.bool else None
        if info is None or not info.min <= ignore <= info.max:
            return None
        return ignore if bool((target == ignore).all()) else None

    def _probed_output_dtype(self, kind: str, ignored_target: int | None = None) -> torch.dtype:
        return _torch_output_dtype(
            self.spec.loss,
            kind,
            self.input_dtype,
            self.target_dtype,
            None if self.weight is None else self.weight.dtype,
            None if self.pos_weight is None else self.pos_weight.dtype,
            self.spec.label_smoothing > 0.0,
            self.spec.reduction,
            ignored_target,
        )

    def _layout_units(self) -> None:
        shape = self.input_shape
        ca = self.class_axis
        self.units = math.prod(shape[:ca]) if ca > 0 else 1
        self.unit_positions = math.prod(shape[ca + 1 :])  # rows (positions) per unit
        self.rows = self.units * self.unit_positions

    def _check_weight(self, prob: bool) -> None:
        w = self.weight
        c = self.num_classes
        if w is not None and (w.dim() != 1 or w.numel() != c):
            prefix = "cross_entropy: " if prob else ""
            raise InvalidInput(
                "options.weight",
                f"{prefix}weight tensor should be defined either for all {c} classes or no classes but got weight tensor of shape: {_shape(w.shape)}",
            )

    def _validate_prob(self) -> None:
        spec = self.spec
        if spec.ignore_index >= 0:
            raise InvalidInput("options.ignore_index", "ignore_index is not supported for floating point target (class probabilities)")
        if spec.label_smoothing > 1.0:
            raise InvalidInput("options.label_smoothing", f"label_smoothing must be between 0.0 and 1.0. Got: {spec.label_smoothing:g}")
        if not self.target_dtype.is_floating_point:
            raise InvalidInput(
                "target", f"Expected floating point type for target with class probabilities, got {_dtype_name(self.target_dtype)}"
            )
        if spec.shift_targets:
            raise InvalidInput("options.shift_targets", "needs class-index targets, got class probabilities")
        if spec.extras or spec.sequence_stats:
            raise InvalidInput("options.extras", "extras and sequence statistics need class-index targets, got class probabilities")
        self._check_weight(prob=True)
        self._check_dtypes("prob")
        self._layout_units()
        self.output_shape = tuple(s for i, s in enumerate(self.input_shape) if i != self.class_axis)
        self.target = None

    def _validate_class(self, target: torch.Tensor) -> None:
        spec = self.spec
        shape = self.input_shape
        ndim = len(shape)
        tshape = self.target_shape
        if spec.label_smoothing > 1.0:
            raise InvalidInput("options.label_smoothing", f"label_smoothing must be between 0.0 and 1.0. Got: {spec.label_smoothing:g}")
        if self.target_streamed:
            raise InvalidInput("target", "class-index targets travel whole in the chunk header")
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
            self.output_shape = ()
        else:
            expected = tuple(s for i, s in enumerate(shape) if i != self.class_axis)
            if ndim == 2 and self.class_axis == 1:
                if len(tshape) > 1:
                    raise InvalidInput(
                        "target", f"0D or 1D target tensor expected, multi-target not supported, got {len(tshape)}D shape {_shape(tshape)}"
                    )
                tn = tshape[0] if tshape else 0
                if tn != shape[0]:
                    raise InvalidInput("target", f"Expected input batch_size ({shape[0]}) to match target batch_size ({tn}).")
            elif tshape != expected:
                if len(tshape) >= 1 and len(tshape) == ndim - 1 and tshape[0] != expected[0] and self.class_axis == 1:
                    raise InvalidInput("target", f"Expected input batch_size ({shape[0]}) to match target batch_size ({tshape[0]}).")
                raise InvalidInput("target", f"Expected target size {_shape(expected)}, got {_shape(tshape)}")
            self.output_shape = expected
        self._check_weight(prob=False)
        if ndim == 3 and self.class_axis == 1 and shape[1] == 0 and math.prod(tshape) > 0:
            # torch views (N, 0, d) as 4-d with an inferred size, which fails for C = 0
            raise InvalidInput(
                "input",
                f"size mismatch (got input: {_shape(shape)} with 0 classes, target: {_shape(tshape)}); torch cannot evaluate a 3-d input with C = 0",
            )
        if ndim >= 3 and self.target_dtype == torch.uint8 and (math.prod(tshape) > 0 or spec.reduction == "none"):
            # torch's nll_loss2d path (inputs with spatial dims) takes int64 targets only
            # (an empty batch with mean / sum returns before the dtype check)
            raise InvalidInput(
                "target",
                "expected scalar type Long but found Byte (uint8 class indices are accepted only for (C) and (N, C) inputs, as torch)",
            )
        self._check_dtypes("class")
        self._layout_units()
        flat = target.reshape(-1)
        if flat.dtype != torch.int64:
            flat = flat.to(torch.int64)
        ignore = spec.ignore_index
        if spec.shift_targets:
            if len(tshape) == 0:
                raise InvalidInput("options.shift_targets", "needs a target with a sequence axis, got a 0-dim target")
            t2 = flat.reshape(-1, tshape[-1]) if tshape[-1] > 0 else flat.reshape(0, 0)
            shifted = torch.full_like(t2, ignore)
            shifted[:, :-1] = t2[:, 1:]
            flat = shifted.reshape(-1)
        valid = flat != ignore
        c = self.num_classes
        in_range = flat.numel() == 0 or _all_within(flat, c)
        bad = None if in_range else valid & ((flat < 0) | (flat >= c))
        if bad is not None and bool(bad.any()):
            first = int(flat[bad.nonzero()[0, 0]])
            raise InvalidInput("target", f"Target {first} is out of bounds. (expected class indices in [0, {c}) or ignore_index {ignore})")
        self.target = flat
        self.valid = valid
        if (spec.extras or spec.sequence_stats) and len(tshape) == 0:
            self.seq_len = 1
        else:
            self.seq_len = tshape[-1] if tshape else 1

    def _validate_bce(self, target: torch.Tensor) -> None:
        spec = self.spec
        shape = self.input_shape
        if self.target_shape != shape:
            raise InvalidInput(
                "target", f"Target size ({_torch_size(self.target_shape)}) must be the same as input size ({_torch_size(shape)})"
            )
        if spec.class_axis is not None or spec.shift_targets or spec.extras or spec.sequence_stats:
            raise InvalidInput("options", "class_axis, shift_targets, extras and sequence_stats apply to cross_entropy / nll_loss only")
        if spec.label_smoothing != 0.0:
            raise InvalidInput("options.label_smoothing", "binary_cross_entropy_with_logits has no label_smoothing")
        for name, w in (("options.weight", self.weight), ("options.pos_weight", self.pos_weight)):
            if w is None:
                continue
            try:
                b = torch.broadcast_shapes(tuple(w.shape), shape)
            except RuntimeError as exc:
                raise InvalidInput(
                    name, f"shape {_shape(w.shape)} is not broadcastable to the input shape {_shape(shape)}: {exc}"
                ) from None
            if tuple(b) != shape:
                raise InvalidInput(name, f"output with shape {_shape(shape)} doesn't match the broadcast shape {_shape(b)}")
        self.kind = "bce"
        self._check_dtypes("bce")
        self.class_axis = 1 if len(shape) > 1 else 0
        self.num_classes = 1
        self.units = shape[0] if shape else 1
        self.unit_positions = math.prod(shape[1:]) if shape else 1
        self.rows = self.units * self.unit_positions
        self.output_shape = shape
        self.target = None
        self.valid = None

    # ------------------------------------------------------------------ sizes
    @property
    def unit_elements(self) -> int:
        """Input elements per unit (per row chunk step)."""
        if self.kind == "bce":
            return self.unit_positions
        return self.unit_positions * self.num_classes

    @property
    def input_nbytes(self) -> int:
        return math.prod(self.input_shape) * _itemsize(self.input_dtype)

    @property
    def sequences(self) -> int:
        """Rows of the target's last axis: the entries of the per-sequence statistics."""
        return math.prod(self.target_shape[:-1]) if self.target_shape else 1

    def answer_nbytes(self) -> int:
        """An upper bound of the encoded answer: per-element losses, extras, sequence statistics."""
        size = 1024
        if self.spec.reduction == "none":
            size += math.prod(self.output_shape) * _itemsize(self.output_dtype)
        if self.kind == "class":
            targets = math.prod(self.target_shape)
            for name in self.spec.extras:
                size += targets * _itemsize(_EXTRA_DTYPES.get(name, self.compute_dtype))
            if self.spec.sequence_stats:
                size += self.sequences * _SEQUENCE_STAT_BYTES
        return size

    def working_nbytes(self) -> int:
        """An upper bound of what evaluation keeps for the answer before it is encoded: the
        per-element tensors of every chunk, and their concatenation."""
        per_element = 0
        if self.spec.reduction == "none":
            per_element += _itemsize(self.compute_dtype)
        if self.kind == "class":
            per_element += sum(_itemsize(_EXTRA_DTYPES.get(name, self.compute_dtype)) for name in self.spec.extras)
            if self.spec.sequence_stats:
                per_element += 8 + 8 + 1 + 1  # float64 loss and weight, counted and greedy flags
        elements = math.prod(self.target_shape) if self.kind == "class" else self.rows
        return 2 * per_element * elements

    def needs_losses(self) -> bool:
        return self.spec.reduction == "none"

    def units_per_chunk(self, chunk_bytes: int) -> int:
        per_unit = max(1, self.unit_elements) * (8 if self.compute_dtype == torch.float64 else 4)
        return max(1, chunk_bytes // per_unit)

    # ------------------------------------------------------------------ evaluation
    def unit_view(self, x: torch.Tensor) -> torch.Tensor:
        """View the input (or a unit-range slice of it) as (units, C, positions) / (units, positions)."""
        if self.kind == "bce":
            if x.dim() == 0:
                return x.reshape(1, 1)
            return x.reshape(self._leading_units(x, 1), self.unit_positions)
        return x.reshape(self._leading_units(x, self.class_axis), self.num_classes, self.unit_positions)

    def _leading_units(self, x: torch.Tensor, axis: int) -> int:
        """Units in ``x``: the whole input (dims before ``axis``) or a (units, *unit) slice.

        Counted from the shape because reshape(-1, ...) is ambiguous for empty tensors.
        """
        lead = x.dim() - (len(self.input_shape) - axis)
        return math.prod(x.shape[:lead])

    def evaluate_units(
        self,
        x_units: torch.Tensor,
        unit_start: int,
        *,
        target_units: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        checkpoint: Callable[[], None] | None = None,
    ) -> Partial:
        """Evaluate the units ``[unit_start, unit_start + len(x_units))``.

        ``x_units`` is the input restricted to those units in (units, C, positions) layout (see
        :meth:`unit_view`); ``target_units`` likewise for probability / BCE targets.
        ``checkpoint`` is called before every chunk; it raises to abandon the evaluation (the
        caller went away or its deadline passed). torch errors become :class:`InvalidInput`.
        """
        n_units = x_units.shape[0]
        # Units without elements (a zero-size dimension after the leading ones) cost nothing to
        # evaluate, however many there are: one step, never a loop over 2**62 empty units.
        step = self.units_per_chunk(chunk_bytes) if self.unit_elements else max(1, n_units)
        parts = []
        try:
            for u0 in range(0, n_units, step):
                if checkpoint is not None:
                    checkpoint()
                u1 = min(n_units, u0 + step)
                tu = None if target_units is None else target_units[u0:u1]
                parts.append(self._evaluate_chunk(x_units[u0:u1], tu, unit_start + u0, device))
        except (RuntimeError, IndexError, ValueError) as exc:
            if isinstance(exc, InvalidInput):
                raise
            raise InvalidInput("input", f"torch rejected the request: {exc}") from None
        if not parts:
            return self._empty_partial(unit_start)
        return merge_partials(parts) if len(parts) > 1 else parts[0]

    def _empty_partial(self, unit_start: int) -> Partial:
        return Partial(unit_start, unit_start, torch.empty(0, dtype=self.compute_dtype), 0.0, 0.0, 0)

    def _rows_of(self, xu: torch.Tensor, device, *, reuse: bool = False) -> torch.Tensor:
        """(units, C, positions) -> contiguous (rows, C) in the compute dtype on device.

        ``reuse``: the rows may live in a scratch buffer (see :func:`upcast`).
        """
        xu = xu.to(device=device, non_blocking=True)
        if self.unit_positions != 1:
            xu = xu.transpose(1, 2)
        return upcast(xu.reshape(xu.shape[0] * self.unit_positions, self.num_classes), self.compute_dtype, reuse=reuse)

    def _evaluate_chunk(self, xu, tu, unit_start, device) -> Partial:
        u1 = unit_start + xu.shape[0]
        if self.kind == "bce":
            return self._evaluate_bce(xu, tu, unit_start, u1, device)
        # class-index rows are consumed by _evaluate_class before the next chunk is upcast
        x = self._rows_of(xu, device, reuse=self.kind == "class")
        r0, r1 = unit_start * self.unit_positions, u1 * self.unit_positions
        if self.kind == "prob":
            if self.output_dtype != self.input_dtype:
                return self._evaluate_prob_promoted(xu, tu, unit_start, u1, device)
            p = self._rows_of(tu, device)
            return self._evaluate_prob(x, p, unit_start, u1)
        return self._evaluate_class(x, r0, r1, unit_start, u1, device)

    def _weight_on(self, device) -> torch.Tensor | None:
        if self.weight is None:
            return None
        return self.weight.to(device=device, dtype=self.compute_dtype)

    def _evaluate_class(self, x, r0, r1, u0, u1, device) -> Partial:
        t = self.target[r0:r1].to(device)
        valid = self.valid[r0:r1].to(device)
        return self.class_partial(self.class_terms(x, t, valid), u0, u1)

    def class_terms(self, x: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> ClassTerms:
        """Per-row terms of a class-index loss for (rows, C) compute-dtype logits ``x``.

        Depends only on the loss kind, C, compute dtype, class weights and label smoothing, so
        rows of several compatible requests may be evaluated together (see batch_engine).
        """
        spec = self.spec
        tc = t.masked_fill(~valid, 0)
        if spec.loss != CROSS_ENTROPY:
            logp = x
        elif x.device.type == "cpu":
            # consumed (losses, extras) before this thread evaluates anything else
            logp = torch.log_softmax(x, 1, out=scratch("log_softmax", x.numel(), x.dtype).view(x.shape))
        else:
            logp = torch.log_softmax(x, 1)
        # C = 0 is valid only when every target is ignored: gather from one padded zero class
        source = logp if logp.shape[1] else logp.new_zeros(logp.shape[0], 1)
        picked = source.gather(1, tc.unsqueeze(1)).squeeze(1)
        w = self._weight_on(x.device)
        if w is not None:
            wt = (w if w.numel() else w.new_zeros(1))[tc]
            nll = -picked * wt
            wt = torch.where(valid, wt, 0.0)
        else:
            nll = -picked
            wt = valid.to(self.compute_dtype)
        nll = torch.where(valid, nll, 0.0)
        ls = spec.label_smoothing
        if spec.loss == CROSS_ENTROPY and ls > 0.0:
            smooth = -(logp * w).sum(1) if w is not None else -logp.sum(1)
            smooth = torch.where(valid, smooth, 0.0)
            losses = (1 - ls) * nll + smooth * _share(ls, self.num_classes)
        else:
            losses = nll
        return ClassTerms(x, logp, picked, tc, valid, losses, wt)

    def class_partial(self, terms: ClassTerms, u0: int, u1: int) -> Partial:
        """Reduce the terms of this request's rows (units ``[u0, u1)``) into a Partial."""
        losses, wt, valid = terms.losses, terms.wt, terms.valid
        part = Partial(
            u0,
            u1,
            losses.cpu() if self.needs_losses() else None,
            float(losses.sum(dtype=torch.float64)),
            float(wt.sum(dtype=torch.float64)),
            int(valid.sum()),
        )
        if self.spec.extras or self.spec.sequence_stats:
            self._class_extras(part, terms.x, terms.logp, terms.picked, terms.tc, valid, losses, wt)
        return part

    def _class_extras(self, part, x, logp, picked, tc, valid, losses, wt) -> None:
        extras = self.spec.extras
        rank = None
        no_classes = x.shape[1] == 0  # then every row is ignored (validated): nothing to rank
        if "target_rank" in extras or "argmax_correct" in extras:
            if no_classes:
                rank = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
            else:
                rank = (x > x.gather(1, tc.unsqueeze(1))).sum(1) + 1
                rank = torch.where(valid, rank, 0)
        if "target_logprob" in extras:
            part.extras["target_logprob"] = torch.where(valid, picked, 0.0).cpu()
        if "entropy" in extras:
            p = logp.exp()
            ent = -(p * logp).masked_fill_(p == 0, 0.0).sum(1)  # 0 log 0 = 0; NaN stays NaN
            part.extras["entropy"] = torch.where(valid, ent, 0.0).cpu()
        if "target_rank" in extras:
            part.extras["target_rank"] = rank.cpu()
        if "argmax_correct" in extras:
            part.extras["argmax_correct"] = ((rank == 1) & valid).cpu()
        if self.spec.sequence_stats:
            part.seq_loss = losses.to(torch.float64).cpu()
            part.seq_weight = wt.to(torch.float64).cpu()
            part.seq_counted = valid.cpu()
            # lm-evaluation-harness: logits.argmax(-1) == continuation (the first maximum wins ties).
            part.seq_greedy = (~valid if no_classes else (x.argmax(1) == tc) | ~valid).cpu()

    def _evaluate_prob_promoted(self, xu, tu, u0, u1, device) -> Partial:
        """Probability targets whose dtype (or the weight's) is wider than the input's.

        torch promotes only after its log_softmax, which runs in (and rounds to) the input
        dtype; the result is then torch's own arithmetic in torch's (N, C, positions) layout.
        """
        x = xu.to(device)
        t = tu.to(device)
        w = None if self.weight is None else self.weight.to(device)
        if len(self.input_shape) <= 2:
            x = x.reshape(x.shape[0], self.num_classes)
            t = t.reshape(t.shape[0], self.num_classes)
        elif w is not None:
            w = w.reshape(1, -1, 1)
        ls = self.spec.label_smoothing
        if ls > 0.0:
            t = t * (1 - ls) + _share(ls, self.num_classes)
        prod = torch.log_softmax(x, 1) * t
        if w is not None:
            prod = prod * w
        losses = -prod.sum(1).reshape(-1)
        n = losses.shape[0]
        return Partial(u0, u1, losses.cpu() if self.needs_losses() else None, float(losses.sum(dtype=torch.float64)), float(n), n)

    def _evaluate_prob(self, x, p, u0, u1) -> Partial:
        ls = self.spec.label_smoothing
        logp = torch.log_softmax(x, 1)
        if ls > 0.0:
            p = p * (1 - ls) + _share(ls, self.num_classes)
        prod = logp * p
        if self.weight is not None:
            prod = prod * self._weight_on(x.device)
        losses = -prod.sum(1)
        n = losses.shape[0]
        return Partial(u0, u1, losses.cpu() if self.needs_losses() else None, float(losses.sum(dtype=torch.float64)), float(n), n)

    def _evaluate_bce(self, xu, tu, u0, u1, device) -> Partial:
        # When target / weight dtypes promote the result past the input dtype, torch rounds
        # log_sigmoid(input) to the input dtype first: evaluating in the original dtypes keeps
        # exactly that. Otherwise everything runs in the compute dtype.
        cd = None if self.output_dtype != self.input_dtype else self.compute_dtype
        x = xu.to(device=device, dtype=cd)
        t = tu.to(device=device, dtype=cd)
        kwargs = {}
        for name, w in (("weight", self.weight), ("pos_weight", self.pos_weight)):
            if w is not None:
                full = w.to(cd).expand(self.input_shape) if self.input_shape else w.to(cd).reshape(())
                kwargs[name] = self.unit_view(full)[u0:u1].to(device)
        losses = F.binary_cross_entropy_with_logits(x, t, reduction="none", **kwargs)
        n = losses.numel()
        return Partial(
            u0, u1, losses.reshape(-1).cpu() if self.needs_losses() else None, float(losses.sum(dtype=torch.float64)), float(n), n
        )

    # ------------------------------------------------------------------ result
    def finish(self, partial: Partial) -> LossResult:
        """Turn the partial covering every unit into what torch returns."""
        spec = self.spec
        if spec.reduction == "none":
            losses = partial.losses if partial.losses is not None else torch.empty(0, dtype=self.compute_dtype)
            loss = losses.reshape(self._none_shape()).to(self.output_dtype)
        elif spec.reduction == "sum":
            total = partial.loss_sum
            if self.kind == "class" and self.num_classes == 0 and spec.loss == CROSS_ENTROPY and spec.label_smoothing > 0:
                total = math.nan  # torch: smooth_loss.sum() * (label_smoothing / 0) = 0 * inf
            loss = torch.tensor(total, dtype=torch.float64).to(self.output_dtype)
        else:
            if self.kind != "class" and math.prod(self.input_shape) == 0:
                mean = math.nan
            else:
                mean = _divide(partial.loss_sum, partial.weight_sum)
            loss = torch.tensor(mean, dtype=torch.float64).to(self.output_dtype)
        result = LossResult(loss, partial.loss_sum, partial.weight_sum, partial.counted)
        if self.kind == "class":
            shape = self.target_shape if self.target_shape else ()
            for name, value in partial.extras.items():
                result.extras[name] = value.reshape(shape)
            for name in spec.extras:
                if name not in result.extras:  # nothing was evaluated (empty input)
                    result.extras[name] = torch.empty(shape, dtype=_EXTRA_DTYPES.get(name, self.compute_dtype))
            if spec.sequence_stats:
                result.sequences = self._sequence_stats(partial)
        return result

    def _none_shape(self) -> tuple[int, ...]:
        if self.kind == "class":
            return self.output_shape
        if self.kind == "bce":
            return self.input_shape
        # probability rows are ordered (units, positions) == torch's (N, d1..dk) order
        return self.output_shape

    def _sequence_stats(self, partial: Partial) -> SequenceStats:
        t_len = max(1, self.seq_len)
        if partial.seq_loss is None:  # nothing was evaluated (empty input)
            rows = math.prod(self.target_shape[:-1]) if self.target_shape else 1
            zeros = torch.zeros(rows, t_len, dtype=torch.float64).reshape(-1)
            partial = Partial(0, 0, None, 0.0, 0.0, 0, {}, zeros, zeros, zeros.bool(), ~zeros.bool())
        loss = partial.seq_loss.reshape(-1, t_len)
        weight = partial.seq_weight.reshape(-1, t_len)
        nll_sum = loss.sum(1)
        wsum = weight.sum(1)
        tokens = partial.seq_counted.reshape(-1, t_len).sum(1)
        mean = nll_sum / wsum
        return SequenceStats(
            nll_sum=nll_sum.tolist(),
            tokens=tokens.tolist(),
            mean_nll=mean.tolist(),
            perplexity=mean.exp().tolist(),
            is_greedy=partial.seq_greedy.reshape(-1, t_len).all(1).tolist(),
        )


def _small_empties(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
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


def _share(label_smoothing: float, num_classes: int) -> float:
    """label_smoothing / C with C++ double semantics (torch divides by C = 0 without raising)."""
    return label_smoothing / num_classes if num_classes else math.inf


_EXTRA_DTYPES = {"target_rank": torch.int64, "argmax_correct": torch.bool}
#: Encoded bytes per sequence: nll_sum, mean_nll and perplexity doubles, a tokens varint, a bool.
_SEQUENCE_STAT_BYTES = 3 * 8 + 10 + 1


def _divide(a: float, b: float) -> float:
    if b == 0.0:
        return math.nan if a == 0.0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def _torch_size(shape: Sequence[int]) -> str:
    return f"torch.Size({list(shape)})"


_SCRATCH = threading.local()


def scratch(name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread CPU buffer of n elements, reused across chunks.

    Fresh multi-megabyte tensors per chunk are mmap'd and page-faulted in every time (the
    server caps glibc's mmap threshold to bound its memory); reusing one buffer avoids that.
    """
    key = (name, dtype)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = buffers[key] = torch.empty(n, dtype=dtype)
    return buf[:n]


def upcast(t: torch.Tensor, dtype: torch.dtype, *, reuse: bool = False) -> torch.Tensor:
    """``t.to(dtype)``; bfloat16 -> float32 as a 16-bit shift of the raw words.

    Exact (bfloat16 is the upper half of a float32, NaN and infinities included) and several
    times faster than torch's CPU conversion kernel, which dominated bf16 evaluation. With
    ``reuse`` the result lives in a per-thread scratch buffer that the next reusing call
    overwrites: only for a chunk that is fully consumed before the next one is upcast.
    """
    if t.dtype == torch.bfloat16 and dtype == torch.float32 and t.device.type == "cpu":
        words = t.view(torch.int16)
        if reuse and t.is_contiguous():
            buf = scratch("upcast", t.numel(), torch.int32).view(t.shape)
            buf.copy_(words)
            return buf.bitwise_left_shift_(16).view(torch.float32)
        return (words.to(torch.int32) << 16).view(torch.float32)
    return t.to(dtype)


def _all_within(values: torch.Tensor, upper: int) -> bool:
    """Every value in [0, upper): the common case, checked with one reduction."""
    low, high = torch.aminmax(values)
    return int(low) >= 0 and int(high) < upper


@functools.cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _fsum(values: Sequence[float]) -> float:
    """Exactly rounded sum; IEEE semantics (inf - inf = nan, overflow = inf) when not finite."""
    try:
        return math.fsum(values)
    except (ValueError, OverflowError):
        return sum(values)


def merge_partials(parts: Sequence[Partial]) -> Partial:
    """Concatenate partials of consecutive unit ranges (in order)."""
    first = parts[0]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    merged = Partial(
        first.unit_start,
        parts[-1].unit_stop,
        cat("losses"),
        _fsum([p.loss_sum for p in parts]),
        _fsum([p.weight_sum for p in parts]),
        sum(p.counted for p in parts),
        {k: torch.cat([p.extras[k] for p in parts]) for k in first.extras},
        cat("seq_loss"),
        cat("seq_weight"),
        cat("seq_counted"),
        cat("seq_greedy"),
    )
    return merged


def plan(
    spec: LossSpec,
    input_shape: Sequence[int],
    input_dtype: torch.dtype,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    *,
    target_streamed: bool = False,
) -> Plan:
    """Validate a request as torch would; raise InvalidInput naming the field when torch would reject it."""
    return Plan(spec, tuple(input_shape), input_dtype, target, weight, pos_weight, target_streamed=target_streamed)


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
    p = plan(spec, input.shape, input.dtype, target, weight, pos_weight)
    return run(p, input, target, device=device, chunk_bytes=chunk_bytes)


def run(
    p: Plan,
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    checkpoint: Callable[[], None] | None = None,
) -> LossResult:
    """Evaluate a validated plan on its whole input (``checkpoint``: see :meth:`Plan.evaluate_units`)."""
    target_units = p.unit_view(target) if p.kind in ("prob", "bce") else None
    partial = p.evaluate_units(
        p.unit_view(input), 0, target_units=target_units, device=device, chunk_bytes=chunk_bytes, checkpoint=checkpoint
    )
    return p.finish(partial)
