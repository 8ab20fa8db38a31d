"""lossd.v1.Tensor <-> torch.Tensor, validating every field.

Decoding wraps the message's bytes without copying (``torch.frombuffer``), fp16 and bf16
included; the resulting tensors are read-only views that the engine never writes to.
"""

from __future__ import annotations

import math
import warnings

import torch
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.layout import DTYPE_NAMES, ITEMSIZE, MAX_DIMS

from .wire import WireTensor, declared_dims, tensor_of

WIRE_TO_TORCH: dict[int, torch.dtype] = {wire: getattr(torch, name) for wire, name in DTYPE_NAMES.items()}
TORCH_TO_WIRE: dict[torch.dtype, int] = {v: k for k, v in WIRE_TO_TORCH.items()}
# Request bytes are immutable and the engine never writes to its inputs: torch's warning about
# non-writable buffers is expected on every decode, so it is silenced once, not per call.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
MAX_ELEMENTS = 1 << 62


class TensorError(ValueError):
    """A malformed wire tensor; ``field`` names it (e.g. ``input.shape``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def dtype_of(field: str, wire_dtype: int) -> torch.dtype:
    """The dtype of the tensor ``field`` (errors name ``field.dtype``)."""
    return dtype_field(f"{field}.dtype", wire_dtype)


def shape_of(field: str, shape) -> tuple[int, ...]:
    """The shape of the tensor ``field`` (errors name ``field.shape``)."""
    return shape_field(f"{field}.shape", shape)


def dtype_field(field: str, wire_dtype: int) -> torch.dtype:
    """A DType field's dtype; errors name ``field`` itself (e.g. ``header.input_dtype``)."""
    if wire_dtype == pb.DTYPE_UNSPECIFIED:
        raise TensorError(field, "is DTYPE_UNSPECIFIED; set the element type")
    try:
        return WIRE_TO_TORCH[wire_dtype]
    except KeyError:
        raise TensorError(field, f"unknown dtype enum value {wire_dtype}") from None


def shape_field(field: str, shape) -> tuple[int, ...]:
    """A repeated-int64 shape field's sizes, checked; errors name ``field`` itself (e.g. ``header.input_shape``)."""
    ndim = declared_dims(shape)
    if ndim > MAX_DIMS:
        raise TensorError(field, f"expected at most {MAX_DIMS} dimensions, got {ndim}")
    dims = tuple(int(s) for s in shape)
    for i, s in enumerate(dims):
        if s < 0:
            raise TensorError(field, f"dimension {i} is negative ({s}); sizes must be >= 0")
    count = 1
    for s in dims:
        count *= s
        if count > MAX_ELEMENTS:
            raise TensorError(field, f"element count of {list(dims)} overflows")
    # torch strides each dimension by the product of the later sizes (an empty one counting as 1),
    # so an empty tensor such as [0, 2, 2**62] has no elements yet a stride torch cannot represent.
    stride = 1
    for s in reversed(dims[1:]):
        stride *= max(s, 1)
        if stride > MAX_ELEMENTS:
            raise TensorError(
                field,
                f"strides of {list(dims)} overflow (the sizes after the first, empty ones counted as 1, multiply past {MAX_ELEMENTS})",
            )
    return dims


#: No tensor may describe more bytes than this (int64 byte counts in torch and the protocol).
MAX_TENSOR_BYTES = 1 << 62


def expected_nbytes(field: str, msg: WireTensor | pb.Tensor) -> tuple[torch.dtype, tuple[int, ...], int]:
    dtype = dtype_of(field, msg.dtype)
    shape = shape_of(field, msg.shape)
    nbytes = math.prod(shape) * ITEMSIZE[msg.dtype]
    if nbytes > MAX_TENSOR_BYTES:
        raise TensorError(
            f"{field}.shape", f"{list(shape)} of {_name(dtype)} is {nbytes} bytes, more than any tensor may hold ({MAX_TENSOR_BYTES})"
        )
    return dtype, shape, nbytes


def from_buffer(field: str, buffer, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Wrap raw little-endian bytes as a tensor without copying."""
    if len(buffer) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


def shm_nbytes(tensors: dict[str, WireTensor | pb.Tensor | None]) -> int:
    """Bytes the shared-memory references among ``tensors`` (field name -> tensor) will copy into
    the server: what their dtypes and shapes take (checked here), never the length a reference
    claims. Reserve this before decoding, which copies them and checks the rest."""
    total = 0
    for field, msg in tensors.items():
        if isinstance(msg, pb.Tensor):
            msg = tensor_of(msg) if msg.HasField("shm") else None
        if msg is not None and msg.shm is not None:
            total += expected_nbytes(field, msg)[2]
    return total


def decode(field: str, msg: WireTensor | pb.Tensor, shm_reader=None) -> torch.Tensor:
    """Decode and validate a wire tensor (a view of its bytes, no copy). ``field`` names it."""
    if isinstance(msg, pb.Tensor):
        msg = tensor_of(msg)
    dtype, shape, nbytes = expected_nbytes(field, msg)
    if msg.shm is not None:
        if msg.data:
            raise TensorError(f"{field}.data", f"set either data or shm, not both (got {len(msg.data)} bytes of data and a shm reference)")
        if shm_reader is None:
            raise TensorError(f"{field}.shm", "shared-memory tensors are disabled on this server (start it with --allow-client-shm)")
        return shm_reader(field, msg.shm, dtype, shape, nbytes)
    if len(msg.data) != nbytes:
        raise TensorError(
            f"{field}.data",
            f"expected {nbytes} bytes for shape {list(shape)} of {_name(dtype)} ({ITEMSIZE[msg.dtype]} bytes each), got {len(msg.data)}",
        )
    return from_buffer(field, msg.data, dtype, shape)


def encode(tensor: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode a CPU tensor as little-endian C-order bytes."""
    msg = pb.Tensor() if out is None else out
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    msg.dtype = TORCH_TO_WIRE[t.dtype]
    msg.shape[:] = t.shape
    if not t.numel():  # numpy cannot hold every empty shape torch can, e.g. (2**62, 0)
        msg.data = b""
        return msg
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    msg.data = t.numpy().tobytes()
    return msg


def header(tensor: torch.Tensor) -> tuple[pb.Tensor, torch.Tensor]:
    """A CPU tensor's Tensor message without its data, and its data as it is written: the
    little-endian C-order bytes, as a 1-d uint8 tensor (:func:`encode` sets them in the message;
    a large answer writes them a slice at a time, see :mod:`lossd_server.answers`)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    msg = pb.Tensor(dtype=TORCH_TO_WIRE[t.dtype], shape=t.shape)
    return msg, t.reshape(-1).view(torch.uint8)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
