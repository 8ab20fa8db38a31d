"""Client tensors.py <-> server codec.py round trips, in every layout the client accepts.

The client must encode numpy arrays and torch tensors of any layout (non-contiguous,
transposed, Fortran-order, zero-stride, 0-dim, empty, big-endian) as little-endian C-order
bytes without touching its inputs; the server must decode exactly those values; results come
back as the kind the caller passed (torch in -> torch out, numpy in -> numpy out).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import InvalidArgumentError, tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_server import codec

BF16 = np.dtype(ml_dtypes.bfloat16)


def torch_layouts() -> list[tuple[str, Callable[[torch.dtype], torch.Tensor]]]:
    def base(dtype: torch.dtype, *shape: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(7)
        if dtype.is_floating_point:
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
        if dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=g).bool()
        return torch.randint(0, 100, shape, generator=g).to(dtype)

    return [
        ("contiguous", lambda d: base(d, 3, 4)),
        ("sliced", lambda d: base(d, 4, 6)[1:, ::2]),
        ("transposed", lambda d: base(d, 4, 3).t()),
        ("permuted 3-d", lambda d: base(d, 2, 3, 4).permute(2, 0, 1)),
        ("expanded (zero stride)", lambda d: base(d, 1, 4).expand(3, 4)),
        ("expanded scalar", lambda d: base(d, 1).expand(5)),
        ("0-dim", lambda d: base(d, 1).reshape(())),
        ("empty", lambda d: base(d, 0, 4)),
        ("empty inner", lambda d: base(d, 3, 0)),
        ("negative view", lambda d: base(d, 3, 4).neg()._neg_view() if d.is_floating_point else base(d, 3, 4)),
    ]


TORCH_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("name,make", torch_layouts(), ids=[n for n, _ in torch_layouts()])
def test_torch_tensor_round_trips_through_codec(dtype: torch.dtype, name: str, make) -> None:
    t = make(dtype)
    before = t.clone()
    stride, ptr = t.stride(), t.data_ptr()
    msg = tensors.to_proto(t)
    assert msg.dtype == codec.TORCH_TO_WIRE[dtype]
    assert list(msg.shape) == list(t.shape)
    decoded = codec.decode("input", msg)
    assert decoded.dtype == dtype
    assert decoded.shape == t.shape
    assert torch.equal(decoded, t.resolve_neg())
    # the caller's tensor is untouched: values, layout, storage
    assert torch.equal(t.resolve_neg(), before.resolve_neg())
    assert t.stride() == stride and t.data_ptr() == ptr


NUMPY_DTYPES = ["<f8", "<f4", "<f2", ">f8", ">f4", ">f2", "<i8", ">i8", "<i4", ">i4", "i2", "i1", "u1", "?", "bf16"]


def numpy_base(dtype: str, *shape: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    if dtype == "bf16":
        return rng.standard_normal(shape).astype(BF16)
    np_dtype = np.dtype(dtype)
    if np_dtype.kind == "f":
        return rng.standard_normal(shape).astype(np_dtype)
    if np_dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 100, shape).astype(np_dtype)


NUMPY_LAYOUTS: list[tuple[str, Callable[[str], np.ndarray]]] = [
    ("contiguous", lambda d: numpy_base(d, 3, 4)),
    ("fortran", lambda d: np.asfortranarray(numpy_base(d, 3, 4))),
    ("transposed", lambda d: numpy_base(d, 4, 3).T),
    ("sliced", lambda d: numpy_base(d, 4, 6)[::-1, 1::2]),
    ("broadcast (zero stride)", lambda d: np.broadcast_to(numpy_base(d, 1, 4), (3, 4))),
    ("0-dim", lambda d: numpy_base(d, 1).reshape(())),
    ("empty", lambda d: numpy_base(d, 0, 4)),
    ("read-only", lambda d: _read_only(numpy_base(d, 2, 3))),
]


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _as_torch(a: np.ndarray) -> torch.Tensor:
    c = np.array(a, order="C", copy=True)  # keeps 0-dim (np.ascontiguousarray would not)
    if a.dtype == BF16:
        return torch.from_numpy(c.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(c.astype(a.dtype.newbyteorder("=")))


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("name,make", NUMPY_LAYOUTS, ids=[n for n, _ in NUMPY_LAYOUTS])
def test_numpy_array_round_trips_through_codec(dtype: str, name: str, make) -> None:
    a = make(dtype)
    before = a.copy()
    flags = (a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable, a.strides, a.dtype)
    decoded = codec.decode("input", tensors.to_proto(a))
    expected = _as_torch(a)
    assert decoded.dtype == expected.dtype
    assert decoded.shape == expected.shape
    assert torch.equal(decoded, expected)
    assert np.array_equal(a.view(np.uint16) if a.dtype == BF16 else a, before.view(np.uint16) if a.dtype == BF16 else before)
    assert (a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable, a.strides, a.dtype) == flags


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 3), (2, 3, 4)])
def test_server_encoding_decodes_on_the_client(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape).mul(0.37).to(dtype)
    msg = codec.encode(t.t() if t.dim() == 2 else t)
    back = tensors.torch_from_proto(msg)
    assert back.dtype == dtype and torch.equal(back, t.t() if t.dim() == 2 else t)
    back[...] = back  # writable
    if dtype == torch.bfloat16:
        arr = tensors.numpy_from_proto(msg)
        assert arr.dtype == BF16
        assert torch.equal(_as_torch(arr), t)
    else:
        arr = tensors.numpy_from_proto(msg)
        assert arr.flags.writeable and arr.dtype.isnative
        assert torch.equal(torch.from_numpy(arr), t)


@pytest.mark.parametrize(
    "dtype,nbytes",
    [(pb.FLOAT32, 11), (pb.FLOAT32, 13), (pb.FLOAT16, 5), (pb.BFLOAT16, 7), (pb.FLOAT64, 16), (pb.INT64, 0)],
)
def test_codec_rejects_wrong_byte_length(dtype: int, nbytes: int) -> None:
    msg = pb.Tensor(dtype=dtype, shape=[3], data=b"\0" * nbytes)
    with pytest.raises(codec.TensorError) as info:
        codec.decode("target", msg)
    assert info.value.field == "target.data"


@pytest.mark.parametrize("shape", [[-1], [2, -3], [2**40, 2**40], [2**62, 4], [1] * 33, [0, 2, 2**62], [0, 2**31, 2**31, 2], [3, 0, 2**62, 2]])
def test_codec_rejects_bad_shapes(shape: list[int]) -> None:
    with pytest.raises(codec.TensorError) as info:
        codec.decode("input", pb.Tensor(dtype=pb.FLOAT32, shape=shape))
    assert info.value.field == "input.shape"


@pytest.mark.parametrize("shape", [[2**62, 0], [3, 0, 2**62], [0, 2**31, 2**31]])
def test_codec_accepts_empty_shapes_torch_can_stride(shape: list[int]) -> None:
    got = codec.decode("input", pb.Tensor(dtype=pb.FLOAT32, shape=shape))
    assert got.shape == torch.empty(shape).shape


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 11, 99, -1])
def test_codec_rejects_unknown_dtypes(dtype: int) -> None:
    with pytest.raises(codec.TensorError) as info:
        codec.decode("options.weight", pb.Tensor(dtype=dtype, shape=[1], data=b"\0" * 4))
    assert info.value.field == "options.weight.dtype"


def test_unsupported_client_dtypes_are_invalid_arguments(client) -> None:
    with pytest.raises(InvalidArgumentError):
        client.cross_entropy(np.zeros((2, 3), np.complex64), np.zeros(2, np.int64))
    with pytest.raises(InvalidArgumentError):
        client.cross_entropy(torch.zeros(2, 3, dtype=torch.complex64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(InvalidArgumentError, match="meta tensor"):
        client.cross_entropy(torch.zeros(2, 3, device="meta"), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize(
    "kwargs",
    [{"ignore_index": 2.7}, {"ignore_index": True}, {"ignore_index": 2.0}, {"ignore_index": None}, {"label_smoothing": "0.1"}, {"label_smoothing": None}],
    ids=str,
)
def test_arguments_of_the_wrong_type_are_rejected_as_torch_rejects_them(client, kwargs: dict[str, Any]) -> None:
    """torch's TypeError ("argument 'ignore_index' ... must be int, not float"), as InvalidArgumentError naming the option."""
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(TypeError) as torch_error:
        F.cross_entropy(x, t, **kwargs)
    (name,) = kwargs
    expected = torch_error.value.args[0].split("must be ")[1]
    with pytest.raises(InvalidArgumentError, match=rf"^options.{name}: argument '{name}' must be {expected}$"):
        client.cross_entropy(x, t, **kwargs)


@pytest.mark.parametrize("kwargs", [{"ignore_index": np.int64(1)}, {"ignore_index": torch.tensor(1)}, {"label_smoothing": True}, {"label_smoothing": np.float32(0.1)}, {"label_smoothing": 1}], ids=str)  # fmt: skip
def test_arguments_torch_converts_are_converted(client, kwargs: dict[str, Any]) -> None:
    x, t = torch.randn(2, 3, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1])
    torch.testing.assert_close(client.cross_entropy(x, t, **kwargs), F.cross_entropy(x, t, **kwargs))


# ---------------------------------------------------------------------------- through a real server
def _reference(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.cross_entropy(x.float(), t, **kwargs).to(x.dtype)
    return F.cross_entropy(x, t, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["transposed", "expanded", "sliced"])
def test_torch_in_torch_out(client, dtype: torch.dtype, layout: str) -> None:
    base = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    x = {"transposed": base.t(), "expanded": base.t()[:1].expand(4, 5), "sliced": torch.cat([base, base]).t()[:, ::2]}[layout]
    t = torch.tensor([0, 4, 2, 1])[: x.shape[0]]
    before = x.clone()
    out = client.cross_entropy(x, t, reduction="none")
    assert isinstance(out, torch.Tensor)
    assert out.dtype == F.cross_entropy(x, t, reduction="none").dtype
    torch.testing.assert_close(out, _reference(x, t, reduction="none"))
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", ["<f8", "<f4", "<f2", ">f4", ">f8", "bf16"])
@pytest.mark.parametrize("layout", ["fortran", "broadcast", "0-dim-target"])
def test_numpy_in_numpy_out(client, dtype: str, layout: str) -> None:
    a = numpy_base(dtype, 4, 5)
    t = np.array([0, 4, 2, 1])
    if layout == "fortran":
        a = np.asfortranarray(a)
    elif layout == "broadcast":
        a = np.broadcast_to(a[:1], (4, 5))
    else:
        a, t = a[0], np.array(3)
    before = a.copy()
    out = client.cross_entropy(a, t, reduction="none")
    assert isinstance(out, np.ndarray)
    x = _as_torch(a)
    expected = _reference(x, torch.from_numpy(np.asarray(t)), reduction="none")
    if dtype == "bf16":
        assert out.dtype == BF16
        got = _as_torch(out)
    else:
        assert out.dtype.isnative
        assert out.dtype == np.dtype(str(expected.dtype).removeprefix("torch."))
        got = torch.from_numpy(out)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    assert np.array_equal(a.view(np.uint16) if dtype == "bf16" else a, before.view(np.uint16) if dtype == "bf16" else before)


def test_scalar_results_keep_their_kind(client) -> None:
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    out = client.cross_entropy(x, np.array([2]))
    assert isinstance(out, np.ndarray) and out.shape == () and out.dtype == np.float32
    tout = client.cross_entropy(torch.from_numpy(x), torch.tensor([2]))
    assert isinstance(tout, torch.Tensor) and tout.shape == () and tout.dtype == torch.float32
    assert float(out) == pytest.approx(float(F.cross_entropy(torch.from_numpy(x), torch.tensor([2]))), rel=1e-6)
