"""The server's answers checked against the requests they answer: what a valid answer holds, each rule once.

Every field of a valid answer follows from its request by torch's rules, as the server applies
them: the id is the request's; the loss has the reduction's shape (a scalar, or for 'none' the
shape of torch's per-element losses) and torch's result dtype for the request's dtypes; the extras
asked for, and only those, are shaped like the target; the per-sequence statistics asked for hold
one value per sequence; a comparison's outputs are shaped like its logits without V. :func:`expected`
derives these from a LossRequest and :func:`expected_comparison` from a comparison's inputs when
the request is sent; :func:`evaluate_answer` and :func:`comparison_answer` compare an answer with
them before anything is decoded. A field that differs, is missing or was never asked for is an
:class:`~lossd_client.errors.InternalError` naming the field, what the server sent and what the
request implies, never a silently wrong result or the bare ValueError / IndexError of decoding it.
The checks compare a few ints and shapes: no tensor is read or copied.

Where the client cannot derive an answer (a request torch refuses, which the server answers with
an error), only what decoding needs is checked: a dtype of lossd's, a shape of non-negative sizes
and data of its size.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import layout, tensors
from ._proto.lossd.v1 import loss_pb2 as pb
from .errors import InternalError, from_status_value, shown
from .types import LossRequest

FLOATS = frozenset({pb.FLOAT32, pb.FLOAT64, pb.FLOAT16, pb.BFLOAT16})
CLASS_INDICES = frozenset({pb.INT64, pb.UINT8})
#: The per-sequence fields of ``EvaluateResponse.sequences`` (one value per sequence, in order).
SEQUENCE_FIELDS = ("nll_sum", "tokens", "mean_nll", "perplexity", "is_greedy")
#: The extras whose dtype is not the compute dtype's (float64 for a float64 loss, else float32).
EXTRA_DTYPES = {"target_rank": pb.INT64, "argmax_correct": pb.BOOL}
#: A comparison's dense outputs; the last five exist only with tokens. argmax_agree and counted are bool.
DENSE_OUTPUTS = ("kl", "argmax_agree", "counted", "p_ref", "p_cand", "delta_p", "nll_ref", "nll_cand")
TARGET_OUTPUTS = frozenset(DENSE_OUTPUTS[3:])
_FLAGS = frozenset({"argmax_agree", "counted"})
#: Axes a tensor of an answer may have where the request implies no shape (torch's limit).
MAX_DIMS = 64
#: Axes of a shape that an error message shows.
_SHOWN_DIMS = 8


def malformed(what: str) -> InternalError:
    """The error of an answer that does not fit its request: ``what`` names the field and how."""
    return InternalError(f"the server's answer: {what}")


def shape_text(shape: Sequence[int]) -> str:
    """A shape for an error message: at most _SHOWN_DIMS axes of it."""
    if len(shape) <= _SHOWN_DIMS:
        return str(list(shape))
    return f"[{', '.join(str(s) for s in shape[:_SHOWN_DIMS])}, ...] ({len(shape)} axes)"


def check_tensor(msg: pb.Tensor, field: str, shape: tuple[int, ...] | None, dtype: int | None, why: str = "") -> None:
    """That the answer's tensor ``field`` has ``shape`` and ``dtype`` (None: any that decodes) and
    data of their size; InternalError naming the field otherwise (``why``: how the request implies the shape)."""
    got = tuple(msg.shape)
    if shape is not None and got != shape:
        raise malformed(f"{field} has shape {shape_text(got)}, the request implies {list(shape)}{why}")
    if dtype is not None and msg.dtype != dtype:
        raise malformed(f"{field} has dtype {layout.dtype_name(msg.dtype)}, the request implies {layout.dtype_name(dtype)}")
    itemsize = layout.ITEMSIZE.get(msg.dtype)
    if itemsize is None:
        raise malformed(f"{field} has dtype {layout.dtype_name(msg.dtype)}, none of lossd's")
    if shape is None and (len(got) > MAX_DIMS or any(s < 0 for s in got)):
        raise malformed(f"{field} has shape {shape_text(got)}, which no tensor has")
    nbytes = itemsize * math.prod(got)
    if len(msg.data) != nbytes:
        raise malformed(
            f"{field} has {len(msg.data)} bytes of data, its shape {shape_text(got)} of {layout.dtype_name(msg.dtype)} holds {nbytes}"
        )


def decoded(msg: pb.Tensor, field: str, *, as_torch: bool) -> Any:
    """A checked tensor of an answer, decoded (:func:`lossd_client.tensors.from_proto`); a shape
    numpy cannot hold ((0, 2**62) where the request implies none) is InternalError naming the field."""
    try:
        return tensors.from_proto(msg, as_torch=as_torch)
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise malformed(f"{field} cannot be decoded ({exc})") from None


def raise_item_error(response: pb.EvaluateResponse) -> None:
    """Raise an answer's ItemError as its LossdError (an answer with an error carries nothing else)."""
    if response.HasField("error"):
        raise from_status_value(response.error.code, response.error.message)


# --------------------------------------------------------------------------- Evaluate
@dataclass(frozen=True, slots=True)
class Expected:
    """What a valid answer to one EvaluateRequest holds (:func:`expected`)."""

    id: str
    loss: str = ""
    reduction: str = ""
    #: None: the client cannot derive the answer (a request torch refuses): only decoding is checked.
    loss_shape: tuple[int, ...] | None = None
    loss_dtype: int = pb.FLOAT32
    #: (name, shape, dtype) of each extra asked for, in order.
    extras: tuple[tuple[str, tuple[int, ...], int], ...] = ()
    #: The number of sequences whose statistics were asked for (None: not asked for).
    sequences: int | None = None

    def why(self) -> str:
        """How the request implies the loss's shape, for an error message."""
        if self.reduction != "none":
            return f" (reduction={self.reduction!r})"
        if self.loss == layout.BCE_WITH_LOGITS:
            return " (reduction='none': the input's shape)"
        if self.loss == layout.KL_DIV:
            return " (reduction='none': the shape the input and the target broadcast to)"
        return " (reduction='none': the input's shape without its class axis)"


def expected(req: LossRequest) -> Expected:
    """What a valid answer to ``req`` holds, from its shapes, dtypes and options as torch reads them
    (``req`` already checked and encoded by the client: :func:`lossd_client.core.request_head`)."""
    try:
        x, t = _wire(req.input), _wire(req.target)
        weight = None if req.weight is None else tensors.wire_dtype_of(req.weight)
        class_axis = None if req.class_axis is None else operator.index(req.class_axis)
        reduction = _reduction(req)
        names = tuple(dict.fromkeys((req.extras,) if isinstance(req.extras, str) else req.extras))
        stats = bool(req.sequence_stats)
        ruled = _loss_rule(req.loss, x, t, weight, class_axis)
    except (tensors.UnsupportedTensorError, ValueError, TypeError):
        ruled = None
    if ruled is None or ((names or stats) and not ruled[2]):  # extras and sequences need class indices
        return Expected(req.id)
    shape, dtype, _ = ruled
    compute = pb.FLOAT64 if dtype == pb.FLOAT64 else pb.FLOAT32
    extras = tuple((name, t[1], EXTRA_DTYPES.get(name, compute)) for name in names)
    sequences = (math.prod(t[1][:-1]) if t[1] else 1) if stats else None
    return Expected(req.id, req.loss, reduction, shape if reduction == "none" else (), dtype, extras, sequences)


def _wire(value: Any) -> tuple[int, tuple[int, ...]]:
    """(wire dtype, shape) of a request's tensor."""
    return tensors.wire_dtype_of(value), tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def _reduction(req: LossRequest) -> str:
    """The reduction the server applies: torch's legacy keywords decide it when either is given."""
    size_average, reduce = req.size_average, req.reduce
    if size_average is not None or reduce is not None:
        return layout.legacy_reduction(None if size_average is None else bool(size_average), None if reduce is None else bool(reduce))
    return "mean" if req.reduction == "elementwise_mean" else req.reduction


def _loss_rule(loss: str, x: tuple[int, tuple[int, ...]], t: tuple[int, tuple[int, ...]], weight: int | None,
               class_axis: int | None) -> tuple[tuple[int, ...], int, bool] | None:  # fmt: skip
    """(reduction='none''s shape, the loss's dtype, whether the target holds class indices) for
    (dtype, shape) of input ``x`` and target ``t``, as the server answers (its dtypes are torch's,
    checked against it in tests/unit/test_answer_rules.py); None for what torch refuses."""
    (x_dtype, x_shape), (t_dtype, t_shape) = x, t
    if x_dtype not in FLOATS:
        return None
    if loss == layout.KL_DIV:
        if t_dtype not in FLOATS:
            return None
        if bool(x_shape) != bool(t_shape):  # type promotion ranks a 0-d tensor below a dimensioned one
            dtype = x_dtype if x_shape else t_dtype
        else:
            dtype = _promoted(x_dtype, t_dtype)
        return tuple(np.broadcast_shapes(x_shape, t_shape)), dtype, False
    if loss == layout.BCE_WITH_LOGITS:  # torch computes it in the target's dtype, whatever the input's and the weights'
        return (x_shape, t_dtype, False) if t_dtype in FLOATS and t_shape == x_shape else None
    if not x_shape:
        return None
    axis = layout.resolve_class_axis(len(x_shape), class_axis)
    rows = x_shape[:axis] + x_shape[axis + 1 :]
    if loss == layout.CROSS_ENTROPY and t_shape == x_shape:  # class probabilities
        return (rows, _promoted(x_dtype, t_dtype, weight), False) if t_dtype in FLOATS else None
    return (rows, x_dtype, True) if t_dtype in CLASS_INDICES else None


def _promoted(*dtypes: int | None) -> int:
    """torch's promotion of the floating dtypes among ``dtypes`` (others rank below them)."""
    floats = {d for d in dtypes if d in FLOATS}
    if len(floats) == 1:
        return floats.pop()
    return pb.FLOAT64 if pb.FLOAT64 in floats else pb.FLOAT32


def evaluate_answer(response: pb.EvaluateResponse, expect: Expected | None) -> None:
    """Raise the answer's ItemError, or InternalError where it does not fit ``expect`` (None: a
    response whose request is not known here, checked for what decoding needs)."""
    raise_item_error(response)
    if expect is not None and response.id != expect.id:
        raise malformed(f"id is {shown(response.id)}, the request's is {shown(expect.id)}")
    if not response.HasField("loss"):
        raise malformed("loss is missing")
    if expect is None or expect.loss_shape is None:
        check_tensor(response.loss, "loss", None, None)
        for name, value in response.extras.items():
            check_tensor(value, f"extras[{shown(name)}]", None, None)
        return
    check_tensor(response.loss, "loss", expect.loss_shape, expect.loss_dtype, expect.why())
    _check_extras(response, expect)
    _check_sequences(response, expect)


def _check_extras(response: pb.EvaluateResponse, expect: Expected) -> None:
    got = response.extras
    asked = [name for name, _, _ in expect.extras]
    if len(got) != len(asked) or any(name not in got for name in asked):
        for name in got:
            if name not in asked:
                raise malformed(f"extras has {shown(name)}, which the request does not ask for (it asks for {asked or 'none'})")
        missing = next(name for name in asked if name not in got)
        raise malformed(f"extras[{missing!r}] is missing, the request asks for it")
    for name, shape, dtype in expect.extras:
        check_tensor(got[name], f"extras[{name!r}]", shape, dtype, " (the target's shape)")


def _check_sequences(response: pb.EvaluateResponse, expect: Expected) -> None:
    present = response.HasField("sequences")
    if expect.sequences is None:
        if present:
            raise malformed("sequences are present, the request does not ask for sequence_stats")
        return
    if not present:
        raise malformed(f"sequences are missing, the request asks for sequence_stats ({expect.sequences} sequences)")
    for name in SEQUENCE_FIELDS:
        count = len(getattr(response.sequences, name))
        if count != expect.sequences:
            raise malformed(
                f"sequences.{name} has {count} values, the request implies {expect.sequences} "
                "(one per sequence: the target's shape without its last axis)"
            )


# --------------------------------------------------------------------------- Compare
@dataclass(frozen=True, slots=True)
class ExpectedComparison:
    """What a valid answer to one comparison holds (:func:`expected_comparison`)."""

    id: str
    #: The positions' shape (the logits' without V); None: a comparison lossd refuses.
    shape: tuple[int, ...] | None = None
    #: kl's and the target outputs' dtype: float64 when either model's logits are, else float32.
    dtype: int = pb.FLOAT32
    tokens: bool = False
    top_k: int = 0
    #: The reference's and the candidate's top-k logprobs dtypes (each model's own compute dtype).
    top_k_dtypes: tuple[int, int] = (pb.FLOAT32, pb.FLOAT32)


def expected_comparison(request_id: str, reference: Any, candidate: Any, tokens: bool, top_k: int) -> ExpectedComparison:
    """What a valid answer to a comparison of ``reference`` and ``candidate`` logits holds (``tokens``:
    whether tokens were sent; ``top_k`` as checked by the client)."""
    try:
        (ref_dtype, ref_shape), (cand_dtype, _) = _wire(reference), _wire(candidate)
    except (tensors.UnsupportedTensorError, ValueError, TypeError):
        return ExpectedComparison(request_id)
    if ref_dtype not in FLOATS or cand_dtype not in FLOATS or not ref_shape:
        return ExpectedComparison(request_id)  # lossd refuses logits that are no floats, or 0-d
    dtype = pb.FLOAT64 if pb.FLOAT64 in (ref_dtype, cand_dtype) else pb.FLOAT32
    top_k_dtypes = (pb.FLOAT64 if ref_dtype == pb.FLOAT64 else pb.FLOAT32, pb.FLOAT64 if cand_dtype == pb.FLOAT64 else pb.FLOAT32)
    return ExpectedComparison(request_id, ref_shape[:-1], dtype, tokens, top_k, top_k_dtypes)


def comparison_answer(response: pb.CompareResponse, expect: ExpectedComparison) -> None:
    """InternalError naming the field where a CompareResponse does not fit ``expect``."""
    if response.id != expect.id:
        raise malformed(f"id is {shown(response.id)}, the request's is {shown(expect.id)}")
    if expect.shape is None:
        raise malformed("a comparison, for logits lossd refuses to compare (not floating-point, or 0-d)")
    why = " (the logits' shape without V)"
    for name in DENSE_OUTPUTS:
        present = response.HasField(name)
        if name in TARGET_OUTPUTS and not expect.tokens:
            if present:
                raise malformed(f"{name} is present, the request sends no tokens")
        elif not present:
            raise malformed(f"{name} is missing" + (", the request sends tokens" if name in TARGET_OUTPUTS else ""))
        else:
            check_tensor(getattr(response, name), name, expect.shape, pb.BOOL if name in _FLAGS else expect.dtype, why)
    for name, dtype in zip(("reference_top_k", "candidate_top_k"), expect.top_k_dtypes, strict=True):
        present = response.HasField(name)
        if not expect.top_k:
            if present:
                raise malformed(f"{name} is present, the request asks for no top_k")
            continue
        if not present:
            raise malformed(f"{name} is missing, the request asks for top_k={expect.top_k}")
        shape = (*expect.shape, expect.top_k)
        check_tensor(getattr(response, name).ids, f"{name}.ids", shape, pb.INT64, " (the positions' shape and top_k)")
        check_tensor(getattr(response, name).logprobs, f"{name}.logprobs", shape, dtype, " (the positions' shape and top_k)")
