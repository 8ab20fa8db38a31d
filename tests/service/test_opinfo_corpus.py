"""torch's own OpInfo / ModuleInfo samples (plus edge and error cases) through the public client.

Every case is evaluated twice: by torch in this process and by a real lossd server through
``LossClient``. A case passes when the client returns torch's value (within the dtype's
tolerance), dtype and shape, and the same kind it was given (torch or numpy) — or, when torch
raises, when the client raises ``InvalidArgumentError``. Half-precision inputs may instead match
torch run in float32 and cast to the dtype: lossd accumulates in float32 on purpose.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import InvalidArgumentError

FUNCTIONS = ("cross_entropy", "nll_loss", "binary_cross_entropy_with_logits")
MODULES = {"CrossEntropyLoss": "cross_entropy", "NLLLoss": "nll_loss", "BCEWithLogitsLoss": "binary_cross_entropy_with_logits"}
HALF = (torch.float16, torch.bfloat16)


@dataclass
class Case:
    """One call: ``fn(*args, **kwargs)``; ``reference`` overrides how torch computes it."""

    name: str
    fn: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    reference: Callable[[], Any] | None = None
    as_numpy: bool = False


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_numpy(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------- corpus sources
def opinfo_cases() -> Iterator[Case]:
    from torch.testing._internal.common_methods_invocations import op_db

    names = {f"nn.functional.{fn}" for fn in FUNCTIONS}
    for op in op_db:
        if op.name not in names:
            continue
        fn = op.name.removeprefix("nn.functional.")
        dtypes = [d for d in (torch.float32, torch.float64, *HALF) if d in op.supported_dtypes("cpu")]
        for dtype in dtypes:
            sources = [("sample", op.sample_inputs("cpu", dtype))]
            if op.reference_inputs_func is not None:
                sources.append(("reference", op.reference_inputs("cpu", dtype)))
            for kind, samples in sources:
                for i, s in enumerate(samples):
                    args = (_detach(s.input), *_detach(tuple(s.args)))
                    name = f"opinfo/{fn}/{kind}/{str(dtype)[6:]}/{i}"
                    yield Case(name, fn, args, _detach(dict(s.kwargs)))
                    if dtype in (torch.float32, torch.float64) and kind == "sample":
                        yield Case(name + "/numpy", fn, args, _detach(dict(s.kwargs)), as_numpy=True)
        if op.error_inputs_func is not None:
            for i, e in enumerate(op.error_inputs("cpu")):
                s = e.sample_input
                yield Case(f"opinfo/{fn}/error/{i}", fn, (_detach(s.input), *_detach(tuple(s.args))), _detach(dict(s.kwargs)))


def _functional_kwargs(module_cls: type, args: tuple, kwargs: dict) -> dict:
    bound = inspect.signature(module_cls.__init__).bind(None, *args, **kwargs)
    out = dict(bound.arguments)
    out.pop("self")
    return out


def _module_case(name: str, module_cls: type, module_input: Any) -> Case:
    fn = MODULES[module_cls.__name__]
    c, f = module_input.constructor_input, module_input.forward_input
    c_args, c_kwargs = _detach(tuple(c.args)), _detach(dict(c.kwargs))
    f_args = _detach(tuple(f.args))

    def reference() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return module_cls(*c_args, **c_kwargs)(*f_args, **_detach(dict(f.kwargs)))

    return Case(name, fn, f_args, _functional_kwargs(module_cls, c_args, c_kwargs), reference)


def moduleinfo_cases() -> Iterator[Case]:
    from torch.testing._internal.common_modules import module_db

    for m in module_db:
        cls = m.module_cls
        if cls.__name__ not in MODULES:
            continue
        for dtype in (torch.float32, torch.float64, *HALF):
            if dtype not in m.dtypes:
                continue
            inputs = m.module_inputs_func(m, device="cpu", dtype=dtype, requires_grad=False, training=False)
            for i, mi in enumerate(inputs):
                yield _module_case(f"module/{cls.__name__}/{str(dtype)[6:]}/{i}", cls, mi)
        if m.module_error_inputs_func is not None:
            errors = m.module_error_inputs_func(m, device="cpu", dtype=torch.float32, requires_grad=False, training=False)
            for i, e in enumerate(errors):
                yield _module_case(f"module/{cls.__name__}/error/{i}", cls, e.module_error_input)


def edge_cases() -> Iterator[Case]:
    """Hand-picked torch edge semantics and error cases (values always come from torch)."""
    g = torch.Generator().manual_seed(1234)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    def labels(c: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.randint(0, max(c, 1), shape, generator=g).to(dtype)

    def probs(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.softmax(randn(*shape, dtype=torch.float64), 1 if len(shape) > 1 else 0).to(dtype)

    reductions = ("mean", "sum", "none")
    n = 0

    def case(fn: str, *args: Any, **kwargs: Any) -> Case:
        nonlocal n
        n += 1
        return Case(f"edge/{fn}/{n}", fn, args, kwargs)

    for dtype in (torch.float32, torch.float64, *HALF):
        for red in reductions:
            x = randn(4, 5, dtype=dtype)
            # ignore_index inside and outside [0, C), all ignored, C = 1, empty batch
            for ii in (-100, -1, 0, 2, 5, 1000):
                t = labels(5, 4)
                t[1] = ii if not 0 <= ii < 5 else t[1]
                t[2] = ii if ii != -100 else t[2]
                for fn in ("cross_entropy", "nll_loss"):
                    yield case(fn, x, t, ignore_index=ii, reduction=red)
            yield case("cross_entropy", x, torch.full((4,), 3), ignore_index=3, reduction=red)
            yield case("nll_loss", x, torch.full((4,), -100), reduction=red)
            yield case("cross_entropy", x, torch.full((4,), 2), weight=torch.ones(5, dtype=dtype), ignore_index=2, reduction=red, label_smoothing=0.2)
            yield case("cross_entropy", randn(4, 1, dtype=dtype), torch.zeros(4, dtype=torch.int64), reduction=red)
            yield case("cross_entropy", randn(0, 5, dtype=dtype), torch.zeros(0, dtype=torch.int64), reduction=red)
            yield case("cross_entropy", randn(0, 5, dtype=dtype), torch.zeros(0, 5, dtype=dtype), reduction=red)
            yield case("nll_loss", randn(0, 5, 3, dtype=dtype), torch.zeros(0, 3, dtype=torch.int64), reduction=red)
            yield case("cross_entropy", randn(2, 5, 0, dtype=dtype), torch.zeros(2, 0, dtype=torch.int64), reduction=red)
            yield case("binary_cross_entropy_with_logits", randn(0, 3, dtype=dtype), torch.zeros(0, 3, dtype=dtype), reduction=red)
            yield case("binary_cross_entropy_with_logits", randn(3, 0, dtype=dtype), torch.zeros(3, 0, dtype=dtype), reduction=red)
            # C = 0: valid only when every target is ignored (and torch cannot do it for 3-d input)
            for shape in ((3, 0), (0, 0), (0,), (2, 0, 2), (2, 0, 2, 2), (0, 0, 2)):
                tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
                for ls in (0.0, 0.1):
                    yield case("cross_entropy", randn(*shape, dtype=dtype), torch.full(tshape, -100), reduction=red, label_smoothing=ls)
                    yield case("cross_entropy", randn(*shape, dtype=dtype), torch.zeros(shape, dtype=dtype), reduction=red, label_smoothing=ls)
                yield case("nll_loss", randn(*shape, dtype=dtype), torch.full(tshape, -100), weight=torch.ones(0, dtype=dtype), reduction=red)
                yield case("nll_loss", randn(*shape, dtype=dtype), torch.full(tshape, 0), reduction=red)
            # weights: negative, zero, mixed with label smoothing and ignore_index
            w = randn(5, dtype=dtype)
            t = labels(5, 4)
            yield case("cross_entropy", x, t, weight=w, reduction=red)
            yield case("nll_loss", x, t, weight=w, reduction=red)
            yield case("cross_entropy", x, t, weight=torch.zeros(5, dtype=dtype), reduction=red)
            yield case("cross_entropy", x, t, weight=w.abs(), ignore_index=int(t[0]), label_smoothing=0.3, reduction=red)
            yield case("cross_entropy", x, t, weight=w.abs(), label_smoothing=1.0, reduction=red)
            yield case("cross_entropy", x, t, label_smoothing=-0.25, reduction=red)
            yield case("cross_entropy", x, t, label_smoothing=1.5, reduction=red)
            # probability targets with weight and label smoothing (negative included)
            p = probs(4, 5, dtype=dtype)
            yield case("cross_entropy", x, p, weight=w, reduction=red)
            yield case("cross_entropy", x, p, label_smoothing=0.1, reduction=red)
            yield case("cross_entropy", x, p, weight=w.abs(), label_smoothing=0.4, reduction=red)
            yield case("cross_entropy", x, p, label_smoothing=-0.3, reduction=red)
            yield case("cross_entropy", x, p, ignore_index=1, reduction=red)
            yield case("cross_entropy", x, p, ignore_index=-7, reduction=red)
            yield case("cross_entropy", randn(2, 5, 3, 2, dtype=dtype), probs(2, 5, 3, 2, dtype=dtype), weight=w.abs(), label_smoothing=0.2, reduction=red)
            yield case("cross_entropy", randn(5, dtype=dtype), probs(5, dtype=dtype), reduction=red)
            # (C) inputs and K-dimensional inputs
            yield case("cross_entropy", randn(5, dtype=dtype), torch.tensor(3), reduction=red)
            yield case("cross_entropy", randn(5, dtype=dtype), torch.tensor([3]), reduction=red)
            yield case("cross_entropy", randn(5, dtype=dtype), torch.tensor([3]), reduction=red, label_smoothing=0.1)
            yield case("cross_entropy", randn(5, dtype=dtype), torch.tensor([3, 1]), reduction=red)
            yield case("nll_loss", randn(5, dtype=dtype), torch.tensor(-100), reduction=red)
            yield case("cross_entropy", randn(2, 5, 3, 4, dtype=dtype), labels(5, 2, 3, 4), weight=w.abs(), label_smoothing=0.1, ignore_index=1, reduction=red)
            yield case("nll_loss", randn(3, 4, 2, 2, 2, dtype=dtype), labels(4, 3, 2, 2, 2), reduction=red)
            # -inf / inf / nan logits
            xi = x.clone()
            xi[0, 1] = -math.inf
            xi[1, :] = -math.inf
            xi[2, 3] = math.inf
            yield case("cross_entropy", xi, torch.tensor([0, 2, 3, 4]), reduction=red)
            yield case("cross_entropy", xi, torch.tensor([1, 2, 3, 4]), reduction=red)
            yield case("nll_loss", xi, torch.tensor([1, 0, 3, 4]), reduction=red)
            xn = x.clone()
            xn[3, 2] = math.nan
            yield case("cross_entropy", xn, torch.tensor([0, 1, 2, 3]), reduction=red)
            # target dtypes and shapes
            for tdtype in (torch.uint8, torch.int32, torch.int16, torch.int8, torch.bool, torch.float32):
                yield case("cross_entropy", x, labels(2, 4, dtype=tdtype), reduction=red)
                yield case("nll_loss", x, labels(2, 4, dtype=tdtype), reduction=red)
            yield case("cross_entropy", x, labels(5, 5), reduction=red)
            yield case("cross_entropy", x, labels(5, 4, 1), reduction=red)
            yield case("nll_loss", x, labels(5, 4, 5), reduction=red)
            yield case("cross_entropy", randn(2, 5, 3, dtype=dtype), labels(5, 2, 4), reduction=red)
            yield case("cross_entropy", randn(2, 5, 3, dtype=dtype), labels(5, 3, 3), reduction=red)
            yield case("cross_entropy", x, probs(4, 6, dtype=dtype), reduction=red)
            yield case("cross_entropy", x, torch.tensor([0, 7, 1, 2]), reduction=red)
            yield case("cross_entropy", x, torch.tensor([0, -3, 1, 2]), reduction=red)
            yield case("nll_loss", x, torch.tensor([0, 5, 1, 2]), ignore_index=5, reduction=red)
            yield case("cross_entropy", x.sum(), torch.tensor(0), reduction=red)
            yield case("nll_loss", x.sum(), torch.tensor(0), reduction=red)
            # weight of the wrong length, rank or dtype
            yield case("cross_entropy", x, t, weight=torch.ones(4, dtype=dtype), reduction=red)
            yield case("nll_loss", x, t, weight=torch.ones(1, 5, dtype=dtype), reduction=red)
            yield case("cross_entropy", x, t, weight=torch.ones(5, dtype=torch.float64 if dtype != torch.float64 else torch.float32), reduction=red)
            yield case("cross_entropy", x, p, weight=torch.ones(6, dtype=dtype), reduction=red)
            yield case("cross_entropy", x, labels(5, 4, dtype=torch.uint8), weight=w.abs(), reduction=red)
            # mixed dtypes of probability targets
            for pdtype in (torch.float32, torch.float64, torch.float16):
                yield case("cross_entropy", x, probs(4, 5, dtype=pdtype), reduction=red)
            # BCE: weight / pos_weight broadcasting, target shape, target dtypes
            xb = randn(3, 4, dtype=dtype)
            tb = torch.rand(3, 4, generator=g, dtype=torch.float64).to(dtype)
            for wshape in ((4,), (1, 4), (3, 1), (3, 4), (), (1,), (1, 1, 4), (3,), (2, 4)):
                wb = randn(*wshape, dtype=dtype)
                yield case("binary_cross_entropy_with_logits", xb, tb, weight=wb, reduction=red)
                yield case("binary_cross_entropy_with_logits", xb, tb, pos_weight=wb.abs(), reduction=red)
            yield case("binary_cross_entropy_with_logits", xb, tb, weight=randn(4, dtype=dtype), pos_weight=randn(4, dtype=dtype).abs(), reduction=red)
            yield case("binary_cross_entropy_with_logits", xb, tb[:, :3], reduction=red)
            yield case("binary_cross_entropy_with_logits", xb, tb.reshape(4, 3), reduction=red)
            yield case("binary_cross_entropy_with_logits", xb, (tb > 0.5).to(torch.int64), reduction=red)
            yield case("binary_cross_entropy_with_logits", xb, tb.to(torch.float64), reduction=red)
            yield case("binary_cross_entropy_with_logits", xb, tb, weight=torch.ones(4, dtype=torch.float64), reduction=red)
            yield case("binary_cross_entropy_with_logits", xb.sum(), tb.sum().clamp(0, 1), reduction=red)
            xbi = xb.clone()
            xbi[0, 0], xbi[1, 1] = math.inf, -math.inf
            yield case("binary_cross_entropy_with_logits", xbi, tb, reduction=red)
            # layouts: transposed, expanded, sliced
            xt = randn(5, 4, dtype=dtype).t()
            yield case("cross_entropy", xt, labels(5, 4), reduction=red)
            yield case("cross_entropy", randn(1, 5, dtype=dtype).expand(4, 5), labels(5, 4), weight=randn(1, dtype=dtype).abs().expand(5), reduction=red)
            yield case("binary_cross_entropy_with_logits", randn(4, 6, dtype=dtype)[:, ::2], tb[:1, :3].expand(4, 3), reduction=red)
        # reductions torch maps or rejects, legacy keywords
        for red in ("elementwise_mean", "avg", "MEAN", ""):
            yield case("cross_entropy", randn(3, 4, dtype=dtype), labels(4, 3), reduction=red)
            yield case("binary_cross_entropy_with_logits", randn(3, 4, dtype=dtype), torch.rand(3, 4, generator=g).to(dtype), reduction=red)
        for size_average in (None, True, False):
            for reduce in (None, True, False):
                yield case("nll_loss", randn(3, 4, dtype=dtype), labels(4, 3), size_average=size_average, reduce=reduce)
                yield case("binary_cross_entropy_with_logits", randn(3, 4, dtype=dtype), torch.rand(3, 4, generator=g).to(dtype), size_average=size_average, reduce=reduce)


def all_cases() -> list[Case]:
    return [*opinfo_cases(), *moduleinfo_cases(), *edge_cases()]


# ---------------------------------------------------------------------------- comparison
def _torch_call(case: Case, dtype: torch.dtype | None = None) -> Any:
    if case.reference is not None and dtype is None:
        return case.reference()
    args, kwargs = case.args, case.kwargs
    if dtype is not None:
        args, kwargs = _cast_floats(args, dtype), _cast_floats(kwargs, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(F, case.fn)(*args, **kwargs)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    try:
        torch.testing.assert_close(actual, expected, equal_nan=True)
    except AssertionError as exc:
        return str(exc).split("\n\n")[0]
    return None


def check(client: Any, case: Case) -> str | None:
    """None when the client agrees with torch; otherwise what differs."""
    try:
        expected = _torch_call(case)
        torch_error = None
    except Exception as exc:  # noqa: BLE001 - any torch rejection is the expected answer
        expected, torch_error = None, exc
    args, kwargs = (_to_numpy(case.args), _to_numpy(case.kwargs)) if case.as_numpy else (case.args, case.kwargs)
    try:
        actual = getattr(client, case.fn)(*args, **kwargs)
    except InvalidArgumentError as exc:
        if torch_error is not None:
            return None
        return f"client raised {exc!r}, torch returned {expected}"
    except Exception as exc:  # noqa: BLE001 - reported as a mismatch
        return f"client raised {type(exc).__name__}: {exc}; torch {'raised ' + repr(torch_error) if torch_error else 'returned a value'}"
    if torch_error is not None:
        return f"torch raised {type(torch_error).__name__}: {torch_error}; client returned {actual}"
    if case.as_numpy:
        if not isinstance(actual, np.ndarray):
            return f"numpy in, {type(actual).__name__} out"
        actual = torch.from_numpy(actual)
    elif not isinstance(actual, torch.Tensor):
        return f"torch in, {type(actual).__name__} out"
    problem = _close(actual, expected)
    if problem is not None and expected.dtype in HALF and actual.dtype == expected.dtype:
        accurate = _torch_call(case, torch.float32).to(expected.dtype)
        if _close(actual, accurate) is None:
            return None
    return problem


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[Case]]:
    groups: dict[str, list[Case]] = {"opinfo": [], "module": [], "edge": []}
    for c in all_cases():
        groups[c.name.split("/")[0]].append(c)
    return groups


@pytest.mark.parametrize("group", ["opinfo", "module", "edge"])
def test_corpus_matches_torch(client: Any, corpus: dict[str, list[Case]], group: str) -> None:
    cases = corpus[group]
    assert len(cases) > 100
    failures = [(c.name, p) for c in cases if (p := check(client, c)) is not None]
    report = "\n".join(f"{name}: {problem}" for name, problem in failures[:40])
    assert not failures, f"{len(failures)} of {len(cases)} {group} cases differ from torch:\n{report}"


def test_corpus_size(corpus: dict[str, list[Case]]) -> None:
    total = sum(len(v) for v in corpus.values())
    errors = 0
    for cases in corpus.values():
        for c in cases:
            try:
                _torch_call(c)
            except Exception:  # noqa: BLE001
                errors += 1
    assert total > 1500, total
    assert errors > 100, errors
