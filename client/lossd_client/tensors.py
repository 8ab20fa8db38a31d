"""numpy / torch arrays <-> lossd.v1.Tensor.

torch is optional: it is used only when the caller passes torch tensors (and is then already
imported). bfloat16 travels as raw 16-bit words, so it works without numpy bfloat16 support;
numpy arrays of ``ml_dtypes.bfloat16`` are accepted and returned when ml_dtypes is installed.
The caller's array is never modified: a non-contiguous or big-endian array is copied once,
a contiguous little-endian one is read directly.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._proto.lossd.v1 import loss_pb2 as pb
from .layout import DTYPE_NAMES, DTYPES

_TORCH_NAME_TO_WIRE: dict[str, int] = {f"torch.{name}": wire for name, wire in DTYPES.items()}


class UnsupportedTensorError(TypeError):
    """The value cannot be sent as a lossd tensor (unsupported dtype or type)."""


def is_torch_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (False without importing torch when it was never imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _bfloat16_numpy_dtype() -> Any | None:
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


#: dtype object (numpy or torch) -> wire dtype, filled as they are met: a dtype's name costs more
#: to compute than the lookup (numpy: 5 us per call, four calls per request on evaluate_many's path).
#: Only supported dtypes enter it, so it stays a handful of entries.
_WIRE_OF_DTYPE: dict[Any, int] = {}


def wire_dtype_of(value: Any) -> int:
    """The wire dtype a value would be sent as."""
    if is_torch_tensor(value):
        dtype = value.dtype
        wire = _WIRE_OF_DTYPE.get(dtype)
        if wire is None:
            try:
                wire = _WIRE_OF_DTYPE[dtype] = _TORCH_NAME_TO_WIRE[str(dtype)]
            except KeyError:
                raise UnsupportedTensorError(f"unsupported torch dtype {dtype}") from None
        return wire
    dtype = as_array(value).dtype
    wire = _WIRE_OF_DTYPE.get(dtype)
    if wire is None:
        try:
            wire = _WIRE_OF_DTYPE[dtype] = DTYPES[dtype.name]
        except KeyError:
            raise UnsupportedTensorError(f"unsupported numpy dtype {dtype}") from None
    return wire


def check_dense(t: Any) -> None:
    """Refuse a torch tensor that has no strided dense data to send (sparse, mkldnn or nested;
    torch's losses reject them too): UnsupportedTensorError, never the RuntimeError its
    ``contiguous()`` or ``numpy()`` raises."""
    if t.is_nested:
        raise UnsupportedTensorError("nested tensors are not supported; send a dense (strided) tensor")
    if t.layout != sys.modules["torch"].strided:
        kind = "sparse" if t.is_sparse or "sparse" in str(t.layout) else str(t.layout).removeprefix("torch.").lstrip("_")
        raise UnsupportedTensorError(f"{kind} tensors are not supported (layout {t.layout}); send a dense tensor (.to_dense())")


def as_array(value: Any) -> np.ndarray:
    """``value`` as a numpy array (itself when it is one); UnsupportedTensorError for what numpy
    cannot make an array of (ragged nested lists, ...)."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise UnsupportedTensorError(f"cannot be read as an array ({exc})") from None


def nbytes(value: Any) -> int:
    """Bytes of an array or tensor's data, counted without copying a tensor or an array."""
    if is_torch_tensor(value):
        return value.numel() * value.element_size()
    return as_array(value).nbytes


def as_wire_bytes(value: Any) -> tuple[int, tuple[int, ...], memoryview]:
    """(wire dtype, shape, little-endian C-order bytes view) of a numpy array or torch tensor."""
    if is_torch_tensor(value):
        wire = wire_dtype_of(value)
        check_dense(value)
        t = value.detach()
        if t.device.type == "meta":
            raise UnsupportedTensorError("a meta tensor has no data to send")
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        t = t.contiguous()
        if wire == pb.BFLOAT16:
            arr = t.view(sys.modules["torch"].int16).numpy()
        else:
            arr = t.numpy()
        shape = tuple(t.shape)
    else:
        arr = as_array(value)
        wire = wire_dtype_of(arr)
        shape = tuple(arr.shape)
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if wire == pb.BFLOAT16:
            arr = arr.view(np.uint16)
    arr = np.ascontiguousarray(arr)
    return wire, shape, memoryview(arr.reshape(-1).view(np.uint8))


def to_proto(value: Any, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode a numpy array, torch tensor, Python scalar or nested list as a wire Tensor."""
    msg = pb.Tensor() if out is None else out
    wire, shape, data = as_wire_bytes(value)
    msg.dtype = wire
    msg.shape[:] = shape
    msg.data = data.tobytes()
    return msg


def numpy_from_proto(msg: pb.Tensor) -> np.ndarray:
    """Decode a wire Tensor into a numpy array (bfloat16 needs ml_dtypes)."""
    name = DTYPE_NAMES.get(msg.dtype)
    if name is None:
        raise UnsupportedTensorError(f"unknown wire dtype {msg.dtype}")
    if name == "bfloat16":
        bf16 = _bfloat16_numpy_dtype()
        if bf16 is None:
            raise UnsupportedTensorError("bfloat16 results need torch or ml_dtypes installed")
        dtype = bf16
    else:
        dtype = np.dtype(name).newbyteorder("<")
    # A writable copy, as torch would hand back; results are ~C times smaller than inputs.
    return np.frombuffer(msg.data, dtype=dtype).reshape(tuple(msg.shape)).astype(dtype.newbyteorder("="), copy=True)


def torch_from_proto(msg: pb.Tensor) -> Any:
    """Decode a wire Tensor into a (writable) torch tensor."""
    import torch

    if not msg.data and 0 in msg.shape:  # numpy cannot hold every empty shape torch can, e.g. (2**62, 0)
        name = DTYPE_NAMES.get(msg.dtype)
        if name is None:
            raise UnsupportedTensorError(f"unknown wire dtype {msg.dtype}")
        return torch.empty(tuple(msg.shape), dtype=getattr(torch, name))
    if msg.dtype == pb.BFLOAT16:
        raw = np.frombuffer(msg.data, dtype="<i2").reshape(tuple(msg.shape)).copy()
        return torch.from_numpy(raw).view(torch.bfloat16)
    return torch.from_numpy(numpy_from_proto(msg).copy())


def from_proto(msg: pb.Tensor, *, as_torch: bool) -> Any:
    """Decode a wire Tensor as a torch tensor (``as_torch``) or a numpy array."""
    return torch_from_proto(msg) if as_torch else numpy_from_proto(msg)
