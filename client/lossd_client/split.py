"""One large request as several requests over parallel streams, and their answers joined exactly.

A request is cut for two reasons: to spread it over ``parallel_streams`` (worker processes,
replicas), and to keep each part's ChunkHeader within the server's message limit when what the
header carries whole (class-index targets, BCE weights cut with the rows) is too big for one
message (:func:`lossd_client.core.header_parts`).

A request is cut along the leading axis of its input (and of its target, which must come along
row for row) into consecutive parts, each sent as its own ``EvaluateChunked`` call over its own
connection, so that several worker processes of one server (``--workers N``) or several replicas
evaluate it at once. Every answer is joined as the server joins the chunks of one call:

- ``loss_sum`` and ``weight_sum`` are float64 totals, added with :func:`math.fsum` (exactly
  rounded, as the server merges its chunks); ``counted`` is an integer sum;
- ``reduction='none'`` losses, per-token extras and per-sequence statistics are concatenated in
  row order (their bytes, as the server sent them);
- a ``'sum'`` is ``loss_sum`` and a ``'mean'`` ``loss_sum / weight_sum`` (0/0 = NaN, x/0 = ±inf;
  inf or nan where torch's own totals overflow: :func:`lossd_client.reduction.quotient`, as the
  server divides), rounded to the answer's dtype as the server rounds it: directly to float32 /
  float64, and to float16 / bfloat16 through float32 (torch converts a float64 to a 16-bit float
  through float32).

A request is split only where that join is exact, otherwise it travels whole (:func:`split_rows`
returns None):

- the leading axis must hold rows (``lossd_client.layout.rows``): not a class axis (a 1-d
  ``(C)`` input, ``class_axis=0``), and at least two of them;
- the target must be cut with the input: class probabilities and BCE targets shaped like the
  input, class indices shaped like the input without its class axis (each part carries its slice
  of them in its ChunkHeader); anything else is left to the server to reject with its own message;
- ``shift_targets`` moves targets along the target's last axis and ``sequence_stats`` reduces
  over it, so both need a target with at least two axes (the leading one is then cut between whole
  sequences);
- a request with torch's legacy ``size_average`` / ``reduce`` is never split: they decide the
  reduction in place of ``reduction`` (and kl_div's 'batchmean' beside them divides by each part's
  batch), which the join would not follow: a summed request came back as its mean;
- cross_entropy with class indices, ``label_smoothing > 0`` and ``reduction='mean'`` is never split:
  torch divides its NLL part and its smoothing part by the weight separately, and an answer carries
  only their total (``loss_sum``), so the mean cannot be recomputed from the parts;
- a BCE ``weight`` / ``pos_weight`` with the input's number of axes and a leading axis as long as
  the input's is cut with it; one that broadcasts along the leading axis goes whole with every part.

Every part's answer is checked before anything is joined: a part that failed raises its error (the
whole request failed), and one that does not fit its part (:func:`lossd_client.answers.evaluate_answer`)
raises InternalError naming the field, never half the totals returned as the whole request's.

Float totals are exact when the server's per-chunk sums are (float32 or 16-bit inputs: float32
losses add up exactly in float64 for any realistic request); with float64 inputs a split, like a
different ``chunk_bytes``, may move ``loss_sum`` by an ulp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from . import answers, layout, tensors
from . import reduction as reduction_rule
from ._proto.lossd.v1 import loss_pb2 as pb
from .answers import SEQUENCE_FIELDS as SEQUENCE_FIELDS  # the per-sequence fields, joined in order
from .errors import shown
from .reduction import divide as divide  # the server's IEEE division, kept under this name
from .types import LossRequest, exact_sum

_FLOATS = answers.FLOATS
_CLASS_INDICES = answers.CLASS_INDICES


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in value.shape) if hasattr(value, "shape") else np.shape(value)


def _target_is_cut_with_rows(req: LossRequest, x_shape: tuple[int, ...], t_shape: tuple[int, ...], t_dtype: int) -> bool | None:
    """Whether the target's leading axis is the input's (True: class indices, False: shaped like the
    input); None when it is neither (the server answers such a request with its own message)."""
    if req.loss != layout.NLL_LOSS and t_shape == x_shape and t_dtype in _FLOATS:
        return False
    if req.loss == layout.BCE_WITH_LOGITS or t_dtype not in _CLASS_INDICES:
        return None
    axis = layout.resolve_class_axis(len(x_shape), req.class_axis)
    return True if t_shape == x_shape[:axis] + x_shape[axis + 1 :] else None


def splittable(req: LossRequest) -> bool:
    """Whether :func:`split_rows` may cut ``req`` (see the module's docstring for the rules)."""
    try:
        x_shape, t_shape = _shape(req.input), _shape(req.target)
        t_dtype = tensors.wire_dtype_of(req.target)
        rows_lead = len(x_shape) - len(layout.row_shape(req.loss, x_shape, req.class_axis))
        class_indices = _target_is_cut_with_rows(req, x_shape, t_shape, t_dtype) if rows_lead >= 1 else None
    except (tensors.UnsupportedTensorError, ValueError, TypeError):
        return False
    if class_indices is None or x_shape[0] < 2 or req.size_average is not None or req.reduce is not None:
        return False
    if class_indices and req.loss == layout.CROSS_ENTROPY and _smoothed(req) and _reduction(req) == "mean":
        return False
    if req.shift_targets or req.sequence_stats or req.extras:
        return class_indices and len(t_shape) >= 2
    if req.loss == layout.BCE_WITH_LOGITS:
        return all(_broadcast_kind(w, x_shape) is not None for w in (req.weight, req.pos_weight))
    return True


def _smoothed(req: LossRequest) -> bool:
    try:
        return float(req.label_smoothing) > 0
    except (TypeError, ValueError):
        return True  # not a number: sent whole, the server names the field


def _reduction(req: LossRequest) -> str:
    return "mean" if req.reduction == "elementwise_mean" else req.reduction


def _broadcast_kind(value: Any, x_shape: tuple[int, ...]) -> bool | None:
    """A BCE weight against the input's leading axis: True cut with it, False the same for every
    part, None neither (left whole to the server)."""
    if value is None:
        return False
    shape = _shape(value)
    if len(shape) > len(x_shape):
        return None
    if len(shape) < len(x_shape) or shape[0] == 1:
        return False
    return True if shape[0] == x_shape[0] else None


def split_rows(req: LossRequest, parts: int) -> list[LossRequest] | None:
    """``req`` as up to ``parts`` requests of consecutive leading-axis slices (as equal as can be),
    or None when it should travel whole (fewer than two parts, or not :func:`splittable`)."""
    if parts < 2 or not splittable(req):
        return None
    x_shape = _shape(req.input)
    n = min(parts, x_shape[0])
    bounds = [x_shape[0] * i // n for i in range(n + 1)]
    return [leading_slice(req, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def leading_slice(req: LossRequest, a: int, b: int) -> LossRequest:
    """The part of a :func:`splittable` request made of leading-axis rows ``[a, b)``: its input and
    target rows, and its BCE weights' rows where they are cut with the input."""
    x_shape = _shape(req.input)
    cut_weight = req.loss == layout.BCE_WITH_LOGITS and _broadcast_kind(req.weight, x_shape)
    cut_pos_weight = req.loss == layout.BCE_WITH_LOGITS and _broadcast_kind(req.pos_weight, x_shape)
    return replace(
        req,
        input=req.input[a:b],
        target=req.target[a:b],
        weight=req.weight[a:b] if cut_weight else req.weight,
        pos_weight=req.pos_weight[a:b] if cut_pos_weight else req.pos_weight,
    )


# --------------------------------------------------------------------------- joining the answers
def class_indices(req: LossRequest) -> bool:
    """Whether a :func:`splittable` request's target holds class indices (not probabilities)."""
    return tensors.wire_dtype_of(req.target) in _CLASS_INDICES


def scalar_bytes(value: float, wire_dtype: int) -> bytes:
    """A float64 value rounded to a wire dtype as the server's torch rounds it, little-endian."""
    if wire_dtype == pb.FLOAT64:
        return np.array(value, dtype="<f8").tobytes()
    with np.errstate(over="ignore"):
        f32 = np.array(value, dtype=np.float64).astype("<f4")  # round to nearest even; overflow -> inf
    if wire_dtype == pb.FLOAT32:
        return f32.tobytes()
    if wire_dtype == pb.FLOAT16:
        with np.errstate(over="ignore"):
            return f32.astype("<f2").tobytes()
    if wire_dtype == pb.BFLOAT16:
        if np.isnan(f32):
            return np.array(0x7FC0, dtype="<u2").tobytes()
        bits = int(f32.view("<u4"))
        return np.array((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, dtype="<u2").tobytes()
    raise ValueError(f"not a floating wire dtype: {layout.dtype_name(wire_dtype)}")


def _concatenate(parts: Sequence[pb.Tensor], out: pb.Tensor) -> None:
    """Tensors of one dtype cut along their leading axis, joined in order (C-order bytes concatenate)."""
    out.dtype = parts[0].dtype
    out.shape[:] = [sum(p.shape[0] for p in parts), *parts[0].shape[1:]]
    out.data = b"".join(p.data for p in parts)


def _check_joinable(responses: Sequence[pb.EvaluateResponse], reduction: str) -> None:
    """What joining needs of the parts' answers, whatever their requests: one floating loss dtype,
    the same extras, sequences in all or none, and tensors to concatenate along a leading axis of
    the same dtype and trailing axes (InternalError naming the part and the field otherwise)."""
    first = responses[0]
    names = set(first.extras)
    for i, r in enumerate(responses):
        if r.loss.dtype not in _FLOATS or r.loss.dtype != first.loss.dtype:
            raise answers.malformed(
                f"part {i}'s loss has dtype {layout.dtype_name(r.loss.dtype)}; joining needs one floating dtype "
                f"(part 0's: {layout.dtype_name(first.loss.dtype)})"
            )
        if set(r.extras) != names or r.HasField("sequences") != first.HasField("sequences"):
            raise answers.malformed(f"part {i}'s extras or sequences are not those of part 0")
        tensors_ = [("loss", r.loss, first.loss)] if reduction == "none" else []
        tensors_ += [(f"extras[{shown(name)}]", r.extras[name], first.extras[name]) for name in names]
        for field, t, t0 in tensors_:
            if not t.shape or t.dtype != t0.dtype or t.shape[1:] != t0.shape[1:]:
                raise answers.malformed(
                    f"part {i}'s {field} has shape {answers.shape_text(t.shape)} of {layout.dtype_name(t.dtype)}, part 0's "
                    f"{answers.shape_text(t0.shape)} of {layout.dtype_name(t0.dtype)}: they do not join along their first axis"
                )


def join_responses(
    responses: Sequence[pb.EvaluateResponse],
    reduction: str,
    request_id: str = "",
    loss: str = layout.CROSS_ENTROPY,
    class_indices: bool = True,
    *,
    expected: Sequence[answers.Expected] | None = None,
) -> pb.EvaluateResponse:
    """The answer to the whole request from its parts' answers, in row order (see the module's
    docstring); ``loss`` and ``class_indices`` say how torch accumulates its mean (see
    :func:`lossd_client.reduction.accumulation_dtypes`) and signs a zero total
    (:func:`lossd_client.reduction.total`). A part's error is raised (the first failed part's);
    each part's answer is checked against ``expected`` (what a valid answer to each part holds)
    when given, and always for what joining needs (InternalError naming the part otherwise)."""
    for response in responses:
        answers.raise_item_error(response)
    if expected is not None:
        for response, expect in zip(responses, expected, strict=True):
            answers.evaluate_answer(response, expect)
    _check_joinable(responses, reduction)
    out = pb.EvaluateResponse(id=request_id)
    out.loss_sum = exact_sum([r.loss_sum for r in responses])
    out.weight_sum = exact_sum([r.weight_sum for r in responses])
    out.counted = sum(r.counted for r in responses)
    first = responses[0]
    if reduction == "none":
        _concatenate([r.loss for r in responses], out.loss)
    else:
        value = reduction_rule.total(out.loss_sum, loss, class_indices=class_indices)
        if reduction != "sum":
            acc = reduction_rule.accumulation_dtypes(loss, layout.dtype_name(first.loss.dtype), reduction, class_indices=class_indices)
            value = reduction_rule.quotient(value, out.weight_sum, *acc)
        out.loss.dtype = first.loss.dtype
        out.loss.data = scalar_bytes(value, first.loss.dtype)
    for name in first.extras:
        _concatenate([r.extras[name] for r in responses], out.extras[name])
    if first.HasField("sequences"):
        for name in SEQUENCE_FIELDS:
            joined = getattr(out.sequences, name)
            for r in responses:
                joined.extend(getattr(r.sequences, name))
    return out
