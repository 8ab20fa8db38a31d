"""Property tests: lossd_server.engine.evaluate against torch.nn.functional itself.

Values: float32 / float64 inputs are compared with torch in the same dtype (or, where the
engine's float64 accumulation is the more exact answer, torch in float64 cast to the dtype);
float16 / bfloat16 inputs with torch computed in float32 and cast to torch's output dtype,
within that dtype's tolerance, and the output dtype must be torch's own output dtype.
Errors: the engine raises InvalidInput exactly when torch raises.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lossd_server import batch_engine, engine

FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
HALF = (torch.float16, torch.bfloat16)
#: Exactly representable in every float dtype, so weight sums (mean denominators) are exact.
WEIGHT_VALUES = (-1.5, -1.0, 0.0, 0.5, 1.0, 2.0, 3.25)
SETTINGS = settings(max_examples=int(os.environ.get("LOSSD_HYPOTHESIS_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def torch_call(fn: str, *args: Any, **kwargs: Any) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(F, fn)(*args, **kwargs)


def cast_floats(values: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in values.items()}


def assert_matches_torch(actual: torch.Tensor, fn: str, tensors: dict[str, Any], options: dict[str, Any]) -> None:
    """``actual`` is torch's value in torch's output dtype and shape (see module docstring)."""
    own = torch_call(fn, **tensors, **options)
    assert actual.dtype == own.dtype
    assert actual.shape == own.shape
    in_dtype = tensors["input"].dtype
    references = [] if in_dtype in HALF else [own]
    if in_dtype != torch.float64:
        references.append(torch_call(fn, **cast_floats(tensors, torch.float32), **options).to(own.dtype))
    references.append(torch_call(fn, **cast_floats(tensors, torch.float64), **options).to(own.dtype))
    errors = []
    for expected in references:
        try:
            torch.testing.assert_close(actual, expected, equal_nan=True)
            return
        except AssertionError as exc:
            errors.append(str(exc))
    raise AssertionError("\n".join(errors))


DEVICE = os.environ.get("LOSSD_TEST_DEVICE") or "cpu"  # LOSSD_TEST_DEVICE=cuda: the engine on a GPU against CPU torch


def evaluate(spec: engine.LossSpec, tensors: dict[str, Any], **kwargs: Any) -> engine.LossResult:
    kwargs.setdefault("device", DEVICE)
    return engine.evaluate(spec, tensors["input"], tensors["target"], tensors.get("weight"), tensors.get("pos_weight"), **kwargs)


def assert_chunking_invariant(spec: engine.LossSpec, tensors: dict[str, Any], whole: engine.LossResult) -> None:
    tiny = evaluate(spec, tensors, chunk_bytes=64)
    torch.testing.assert_close(tiny.loss, whole.loss, equal_nan=True)
    assert tiny.counted == whole.counted
    assert tiny.weight_sum == pytest.approx(whole.weight_sum, rel=1e-12, nan_ok=True)
    assert tiny.loss_sum == pytest.approx(whole.loss_sum, rel=1e-9, abs=1e-9, nan_ok=True)


# ---------------------------------------------------------------------------- strategies
@st.composite
def class_shapes(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input shape, class-index target shape): (C), (N, C) or (N, C, d1..dK), K <= 3."""
    c = draw(st.integers(1, 5))
    if draw(st.integers(0, 5)) == 0:
        return (c,), draw(st.sampled_from([(), (1,)]))
    n = draw(st.integers(0, 3))
    dims = tuple(draw(st.lists(st.integers(1, 3), max_size=3)))
    return (n, c, *dims), (n, *dims)


@st.composite
def logits(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.5, 2.0, 8.0]))
    if x.numel() and draw(st.booleans()):
        mask = torch.rand(shape, generator=g) < 0.2
        x = x.masked_fill(mask, -math.inf)
    return x.to(dtype)


@st.composite
def class_case(draw: st.DrawFn) -> tuple[engine.LossSpec, dict[str, Any]]:
    dtype = draw(st.sampled_from(FLOATS))
    in_shape, t_shape = draw(class_shapes())
    c = in_shape[0] if len(in_shape) == 1 else in_shape[1]
    loss = draw(st.sampled_from([engine.CROSS_ENTROPY, engine.NLL]))
    x = draw(logits(in_shape, dtype))
    if loss == engine.NLL:
        x = torch.log_softmax(x.to(torch.float64), 0 if len(in_shape) == 1 else 1).to(dtype)
    ignore_index = draw(st.sampled_from([-100, -1, 0, c - 1, c, c + 7]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    target = torch.randint(0, c, t_shape, generator=g)
    fill = draw(st.sampled_from(["none", "some", "all"]))
    if fill == "all":
        target = torch.full(t_shape, ignore_index)
    elif fill == "some" and target.numel():
        target = torch.where(torch.rand(t_shape, generator=g) < 0.3, ignore_index, target)
    target_dtype = draw(st.sampled_from([torch.int64, torch.uint8]))
    if target_dtype == torch.uint8:
        target = torch.where((target >= 0) & (target < 256), target, 0).to(torch.uint8)
    tensors: dict[str, Any] = {"input": x, "target": target}
    if draw(st.booleans()):
        tensors["weight"] = torch.tensor(draw(st.lists(st.sampled_from(WEIGHT_VALUES), min_size=c, max_size=c)), dtype=dtype)
        if len(in_shape) >= 3 and draw(st.integers(0, 3)) == 0:  # torch takes any shape with C elements there
            tensors["weight"] = tensors["weight"].reshape(draw(st.sampled_from([(1, c), (c, 1), (c, 1, 1)])))
    ls = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0, -0.2])) if loss == engine.CROSS_ENTROPY else 0.0
    spec = engine.LossSpec(loss=loss, reduction=draw(st.sampled_from(engine.REDUCTIONS)), ignore_index=ignore_index, label_smoothing=ls)
    return spec, tensors


@st.composite
def prob_case(draw: st.DrawFn) -> tuple[engine.LossSpec, dict[str, Any]]:
    dtype = draw(st.sampled_from(FLOATS))
    in_shape, _ = draw(class_shapes())
    c = in_shape[0] if len(in_shape) == 1 else in_shape[1]
    x = draw(logits(in_shape, dtype))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    p = torch.softmax(torch.randn(in_shape, generator=g, dtype=torch.float64) * 3, 0 if len(in_shape) == 1 else 1).to(dtype)
    tensors: dict[str, Any] = {"input": x, "target": p}
    if draw(st.booleans()):
        tensors["weight"] = torch.tensor(draw(st.lists(st.sampled_from(WEIGHT_VALUES), min_size=c, max_size=c)), dtype=dtype)
    spec = engine.LossSpec(
        reduction=draw(st.sampled_from(engine.REDUCTIONS)),
        ignore_index=draw(st.sampled_from([-100, -1, -5])),
        label_smoothing=draw(st.sampled_from([0.0, 0.2, 0.7, 1.0, -0.3])),
    )
    return spec, tensors


def broadcastable_to(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[int, ...]:
    k = draw(st.integers(0, len(shape)))
    suffix = shape[len(shape) - k :]
    return tuple(1 if draw(st.booleans()) else s for s in suffix)


@st.composite
def bce_case(draw: st.DrawFn) -> tuple[engine.LossSpec, dict[str, Any]]:
    dtype = draw(st.sampled_from(FLOATS))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul(4).to(dtype)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        t = t.round()
    tensors: dict[str, Any] = {"input": x, "target": t.to(dtype)}
    for name in ("weight", "pos_weight"):
        if draw(st.booleans()):
            wshape = broadcastable_to(draw, shape)
            values = torch.tensor(WEIGHT_VALUES, dtype=torch.float64)
            idx = torch.randint(0, len(WEIGHT_VALUES), wshape, generator=g)
            tensors[name] = values[idx].abs().to(dtype) if name == "pos_weight" else values[idx].to(dtype)
    spec = engine.LossSpec(loss=engine.BCE_WITH_LOGITS, reduction=draw(st.sampled_from(engine.REDUCTIONS)))
    return spec, tensors


def torch_options(spec: engine.LossSpec) -> dict[str, Any]:
    options: dict[str, Any] = {"reduction": spec.reduction}
    if spec.loss != engine.BCE_WITH_LOGITS or spec.ignore_index != -100:  # -100: unset (BCE takes none: TypeError)
        options["ignore_index"] = spec.ignore_index
    if spec.loss == engine.CROSS_ENTROPY:
        options["label_smoothing"] = spec.label_smoothing
    return options


def check_case(spec: engine.LossSpec, tensors: dict[str, Any]) -> None:
    options = torch_options(spec)
    try:
        torch_call(spec.loss, **tensors, **options)
    except Exception:  # noqa: BLE001 - torch rejects: so must the engine
        with pytest.raises(engine.InvalidInput):
            evaluate(spec, tensors)
        return
    result = evaluate(spec, tensors)
    assert_matches_torch(result.loss, spec.loss, tensors, options)
    assert_chunking_invariant(spec, tensors, result)
    if spec.reduction == "mean" and result.weight_sum != 0.0:
        # the totals a client combines across requests reproduce the mean (with a zero total
        # weight torch's label-smoothed mean is nan + inf: not a quotient of the totals)
        mean = torch.tensor(engine.divide(result.loss_sum, result.weight_sum), dtype=torch.float64)
        torch.testing.assert_close(result.loss, mean.to(result.loss.dtype), equal_nan=True)


# ---------------------------------------------------------------------------- properties
@SETTINGS
@given(class_case())
def test_class_index_targets_match_torch(case: tuple[engine.LossSpec, dict[str, Any]]) -> None:
    check_case(*case)


@SETTINGS
@given(prob_case())
def test_probability_targets_match_torch(case: tuple[engine.LossSpec, dict[str, Any]]) -> None:
    check_case(*case)


@SETTINGS
@given(bce_case())
def test_bce_with_logits_matches_torch(case: tuple[engine.LossSpec, dict[str, Any]]) -> None:
    check_case(*case)


@st.composite
def bce_mixed_dtypes_case(draw: st.DrawFn) -> tuple[engine.LossSpec, dict[str, Any]]:
    """float32 / float64 inputs with weights of any float dtype: torch computes ``pos_weight - 1``
    in the pos_weight's own dtype and multiplies by the weight in the promoted dtype."""
    dtype = draw(st.sampled_from((torch.float32, torch.float64)))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tensors: dict[str, Any] = {
        "input": torch.randn(shape, generator=g, dtype=torch.float64).mul(4).to(dtype),
        "target": torch.rand(shape, generator=g, dtype=torch.float64).to(dtype),
    }
    for name in ("weight", "pos_weight"):
        wdtype = draw(st.sampled_from((None, *FLOATS)))
        if wdtype is not None:
            wshape = broadcastable_to(draw, shape)
            tensors[name] = torch.rand(wshape, generator=g, dtype=torch.float64).mul(3).to(wdtype)
    spec = engine.LossSpec(loss=engine.BCE_WITH_LOGITS, reduction=draw(st.sampled_from(engine.REDUCTIONS)))
    return spec, tensors


@SETTINGS
@given(bce_mixed_dtypes_case())
def test_bce_weights_of_other_dtypes_are_used_as_torch_uses_them(case: tuple[engine.LossSpec, dict[str, Any]]) -> None:
    """Per-element losses bit for bit (a float16 pos_weight beside a float32 input was converted
    to float32 before ``pos_weight - 1``: up to 1.7e-4 off, beyond assert_close)."""
    spec, tensors = case
    want = torch_call(spec.loss, **tensors, reduction=spec.reduction)
    got = evaluate(spec, tensors).loss
    assert got.dtype == want.dtype and got.shape == want.shape
    if spec.reduction == "none":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, equal_nan=True)


def torchs_and_engines(spec: engine.LossSpec, tensors: dict[str, Any], options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(torch's loss, the engine's) of the same dtype and shape; None when torch rejects the
    request, which the engine then must too."""
    try:
        want = torch_call(spec.loss, **tensors, **options)
    except Exception:  # noqa: BLE001 - torch rejects: so must the engine
        with pytest.raises(engine.InvalidInput):
            evaluate(spec, tensors)
        return None
    got = evaluate(spec, tensors).loss
    assert got.dtype == want.dtype and got.shape == want.shape
    return want, got


@st.composite
def prob_mixed_dtypes_case(draw: st.DrawFn) -> tuple[engine.LossSpec, dict[str, Any]]:
    """Probability targets (and class weights) of any float dtype beside a float32 / float64 input."""
    dtype = draw(st.sampled_from((torch.float32, torch.float64)))
    in_shape, _ = draw(class_shapes())
    c = in_shape[0] if len(in_shape) == 1 else in_shape[1]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    p = torch.softmax(torch.randn(in_shape, generator=g, dtype=torch.float64) * 3, 0 if len(in_shape) == 1 else 1)
    tensors: dict[str, Any] = {"input": draw(logits(in_shape, dtype)), "target": p.to(draw(st.sampled_from(FLOATS)))}
    if draw(st.booleans()):
        weights = draw(st.lists(st.sampled_from(WEIGHT_VALUES), min_size=c, max_size=c))
        tensors["weight"] = torch.tensor(weights, dtype=draw(st.sampled_from(FLOATS)))
    spec = engine.LossSpec(reduction=draw(st.sampled_from(engine.REDUCTIONS)), label_smoothing=draw(st.sampled_from([0.0, 0.2, 0.7, 1.0])))
    return spec, tensors


@SETTINGS
@given(prob_mixed_dtypes_case())
@example(
    (
        engine.LossSpec(reduction="none", label_smoothing=0.2),
        {
            "input": torch.linspace(-2, 2, 10, dtype=torch.float32).reshape(2, 5),
            "target": torch.softmax(torch.linspace(3, -1, 10, dtype=torch.float64).reshape(2, 5), 1).to(torch.bfloat16),
        },
    )
)
def test_probability_targets_of_another_dtype_are_smoothed_as_torch_smooths_them(case: tuple[engine.LossSpec, dict[str, Any]]) -> None:
    """torch smooths a probability target in its own dtype, before promoting it: a float16 /
    bfloat16 target beside a float32 input is rounded to its dtype twice (the engine smoothed it in
    float32: up to 2.3e-3 relative off torch's own float32 result)."""
    outcomes = torchs_and_engines(*case, torch_options(case[0]))
    if outcomes is not None:
        torch.testing.assert_close(outcomes[1], outcomes[0], equal_nan=True)


@st.composite
def bce_small_mixed_dtypes_case(draw: st.DrawFn) -> tuple[engine.LossSpec, dict[str, Any]]:
    """binary_cross_entropy_with_logits over 0-d and tiny inputs, every operand of its own float dtype."""
    shape = draw(st.sampled_from([(), (1,), (3,), (2, 1)]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tensors: dict[str, Any] = {
        "input": torch.randn(shape, generator=g, dtype=torch.float64).mul(4).to(draw(st.sampled_from(FLOATS))),
        "target": torch.rand(shape, generator=g, dtype=torch.float64).to(draw(st.sampled_from(FLOATS))),
    }
    for name in ("weight", "pos_weight"):
        wdtype = draw(st.sampled_from((None, *FLOATS)))
        if wdtype is not None:
            wshape = draw(st.sampled_from([(), broadcastable_to(draw, shape)]))
            tensors[name] = torch.rand(wshape, generator=g, dtype=torch.float64).mul(3).to(wdtype)
    return engine.LossSpec(loss=engine.BCE_WITH_LOGITS, reduction=draw(st.sampled_from(engine.REDUCTIONS))), tensors


@SETTINGS
@given(bce_small_mixed_dtypes_case())
@example(
    (
        engine.LossSpec(loss=engine.BCE_WITH_LOGITS, reduction="none"),
        {
            "input": torch.tensor(-1.8359375, dtype=torch.bfloat16),
            "target": torch.tensor(0.89111328125, dtype=torch.float16),
            "pos_weight": torch.tensor(0.08544921875, dtype=torch.bfloat16),
        },
    )
)
def test_bce_over_a_0d_input_promotes_its_0d_weights_as_torch_does(case: tuple[engine.LossSpec, dict[str, Any]]) -> None:
    """With a 0-d input and target, torch promotes a 0-d pos_weight or weight as their equal (all
    three are 0-d); the engine views the input as rows and kept the weights 0-d, so a bfloat16
    pos_weight beside a float16 target computed ``(pos_weight - 1) * target`` in float16 (0.16919
    for torch's 0.16724). torch's own result is a reference whatever the input's dtype (a float64
    target beside a bfloat16 input is answered as torch rounds it), torch's in float32 one for
    16-bit results (the engine computes them in float32, see assert_matches_torch)."""
    spec, tensors = case
    outcomes = torchs_and_engines(spec, tensors, {"reduction": spec.reduction})
    if outcomes is None:
        return
    want, got = outcomes
    if want.dtype in HALF:
        in_float32 = torch_call(spec.loss, **cast_floats(tensors, torch.float32), reduction=spec.reduction).to(want.dtype)
        if torch.allclose(got.double(), in_float32.double(), rtol=1e-3, atol=1e-5, equal_nan=True):
            return
    torch.testing.assert_close(got, want, equal_nan=True)


ALL_DTYPES = (*FLOATS, torch.int64, torch.int32, torch.uint8, torch.int8, torch.bool)


@st.composite
def any_case(draw: st.DrawFn) -> tuple[engine.LossSpec, dict[str, Any]]:
    """Random and often invalid combinations of shapes, dtypes and options."""
    loss = draw(st.sampled_from(engine.LOSSES))
    in_shape = tuple(draw(st.lists(st.integers(0, 3), max_size=4)))
    in_dtype = draw(st.sampled_from(ALL_DTYPES))
    mode = draw(st.sampled_from(["class", "same", "random"]))
    if mode == "class" and len(in_shape) >= 1:
        t_shape = () if len(in_shape) == 1 else (in_shape[0], *in_shape[2:])
    elif mode == "same":
        t_shape = in_shape
    else:
        t_shape = tuple(draw(st.lists(st.integers(0, 3), max_size=4)))
    t_dtype = draw(st.sampled_from(ALL_DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def tensor(shape: tuple[int, ...], dtype: torch.dtype, high: int = 4) -> torch.Tensor:
        if dtype.is_floating_point:
            return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
        if dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=g).bool()
        low = -2 if dtype not in (torch.uint8,) else 0
        return torch.randint(low, high, shape, generator=g).to(dtype)

    tensors: dict[str, Any] = {"input": tensor(in_shape, in_dtype), "target": tensor(t_shape, t_dtype)}
    for name in ("weight", "pos_weight"):
        if draw(st.integers(0, 2)) == 0:
            w_shape = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
            tensors[name] = tensor(w_shape, draw(st.sampled_from(ALL_DTYPES)))
    spec = engine.LossSpec(
        loss=loss,
        reduction=draw(st.sampled_from(engine.REDUCTIONS)),
        ignore_index=draw(st.sampled_from([-100, -2, 0, 1, 3])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, -0.5, 0.3, 1.0, 1.5])),
    )
    return spec, tensors


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_case())
def test_engine_rejects_exactly_what_torch_rejects(case: tuple[engine.LossSpec, dict[str, Any]]) -> None:
    spec, tensors = case
    options = torch_options(spec)
    if spec.loss == engine.NLL and spec.label_smoothing:
        return  # nll_loss has no label_smoothing argument: nothing for torch to compare with
    if spec.loss == engine.BCE_WITH_LOGITS:
        if spec.label_smoothing:
            return
    elif "pos_weight" in tensors:
        return  # only BCE takes pos_weight
    try:
        expected = torch_call(spec.loss, **tensors, **options)
    except Exception:  # noqa: BLE001
        with pytest.raises(engine.InvalidInput):
            evaluate(spec, tensors)
        return
    result = evaluate(spec, tensors)
    assert result.loss.dtype == expected.dtype
    assert result.loss.shape == expected.shape


def test_nll_rejects_label_smoothing_and_ce_rejects_pos_weight() -> None:
    x, t = torch.randn(2, 3), torch.tensor([0, 2])
    with pytest.raises(engine.InvalidInput) as info:
        engine.evaluate(engine.LossSpec(loss=engine.NLL, label_smoothing=0.1), x, t)
    assert info.value.field == "options.label_smoothing"
    with pytest.raises(engine.InvalidInput) as info:
        engine.evaluate(engine.LossSpec(), x, t, None, torch.ones(3))
    assert info.value.field == "options.pos_weight"


def test_input_is_never_modified() -> None:
    x = torch.randn(3, 4, 2)
    x[0, 1, 0] = -math.inf
    t = torch.tensor([[0, 3], [-100, 1], [2, 2]])
    w = torch.rand(4)
    before = (x.clone(), t.clone(), w.clone())
    engine.evaluate(engine.LossSpec(label_smoothing=0.2, reduction="none"), x, t, w, chunk_bytes=64)
    for a, b in zip((x, t, w), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 2)])
def test_fused_path_leaves_the_input_alone_and_computes_half_in_float32(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """The fused cross_entropy kernel writes log-probabilities over the rows only when they are
    its own upcast copy: the caller's tensor is never written, and half / bfloat16 per-element
    losses are exactly those of float32 maths rounded to the dtype, over several chunks.

    The reference is torch's kernel over the input as it is laid out: a K-dim input is evaluated in
    torch's (N, C, d) layout, whose log_softmax along the strided class axis differs from the row
    kernel's by an ulp in about a fifth of the elements."""
    gen = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=gen) * 4).to(dtype)
    x.view(-1)[1] = -math.inf
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    t.view(-1)[0] = -100
    before = x.clone()
    got = engine.evaluate(engine.LossSpec(reduction="none"), x, t, chunk_bytes=64).loss
    assert torch.equal(x, before)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert torch.equal(got, F.cross_entropy(x.to(compute), t, reduction="none").to(dtype))


@st.composite
def kdim_case(draw: st.DrawFn, *, class_cross_entropy: bool = False) -> tuple[engine.LossSpec, dict[str, Any]]:
    """(N, C, d1..dk) inputs: class indices through torch's fused kernel (no extras), or class
    probabilities (``class_cross_entropy``: only cross_entropy of class indices)."""
    dtype = draw(st.sampled_from(FLOATS))
    n, c = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    dims = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn((n, c, *dims), generator=g, dtype=torch.float64).mul(draw(st.sampled_from((1.0, 8.0)))).to(dtype)
    probabilities = not class_cross_entropy and draw(st.booleans())
    if probabilities:
        t = torch.rand((n, c, *dims), generator=g, dtype=torch.float64).softmax(1).to(dtype)
    else:
        t = torch.randint(0, c, (n, *dims), generator=g)
        if draw(st.booleans()):
            t.view(-1)[:: draw(st.integers(2, 5))] = -100
    tensors: dict[str, Any] = {"input": x, "target": t}
    if draw(st.booleans()):
        tensors["weight"] = torch.rand(c, generator=g, dtype=torch.float64).mul(2).to(dtype)
    loss = engine.CROSS_ENTROPY if probabilities or class_cross_entropy else draw(st.sampled_from((engine.CROSS_ENTROPY, engine.NLL)))
    smoothing = draw(st.sampled_from((0.0, 0.1))) if loss == engine.CROSS_ENTROPY else 0.0
    reduction = draw(st.sampled_from(("none", "sum") if smoothing and not probabilities else engine.REDUCTIONS))
    return engine.LossSpec(loss=loss, reduction=reduction, label_smoothing=smoothing), tensors


@SETTINGS
@given(kdim_case(), st.sampled_from((64, 4096, engine.DEFAULT_CHUNK_BYTES)))
@example(  # a 16-bit input with 16-bit probabilities, smoothed: computed as torch computes it in float32
    (
        engine.LossSpec(reduction="none", label_smoothing=0.1),
        {
            "input": torch.tensor([[[12.3281], [-2.3477]]], dtype=torch.float16),
            "target": torch.tensor([[[0.3867], [0.6133]]], dtype=torch.float16),
        },
    ),
    64,
)
def test_kdim_inputs_are_torchs_own_kernel_bit_for_bit(case: tuple[engine.LossSpec, dict[str, Any]], chunk_bytes: int) -> None:
    """Per-element losses of (N, C, d...) inputs are torch's, bit for bit, in any chunking (they
    were computed as (rows, C): an ulp off in about a fifth of float32 elements); 16-bit inputs
    are torch's float32 maths in the same layout, rounded."""
    spec, tensors = case
    options = torch_options(spec)
    compute = torch.float64 if tensors["input"].dtype == torch.float64 else torch.float32
    want = torch_call(spec.loss, **cast_floats(tensors, compute), **options)
    got = evaluate(spec, tensors, chunk_bytes=chunk_bytes).loss
    assert got.dtype == tensors["input"].dtype
    if spec.reduction == "none":
        assert torch.equal(got, want.to(got.dtype))
    else:
        assert_matches_torch(got, spec.loss, tensors, options)  # float64 sums: see the module docstring


@SETTINGS
@given(kdim_case(class_cross_entropy=True), st.sampled_from((64, 4096, engine.DEFAULT_CHUNK_BYTES)), st.booleans())
def test_kdim_extras_come_with_torchs_own_log_probabilities_bit_for_bit(
    case: tuple[engine.LossSpec, dict[str, Any]], chunk_bytes: int, sequence_stats: bool
) -> None:
    """With per-token extras (or sequence statistics) the log-probabilities of (N, C, d...)
    cross_entropy inputs are still taken in torch's layout: per-element losses are torch's bit for
    bit, and target_logprob is torch's log_softmax along the class axis, picked (they were taken
    as (rows, C): an ulp off in about a fifth of the float32 elements, losses included)."""
    spec, tensors = case
    t = tensors["target"]
    spec = dataclasses.replace(spec, reduction="none", extras=("target_logprob", "entropy"), sequence_stats=sequence_stats)
    compute = torch.float64 if tensors["input"].dtype == torch.float64 else torch.float32
    floats = cast_floats(tensors, compute)
    got = evaluate(spec, tensors, chunk_bytes=chunk_bytes)
    assert torch.equal(got.loss, torch_call(spec.loss, **floats, **torch_options(spec)).to(got.loss.dtype))
    ignored = t == spec.ignore_index
    logp = torch.log_softmax(floats["input"], 1).gather(1, t.masked_fill(ignored, 0).unsqueeze(1)).squeeze(1)
    assert torch.equal(got.extras["target_logprob"].reshape(t.shape), logp.masked_fill(ignored, 0.0).to(got.extras["target_logprob"].dtype))


def test_kdim_requests_with_extras_are_not_fused_with_others_rows() -> None:
    """Two (N, C, d) requests with extras in one batch: each keeps torch's K-dim log-probabilities
    (as rows of a fused pass they were an ulp off)."""
    gen = torch.Generator().manual_seed(7)
    spec = engine.LossSpec(reduction="none", extras=("target_logprob",))
    jobs, wants = [], []
    for _ in range(2):
        x, t = torch.randn(2, 33, 5, generator=gen) * 4, torch.randint(0, 33, (2, 5), generator=gen)
        jobs.append(batch_engine.Job(engine.plan(spec, x.shape, x.dtype, t), x, t))
        wants.append(F.cross_entropy(x, t, reduction="none"))
    for result, want in zip(batch_engine.evaluate_batch(jobs), wants, strict=True):
        assert torch.equal(result.loss, want)


def test_cached_validation_still_checks_each_requests_targets() -> None:
    """Plans for an options/shape/dtype combination seen before come from a cache: the targets of
    every request are still resolved and checked, and a combination torch accepts only because
    every target was ignored is never cached."""
    x = torch.randn(4, 5)
    for seed in range(3):
        t = torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(seed))
        t[seed] = -100
        torch.testing.assert_close(evaluate(engine.LossSpec(), {"input": x, "target": t}).loss, F.cross_entropy(x, t))
    with pytest.raises(engine.InvalidInput, match="out of bounds"):
        engine.plan(engine.LossSpec(), x.shape, x.dtype, torch.tensor([0, 1, 7, 2]))
    x64, w = torch.randn(1, 2, dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    ignored = torch.tensor([0], dtype=torch.uint8)
    spec = engine.LossSpec(ignore_index=0, label_smoothing=0.1)
    got = evaluate(spec, {"input": x64, "target": ignored, "weight": w}).loss
    want = F.cross_entropy(x64, ignored, weight=w, ignore_index=0, label_smoothing=0.1)
    torch.testing.assert_close(got, want, equal_nan=True)
    with pytest.raises(engine.InvalidInput):  # torch rejects uint8 + weight + smoothing once a target counts
        engine.plan(spec, x64.shape, x64.dtype, torch.tensor([1], dtype=torch.uint8), w)


def test_a_class_weight_that_is_not_1d_is_checked_against_each_requests_targets() -> None:
    """A smoothed 'mean' with a (C, 1) weight is accepted by torch only while no target counts, so
    such plans are never cached: a request whose targets all are ignored must not let the next
    one, with a target that counts, through (and each request gets its own weight's values)."""
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    column, row = torch.rand(4, 1, dtype=torch.float64), torch.rand(1, 4, dtype=torch.float64)
    ignored = torch.full((2, 3), -100)
    counts = ignored.clone()
    counts[1, 2] = 3
    spec = engine.LossSpec(label_smoothing=0.1)
    for _ in range(2):
        got = evaluate(spec, {"input": x, "target": ignored, "weight": column}).loss
        torch.testing.assert_close(got, F.cross_entropy(x, ignored, weight=column, label_smoothing=0.1), equal_nan=True)
    with pytest.raises(RuntimeError, match="Index tensor must have the same number of dimensions"):
        F.cross_entropy(x, counts, weight=column, label_smoothing=0.1)
    with pytest.raises(engine.InvalidInput, match="Index tensor must have the same number of dimensions") as info:
        evaluate(spec, {"input": x, "target": counts, "weight": column})
    assert info.value.field == "options.weight"
    t = torch.tensor([[0, 1, 2], [3, 3, 0]])
    for w in (row, row * 2, row.flip(1)):
        got = evaluate(engine.LossSpec(), {"input": x, "target": t, "weight": w}).loss
        torch.testing.assert_close(got, F.cross_entropy(x, t, weight=w))


@pytest.mark.parametrize(("shape", "axis"), [((3, 5, 21, 7), 2), ((3, 5, 21, 7), -2), ((2, 3, 4, 9, 5), 3), ((4, 6, 11), -1), ((4, 6, 11), 1)])
def test_any_class_axis_is_torchs_log_softmax_along_that_axis_bit_for_bit(shape: tuple[int, ...], axis: int) -> None:
    """class_axis=k is F.log_softmax(input, k) as the input is laid out, then the picked class."""
    gen = torch.Generator().manual_seed(len(shape) * 10 + axis)
    x = torch.randn(shape, generator=gen) * 4
    t = torch.randint(0, shape[axis], tuple(s for i, s in enumerate(shape) if i != axis % len(shape)), generator=gen)
    got = engine.evaluate(engine.LossSpec(reduction="none", class_axis=axis), x, t, chunk_bytes=256).loss
    assert torch.equal(got, F.nll_loss(F.log_softmax(x, dim=axis).movedim(axis, 1), t, reduction="none"))


# ---------------------------------------------------------------- class weights that are not (C,)
def _class_weight_shapes(c: int) -> list[tuple[int, ...]]:
    """Weight shapes with C elements but more axes (or none), and some without C elements."""
    shapes = {(c,), (1, c), (c, 1), (c, 1, 1), (1, 1, c), (1, c, 1), (c + 1,), (1, c + 1), (c, 2)}
    shapes |= {(): {(2, 3), (3, 2), (3, 2, 1)}, 1: {()}, 0: {(0, 3), (3, 0), (1, 0, 2)}}.get(c if c < 2 else (), set())
    return sorted(shapes, key=lambda s: (len(s), s))


def _class_weight_cases(ndim: int, kind: str) -> list[tuple[str, engine.LossSpec, dict[str, Any], tuple[Any, ...]]]:
    """Every weight shape x C x reduction x target fill (counted, all ignored, an in-range
    ignore_index) x layout (torch's, and the classes on another axis) x batch (N = 2, N = 0)."""
    loss, smoothing = {"nll": (engine.NLL, 0.0), "ce": (engine.CROSS_ENTROPY, 0.0), "ce_ls": (engine.CROSS_ENTROPY, 0.1),
                       "ce_neg_ls": (engine.CROSS_ENTROPY, -0.1), "prob": (engine.CROSS_ENTROPY, 0.0),
                       "prob_ls": (engine.CROSS_ENTROPY, 0.1)}[kind]  # fmt: skip
    gen = torch.Generator().manual_seed(ndim)
    cases = []
    for c in (0, 1, 6):
        for n in (2, 0) if ndim >= 2 else (None,):
            shape = (c,) if ndim == 1 else (n, c, *(2,) * (ndim - 2))
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            if loss == engine.NLL:
                x = torch.log_softmax(x, 0 if ndim == 1 else 1)
            tshape = () if ndim == 1 else (n, *shape[2:])
            for fill in ("counted", "ignored", "ignore_index") if kind.startswith(("ce", "nll")) else ("probabilities",):
                ignore_index = 1 if fill == "ignore_index" else -100
                if fill == "probabilities":
                    t = torch.rand(shape, generator=gen, dtype=torch.float64)
                elif fill == "ignored" or c == 0:
                    t = torch.full(tshape, ignore_index)
                else:
                    t = torch.randint(0, c, tshape, generator=gen)
                for wshape in _class_weight_shapes(c):
                    w = torch.rand(wshape, generator=gen, dtype=torch.float64) + 0.5
                    for reduction in engine.REDUCTIONS:
                        for axis in (None, 0 if ndim == 2 else ndim - 1) if ndim >= 2 else (None,):
                            if axis is not None and c == 0:
                                continue  # torch's reshape of (N, 0, d...) 3-d / 5-d inputs fails in its layout only
                            spec = engine.LossSpec(
                                loss=loss, reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing, class_axis=axis
                            )
                            # the same call in torch's layout: the class axis moved to dim 1
                            xs = x if axis is None else x.movedim(1, axis)
                            ts = t if axis is None or fill != "probabilities" else t.movedim(1, axis)
                            cases.append(((c, n, fill, wshape, reduction, axis), spec, {"input": xs, "target": ts, "weight": w}, (x, t)))
    return cases


@pytest.mark.parametrize("kind", ["nll", "ce", "ce_ls", "ce_neg_ls", "prob", "prob_ls"])
@pytest.mark.parametrize("ndim", [1, 2, 3, 4, 5])
def test_class_weights_of_any_shape_are_accepted_exactly_when_torch_accepts_them(ndim: int, kind: str) -> None:
    """torch checks only a class weight's number of elements for class indices of (N, C, d1..dk)
    inputs (nll_loss2d), and with label_smoothing > 0 views it as (1, weight.size(0), 1, ...)
    and gathers from its first axis for 'mean' (once a target counts); (C) and (N, C) inputs and
    class probabilities take a 1-d weight only. The engine accepts exactly what torch accepts,
    with the weight's values as torch uses them, and refuses the rest on ``options.weight`` with
    torch's message; the classes on another axis (class_axis) follow the same call in torch's
    layout, which has the same number of axes."""
    mismatches = []
    for label, spec, tensors, (x, t) in _class_weight_cases(ndim, kind):
        w = tensors["weight"]
        options = torch_options(spec)
        try:
            want, torch_error = torch_call(spec.loss, x, t, weight=w, **options), None
        except Exception as exc:  # noqa: BLE001 - torch's verdict
            want, torch_error = None, str(exc).split("\n")[0]
        try:
            got, error = evaluate(spec, tensors).loss, None
        except engine.InvalidInput as exc:
            got, error = None, exc
        if (torch_error is None) != (error is None):
            mismatches.append(f"{label}: torch {torch_error or 'accepts'}; engine {error or 'accepts'}")
        elif error is None:
            if got.dtype != want.dtype or got.shape != want.shape or not torch.allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True):
                mismatches.append(f"{label}: engine {got} != torch {want}")
        else:
            try:
                torch_call(spec.loss, x, t, weight=w.reshape(-1), **options)
            except Exception:  # noqa: BLE001 - not (only) the weight's shape
                continue
            kept = ("weight tensor should be defined", "cross_entropy: weight tensor")  # lossd's (C,) text, kept where it was
            same_text = torch_error in error.message or error.message.startswith(kept)
            if error.field != "options.weight" or not same_text:
                mismatches.append(f"{label}: torch {torch_error!r}; engine {error}")
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:40])


# ---------------------------------------------------------------------------- totals past the dtype's range
def assert_torchs_special_values(got: torch.Tensor, want: torch.Tensor, fn: str, tensors: dict[str, Any], options: dict[str, Any]) -> None:
    """Where torch's result is inf, nan or a zero, the same (the sign of an inf or a zero
    included); a finite non-zero one as :func:`assert_matches_torch` judges it."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.isnan().any() or got.isnan().any():
        assert want.isnan().all() and got.isnan().all(), (got, want)
    elif want.isinf().any() or (want == 0).any():
        assert got.item() == want.item() and got.signbit().item() == want.signbit().item(), (got, want)
    else:
        assert_matches_torch(got, fn, tensors, options)


def _big(dtype: torch.dtype) -> float:
    """Three quarters of the dtype's largest value: one fits, the sum of two does not."""
    return 0.75 * torch.finfo(dtype).max


def _overflow_case(name: str, dtype: torch.dtype) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(function, tensors, options) whose per-element losses (or weights) are about ±_big(dtype):
    their total overflows the dtype while the mean, in float64, would not."""
    b = _big(dtype)

    def f(values: Any) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64).to(dtype)

    pair, t01 = [[0.0, b], [b, 0.0]], torch.tensor([0, 1])
    cases: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
        "ce_class": ("cross_entropy", {"input": f(pair), "target": t01}, {}),
        "ce_class_kdim": ("cross_entropy", {"input": f([[[0.0, b], [b, 0.0]]]), "target": torch.tensor([[0, 1]])}, {}),
        "ce_class_negative_weights": ("cross_entropy", {"input": f(pair), "target": t01, "weight": f([-1.0, -1.0])}, {}),
        "ce_class_smoothing": ("cross_entropy", {"input": f(pair), "target": t01}, {"label_smoothing": 0.25}),
        "ce_class_big_weights": ("cross_entropy", {"input": f([[0.0, 5.0], [5.0, 0.0]]), "target": t01, "weight": f([b, b])}, {}),
        "ce_class_smoothing_big_weights": (
            "cross_entropy",
            {"input": f([[0.0, 5.0], [5.0, 0.0]]), "target": t01, "weight": f([b, b])},
            {"label_smoothing": 0.25},
        ),
        "nll": ("nll_loss", {"input": f([[-b, 0.0], [0.0, -b]]), "target": t01}, {}),
        "nll_negative": ("nll_loss", {"input": f([[b, 0.0], [0.0, b]]), "target": t01}, {}),
        "nll_big_weights": ("nll_loss", {"input": f([[-0.25, -2.0], [-2.0, -0.25]]), "target": t01, "weight": f([b, b])}, {}),
        "nll_big_negative_weights": ("nll_loss", {"input": f([[-1.0, -2.0], [-2.0, -1.0]]), "target": t01, "weight": f([-b, -b])}, {}),
        "ce_prob": ("cross_entropy", {"input": f([[-b, 0.0], [0.0, -b]]), "target": f([[1.0, 0.0], [0.0, 1.0]])}, {}),
        "ce_prob_weight": ("cross_entropy", {"input": f([[-b, 0.0], [0.0, -b]]), "target": f([[1.0, 0.0], [0.0, 1.0]]), "weight": f([1.0, 0.5])}, {}),
        "ce_prob_smoothing": ("cross_entropy", {"input": f([[-b, 0.0], [0.0, -b]]), "target": f([[1.0, 0.0], [0.0, 1.0]])}, {"label_smoothing": 0.5}),
        "bce": ("binary_cross_entropy_with_logits", {"input": f([-b, -b]), "target": f([1.0, 1.0])}, {}),
        "bce_weights": ("binary_cross_entropy_with_logits", {"input": f([-b, -b]), "target": f([1.0, 1.0]), "weight": f([1.0, 0.5]), "pos_weight": f([0.75])}, {}),  # fmt: skip
        "kl": ("kl_div", {"input": f([[-b], [-b]]), "target": f([[1.0], [1.0]])}, {}),
        "kl_log_target": ("kl_div", {"input": f([[-b], [-b]]), "target": f([[0.0], [0.0]])}, {"log_target": True}),
        "kl_legacy_batchmean": ("kl_div", {"input": f([[-b, -b], [-b, -b]]), "target": f([[1.0, 1.0], [1.0, 1.0]])}, {"size_average": True}),
    }
    return cases[name]


def _many_rows_case(name: str, dtype: torch.dtype) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """70000 rows of ordinary values: a count past float16's largest value (65504)."""
    n = 70_000
    zeros = torch.zeros(n, 2, dtype=dtype)
    cases: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
        "ce_class_many": ("cross_entropy", {"input": zeros, "target": torch.zeros(n, dtype=torch.long)}, {}),
        "ce_class_many_smoothing": ("cross_entropy", {"input": zeros, "target": torch.zeros(n, dtype=torch.long)}, {"label_smoothing": 0.2}),
        "nll_many_half": ("nll_loss", {"input": torch.full((n, 2), -0.5, dtype=dtype), "target": torch.zeros(n, dtype=torch.long)}, {}),
        "nll_many_ones": ("nll_loss", {"input": torch.full((n, 2), -1.0, dtype=dtype), "target": torch.zeros(n, dtype=torch.long)}, {}),
        "ce_prob_many": ("cross_entropy", {"input": zeros, "target": torch.full((n, 2), 0.5, dtype=dtype)}, {}),
        "bce_many": ("binary_cross_entropy_with_logits", {"input": torch.full((n,), -1.0, dtype=dtype), "target": torch.ones(n, dtype=dtype)}, {}),  # fmt: skip
        "kl_many": ("kl_div", {"input": torch.full((n, 1), -1.0, dtype=dtype), "target": torch.ones(n, 1, dtype=dtype)}, {}),
    }
    return cases[name]


def _engine_spec(fn: str, options: dict[str, Any]) -> engine.LossSpec:
    return engine.LossSpec(loss=fn, **options)


def reference(fn: str, tensors: dict[str, Any], options: dict[str, Any]) -> torch.Tensor:
    """torch's result; for a 16-bit input torch's float32 result cast to it (lossd's half rule)."""
    own = torch_call(fn, **tensors, **options)
    if tensors["input"].dtype not in HALF:
        return own
    return torch_call(fn, **cast_floats(tensors, torch.float32), **options).to(own.dtype)


def _check_reduced(fn: str, tensors: dict[str, Any], options: dict[str, Any], chunk_bytes: int) -> None:
    want = reference(fn, tensors, options)
    spec = _engine_spec(fn, options)
    got = engine.evaluate(spec, tensors["input"], tensors["target"], tensors.get("weight"), tensors.get("pos_weight"), chunk_bytes=chunk_bytes)
    assert_torchs_special_values(got.loss, want, fn, tensors, options)


OVERFLOW_CASES = (
    "ce_class", "ce_class_kdim", "ce_class_negative_weights", "ce_class_smoothing", "ce_class_big_weights",
    "ce_class_smoothing_big_weights", "nll", "nll_negative", "nll_big_weights", "nll_big_negative_weights", "ce_prob",
    "ce_prob_weight", "ce_prob_smoothing", "bce", "bce_weights", "kl", "kl_log_target", "kl_legacy_batchmean",
)  # fmt: skip
MANY_ROWS_CASES = ("ce_class_many", "ce_class_many_smoothing", "nll_many_half", "nll_many_ones", "ce_prob_many", "bce_many", "kl_many")


def _reductions(fn: str, name: str) -> tuple[str, ...]:
    if name == "kl_legacy_batchmean":
        return ("batchmean",)  # beside size_average=True: torch's 'mean', then ÷ input.size(0)
    return ("mean", "sum", "batchmean") if fn == "kl_div" else ("mean", "sum")


def _grid(names: tuple[str, ...], case: Any) -> list[Any]:
    params = []
    for name in names:
        for dtype in FLOATS:
            for reduction in _reductions(case(name, dtype)[0], name):
                params.append(pytest.param(name, dtype, reduction, id=f"{name}-{str(dtype)[6:]}-{reduction}"))
    return params


@pytest.mark.parametrize(("name", "dtype", "reduction"), _grid(OVERFLOW_CASES, _overflow_case))
def test_a_mean_whose_total_overflows_torchs_dtype_is_torchs_inf_or_nan(name: str, dtype: torch.dtype, reduction: str) -> None:
    """torch sums a mean's numerator and denominator in the output dtype: where that total
    overflows, torch answers inf, -inf, nan or a zero, and so must lossd, whose float64 totals do not
    overflow (probe 14 F2: float32 [3e38, 3e38] gave 3e38, not inf). A 16-bit input is torch's
    float32 computation, cast: inf or nan where float32 totals overflow."""
    fn, tensors, options = _overflow_case(name, dtype)
    for chunk_bytes in (64, engine.DEFAULT_CHUNK_BYTES):
        _check_reduced(fn, tensors, {**options, "reduction": reduction}, chunk_bytes)


@pytest.mark.parametrize(("name", "dtype", "reduction"), _grid(MANY_ROWS_CASES, _many_rows_case))
def test_a_count_past_float16s_range_divides_as_torch_divides(name: str, dtype: torch.dtype, reduction: str) -> None:
    """70000 rows: torch's float16 nll_loss (and class-index cross_entropy) divides by the count
    cast to float16, inf (a mean of 0 or nan); lossd's half rule is torch's float32 computation,
    cast: the mean itself."""
    fn, tensors, options = _many_rows_case(name, dtype)
    _check_reduced(fn, tensors, {**options, "reduction": reduction}, engine.DEFAULT_CHUNK_BYTES)


# ---------------------------------------------------------------------------- the sign of a zero total
def _zero_case(name: str, dtype: torch.dtype) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(function, tensors, options) whose reduced total is zero (or whose mean is 0/0)."""

    def f(values: Any) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64).to(dtype)

    g = torch.Generator().manual_seed(14)
    x34 = torch.randn(3, 4, generator=g, dtype=torch.float64).to(dtype)
    w4, neg4 = f([1.0, 2.0, 0.5, 3.0]), f([-1.0, -2.0, -0.5, -3.0])
    cancel = (f([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 2.0, -2.0]]), torch.zeros(2, 4, dtype=dtype))  # equal logits: products cancel
    cases: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
        "prob_empty": ("cross_entropy", {"input": f([]).reshape(0, 4), "target": f([]).reshape(0, 4)}, {}),
        "prob_empty_weight_smoothing": ("cross_entropy", {"input": f([]).reshape(0, 4), "target": f([]).reshape(0, 4), "weight": w4}, {"label_smoothing": 0.3}),  # fmt: skip
        "prob_no_classes": ("cross_entropy", {"input": f([]).reshape(3, 0), "target": f([]).reshape(3, 0)}, {}),
        "prob_zero_targets": ("cross_entropy", {"input": x34, "target": torch.zeros(3, 4, dtype=dtype)}, {}),
        "prob_zero_targets_weight": ("cross_entropy", {"input": x34, "target": torch.zeros(3, 4, dtype=dtype), "weight": w4}, {}),
        "prob_zero_targets_negative_weight": ("cross_entropy", {"input": x34, "target": torch.zeros(3, 4, dtype=dtype), "weight": neg4}, {}),
        "prob_zero_targets_kdim": ("cross_entropy", {"input": x34.reshape(1, 4, 3), "target": torch.zeros(1, 4, 3, dtype=dtype)}, {}),
        "prob_cancelling_targets": ("cross_entropy", {"input": cancel[1], "target": cancel[0]}, {}),
        "class_one_class": ("cross_entropy", {"input": x34[:, :1], "target": torch.zeros(3, dtype=torch.long)}, {}),
        "class_one_class_negative_weight": ("cross_entropy", {"input": x34[:, :1], "target": torch.zeros(3, dtype=torch.long), "weight": f([-2.0])}, {}),  # fmt: skip
        "class_one_class_smoothing_negative_weight": (
            "cross_entropy",
            {"input": x34[:, :1], "target": torch.zeros(3, dtype=torch.long), "weight": f([-2.0])},
            {"label_smoothing": 0.5},
        ),
        "class_all_ignored_smoothing": ("cross_entropy", {"input": x34, "target": torch.full((3,), -100)}, {"label_smoothing": 0.2}),
        "class_empty": ("cross_entropy", {"input": f([]).reshape(0, 4), "target": torch.zeros(0, dtype=torch.long)}, {}),
        "nll_zero_logp": ("nll_loss", {"input": torch.zeros(3, 4, dtype=dtype), "target": torch.tensor([0, 1, 2])}, {}),
        "nll_zero_logp_negative_weight": ("nll_loss", {"input": torch.zeros(3, 4, dtype=dtype), "target": torch.tensor([0, 1, 2]), "weight": neg4}, {}),  # fmt: skip
        "bce_zero_losses": ("binary_cross_entropy_with_logits", {"input": f([1000.0, 1000.0]), "target": f([1.0, 1.0])}, {}),
        "bce_zero_losses_negative_weight": ("binary_cross_entropy_with_logits", {"input": f([1000.0, 1000.0]), "target": f([1.0, 1.0]), "weight": f([-1.0])}, {}),  # fmt: skip
        "bce_empty": ("binary_cross_entropy_with_logits", {"input": f([]), "target": f([])}, {}),
        "kl_zero_targets": ("kl_div", {"input": f([[-1.0, 1.0], [0.0, -0.0]]), "target": f([[0.0, 0.0], [0.0, 0.0]])}, {}),
        "kl_log_target_equal": ("kl_div", {"input": f([[-0.0, 1.0]]), "target": f([[0.0, 1.0]])}, {"log_target": True}),
        "kl_empty": ("kl_div", {"input": f([]).reshape(0, 2), "target": f([]).reshape(0, 2)}, {}),
    }
    return cases[name]


ZERO_CASES = (
    "prob_empty", "prob_empty_weight_smoothing", "prob_no_classes", "prob_zero_targets", "prob_zero_targets_weight",
    "prob_zero_targets_negative_weight", "prob_zero_targets_kdim", "prob_cancelling_targets", "class_one_class",
    "class_one_class_negative_weight", "class_one_class_smoothing_negative_weight", "class_all_ignored_smoothing", "class_empty",
    "nll_zero_logp", "nll_zero_logp_negative_weight", "bce_zero_losses", "bce_zero_losses_negative_weight", "bce_empty",
    "kl_zero_targets", "kl_log_target_equal", "kl_empty",
)  # fmt: skip


@pytest.mark.parametrize(("name", "dtype", "reduction"), _grid(ZERO_CASES, _zero_case))
def test_a_zero_total_has_torchs_sign(name: str, dtype: torch.dtype, reduction: str) -> None:
    """torch's sums start from +0.0, so a zero total is +0.0 (and a mean +0.0 / w, -0.0 for a negative
    total weight), but cross_entropy with probabilities returns ``-(input * target).sum()``: -0.0
    (probe 14 F4: lossd answered +0.0). Its 'mean' over no elements is ``-(nan)``, a NaN with the
    sign bit set (bfloat16 rounds every NaN to its positive one)."""
    fn, tensors, options = _zero_case(name, dtype)
    options = {**options, "reduction": reduction}
    want = reference(fn, tensors, options)
    for chunk_bytes in (64, engine.DEFAULT_CHUNK_BYTES):
        spec = _engine_spec(fn, options)
        got = engine.evaluate(spec, tensors["input"], tensors["target"], tensors.get("weight"), tensors.get("pos_weight"), chunk_bytes=chunk_bytes)
        assert_torchs_special_values(got.loss, want, fn, tensors, options)
        if name.startswith("prob_") and want.isnan():
            assert got.loss.signbit() == want.signbit()


# ---------------------------------------------------------------------------- units without positions
@pytest.mark.parametrize(
    ("fn", "input_shape", "target"),
    [
        ("cross_entropy", (5, 0), lambda n: torch.zeros(n, 0, dtype=torch.long)),
        ("nll_loss", (5, 0, 3), lambda n: torch.zeros(n, 0, 3, dtype=torch.long)),
        ("cross_entropy", (5, 0), lambda n: torch.zeros(n, 5, 0)),
        ("binary_cross_entropy_with_logits", (0,), lambda n: torch.zeros(n, 0)),
    ],
)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_units_without_positions_are_handed_to_torch_once(monkeypatch, fn, input_shape, target, reduction):
    """torch's kernels loop over the units of an input with a zero-size dimension after the class
    axis, though they hold nothing (nll_loss over (2**34, 5, 0) took 2.5 s of the engine's thread
    for a request of a few dozen bytes): torch sees one such unit, and the answer is torch's."""
    from lossd_server.engine import kernels

    seen: list[int] = []
    evaluate_chunk = kernels.evaluate_chunk

    def spy(plan, xu, tu, unit_start, device):
        seen.append(xu.shape[0])
        return evaluate_chunk(plan, xu, tu, unit_start, device)

    monkeypatch.setattr(kernels, "evaluate_chunk", spy)
    for n in (1, 3, 2**20):
        x, t = torch.zeros(n, *input_shape), target(n)
        want = torch_call(fn, x, t, reduction=reduction)
        got = engine.evaluate(engine.LossSpec(loss=fn, reduction=reduction), x, t)
        assert got.loss.shape == want.shape and got.loss.dtype == want.dtype
        assert torch.equal(got.loss, want) or (got.loss.isnan().all() and want.isnan().all())
        assert seen == [1], seen
        seen.clear()


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.integers(0, 4), max_size=4).map(tuple),
    st.lists(st.integers(0, 4), max_size=4).map(tuple),
)
def test_broadcast_shapes_is_torchs_results_and_errors(a, b):
    """validate.broadcast_shapes (which spares the server importing torch._refs) against torch's."""
    from lossd_server.engine.validate import broadcast_shapes

    try:
        expected = tuple(torch.broadcast_shapes(a, b))
    except RuntimeError as exc:
        with pytest.raises(RuntimeError) as got:
            broadcast_shapes(a, b)
        assert str(got.value) == str(exc)
        return
    assert broadcast_shapes(a, b) == expected
