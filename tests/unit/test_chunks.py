"""ChunkAssembler without gRPC: every client mistake is InvalidInput naming the field; chunked
evaluation equals the whole request evaluated at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lossd_client import tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_server import engine, wire
from lossd_server.chunks import ChunkAssembler


def header(input_shape, target, loss=pb.CROSS_ENTROPY, input_dtype=pb.FLOAT32, with_data=True, **options) -> wire.WireHeader:
    t = tensors.to_proto(target)
    if not with_data:
        t.data = b""
    msg = pb.EvaluateChunk(header=pb.ChunkHeader(input_dtype=input_dtype, input_shape=input_shape, target=t))
    msg.header.options.CopyFrom(pb.LossOptions(loss=loss, **options))
    return wire.parse(pb.EvaluateChunk, msg.SerializeToString()).header


def rows(data: bytes = b"", target: bytes = b"") -> wire.WireChunk:
    return wire.WireChunk(None, memoryview(data), memoryview(target))


def run_all(assembler: ChunkAssembler, messages) -> engine.LossResult:
    partials = []
    for message in messages:
        chunk = assembler.rows(message)
        if chunk is not None:
            partials.append(assembler.evaluate(chunk, device=torch.device("cpu"), chunk_bytes=1024))
    assembler.check_complete()
    return assembler.finish(partials)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_in_three_chunks_equal_torch(reduction):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 7, generator=g)
    p = torch.rand(30, 7, generator=g).softmax(1)
    a = ChunkAssembler(header([30, 7], p.numpy(), with_data=False, reduction={"mean": pb.MEAN, "sum": pb.SUM, "none": pb.NONE}[reduction]))
    xb, pb_ = x.numpy().tobytes(), p.numpy().tobytes()
    row = 7 * 4
    got = run_all(
        a,
        [
            rows(xb[: 10 * row], pb_[: 10 * row]),
            rows(xb[10 * row : 25 * row], pb_[10 * row : 25 * row]),
            rows(xb[25 * row :], pb_[25 * row :]),
        ],
    )
    torch.testing.assert_close(got.loss, torch.nn.functional.cross_entropy(x, p, reduction=reduction))


def test_a_target_shaped_like_the_input_with_data_in_the_header_is_named():
    with pytest.raises(engine.InvalidInput) as info:
        ChunkAssembler(header([4, 3], np.full((4, 3), 0.25, np.float32)))
    assert info.value.field == "header.target.data"
    with pytest.raises(engine.InvalidInput) as info:
        ChunkAssembler(header([4, 3], np.zeros((4, 3), np.float32), loss=pb.BINARY_CROSS_ENTROPY_WITH_LOGITS))
    assert info.value.field == "header.target.data"


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: header([8, 5], np.arange(8) % 5, input_dtype=pb.DTYPE_UNSPECIFIED), "header.input_dtype: is DTYPE_UNSPECIFIED"),
        (lambda: header([8, 5], np.arange(8) % 5, input_dtype=77), "header.input_dtype: unknown dtype enum value 77"),
        (lambda: header([-8, 5], np.arange(8) % 5), "header.input_shape: dimension 0 is negative (-8)"),
        (lambda: header([8, 5], np.arange(8) % 5, input_dtype=pb.INT64), "header.input_dtype: expected a floating dtype"),
        (
            lambda: header(
                [8, 5], np.zeros((8, 5), np.float32), input_dtype=pb.INT64, with_data=False, loss=pb.BINARY_CROSS_ENTROPY_WITH_LOGITS
            ),
            "header.input_dtype: expected a floating dtype",
        ),
        (
            lambda: header([8, 5], np.zeros((8, 5), np.float32), input_dtype=pb.INT64, with_data=False, loss=pb.KL_DIV),
            "header.input_dtype: dtype int64 rejected by torch's kl_div",
        ),
        # an input kl_div broadcasts along the target's rows: named as such, not "send the target's data"
        (
            lambda: header([1, 5], np.zeros((8, 5), np.float32), with_data=False, loss=pb.KL_DIV),
            "header.input_shape: the input [1, 5] is broadcast along the rows",
        ),
        (
            lambda: header([5], np.zeros((8, 5), np.float32), with_data=False, loss=pb.KL_DIV),
            "header.input_shape: the input [5] is broadcast along the rows",
        ),
        (
            lambda: header([2, 5], np.zeros((8, 5), np.float32), with_data=False, loss=pb.KL_DIV),
            "header.target: The size of tensor a (8) must match the size of tensor b (2)",
        ),
        # the unary request's checks, naming the header's fields
        (lambda: header([4, 5], np.arange(3) % 5), "header.target: Expected input batch_size (4) to match target batch_size (3)."),
        (lambda: header([4, 5], np.array([0, 1, 2, 5])), "header.target: Target 5 is out of bounds."),
        (lambda: header([4, 5], (np.arange(4) % 5).astype(np.int32)), "header.target: expected class indices of dtype int64 or uint8"),
        (lambda: header([2, 0, 4], np.zeros((2, 4), np.int64)), "header.input_shape: size mismatch (got input: [2, 0, 4] with 0 classes"),
        (lambda: header([4, 5], np.arange(4) % 5, class_axis=2), "header.options.class_axis: axis 2 is out of range"),
        (
            lambda: header([4, 5], np.arange(4) % 5, weight=tensors.to_proto(np.ones(3, np.float32))),
            "header.options.weight: weight tensor should be defined",
        ),
        (lambda: header([4, 5], np.arange(4) % 5, weight=pb.Tensor(dtype=99)), "header.options.weight.dtype: unknown dtype enum value 99"),
        (
            lambda: header([4, 5], np.arange(4) % 5, pos_weight=tensors.to_proto(np.ones(5, np.float32))),
            "header.options.pos_weight: only binary_cross_entropy_with_logits",
        ),
        (
            lambda: header([4, 5], np.arange(4) % 5, label_smoothing=1.5),
            "header.options.label_smoothing: label_smoothing must be between 0.0 and 1.0",
        ),
        (lambda: header([4, 5], np.arange(4) % 5, loss=99), "header.options.loss: unknown LossKind enum value 99"),
        (lambda: header([4, 5], np.arange(4) % 5, log_target=True), "header.options.log_target: only kl_div takes log_target"),
    ],
)
def test_header_mistakes_name_the_header_field_once(make, message):
    """Header fields are named as the proto names them (header.input_dtype, not
    header.input_dtype.dtype, nor input; header.target and header.options.weight, not the
    EvaluateRequest's target and options.weight), once."""
    with pytest.raises(ValueError) as info:
        ChunkAssembler(make())
    assert str(info.value).startswith(message), str(info.value)


def test_a_streamed_target_whose_size_overflows_is_named():
    h = header([2**60, 2], np.zeros((1, 1), np.float64), input_dtype=pb.BFLOAT16, with_data=False)
    h.target.shape = (2**60, 2)  # like the input, so it would travel with the rows: 2**64 bytes
    with pytest.raises(ValueError) as info:
        ChunkAssembler(h)
    assert "header.target.shape" in str(info.value)


def test_class_axis_zero_classes_with_shift_and_rank_extras_is_answered():
    t = np.full((2, 4), -100)
    a = ChunkAssembler(
        header(
            [2, 4, 0],
            t,
            class_axis=-1,
            shift_targets=True,
            reduction=pb.NONE,
            extras=[pb.TARGET_RANK, pb.ARGMAX_CORRECT],
            sequence_stats=True,
        )
    )
    got = run_all(a, [rows()])
    assert got.loss.shape == (2, 4) and got.extras["target_rank"].shape == (2, 4)


@pytest.mark.parametrize(
    "messages,field",
    [
        ([rows(b"\0" * 5)], "input_rows"),  # not whole rows
        ([rows(b"\0" * 12 * 5)], "input_rows"),  # more rows than the header holds
        ([rows(b"\0" * 12, b"\0" * 8)], "target_rows"),  # class-index targets travel in the header
        ([rows(b"\0" * 12)], "input_rows"),  # fewer rows than the header holds (check_complete)
    ],
)
def test_row_mistakes_name_the_field(messages, field):
    a = ChunkAssembler(header([4, 3], np.array([0, 1, 2, 0])))
    with pytest.raises(engine.InvalidInput) as info:
        run_all(a, messages)
    assert info.value.field == field


def test_a_second_header_is_named():
    a = ChunkAssembler(header([4, 3], np.array([0, 1, 2, 0])))
    second = wire.WireChunk(header([4, 3], np.array([0, 1, 2, 0])), memoryview(b""), memoryview(b""))
    with pytest.raises(engine.InvalidInput) as info:
        a.rows(second)
    assert info.value.field == "header"


def test_zero_element_units_are_one_step_however_many():
    a = ChunkAssembler(header([2**34, 5, 0], np.zeros((2**34, 0), np.int64), reduction=pb.NONE))
    got = run_all(a, [rows()])
    assert got.loss.shape == (2**34, 0)


def test_a_chunks_work_is_its_rows_share_of_the_plans_not_its_bytes():
    """A kl_div target broadcast along one-element rows: 32 KiB of rows make 512 MiB of output,
    which decides where the chunk is computed (Batcher.compute_soon), as for a unary request."""
    target = np.zeros((1, 16384), np.float32)
    a = ChunkAssembler(header([8192, 1], target, loss=pb.KL_DIV))
    half = rows(np.zeros(4096, np.float32).tobytes())
    assert a.work_nbytes(half) == a.plan.work_nbytes // 2 == 4096 * 16384 * 4
    a.rows(half, first=True)
    # per-token extras and statistics of a 'none' answer count as a unary request's do
    b = ChunkAssembler(header([64, 4], np.zeros(64, np.int64), reduction=pb.NONE, extras=[pb.TARGET_LOGPROB, pb.ENTROPY, pb.TARGET_RANK]))
    chunk = rows(np.zeros(32 * 4, np.float32).tobytes())
    assert b.plan.work_nbytes > b.plan.input_nbytes
    assert b.work_nbytes(chunk) == -(-b.plan.work_nbytes * 32 // 64) > len(chunk.input_rows)
    # units of no elements all come in one message: the whole plan's work
    c = ChunkAssembler(header([2**24, 5, 0], np.zeros((2**24, 0), np.int64), sequence_stats=True))
    assert c.work_nbytes(rows()) == c.plan.work_nbytes > 2**24
