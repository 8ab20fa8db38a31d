"""The servicer's size checks, without a server: what a unary request's size counts, and the id
that every answer echoes counted in the answer's size."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from lossd_client import tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_server import convert, engine, service, wire
from lossd_server.errors import OversizedId, RequestError


def request(n: int, *, weight: np.ndarray | None = None, request_id: str = "") -> wire.WireRequest:
    msg = pb.EvaluateRequest(id=request_id, options=pb.LossOptions(loss=pb.BINARY_CROSS_ENTROPY_WITH_LOGITS))
    x = np.zeros(n, np.float32)
    tensors.to_proto(x, msg.input)
    tensors.to_proto(x, msg.target)
    if weight is not None:
        tensors.to_proto(weight, msg.options.weight)
    return wire.parse(pb.EvaluateRequest, msg.SerializeToString())


def test_the_message_size_counts_the_id_and_the_class_weights() -> None:
    limit = 4096
    service.check_message_size(request(500), limit)  # 4000 tensor bytes
    with pytest.raises(RequestError) as info:
        service.check_message_size(request(500), limit, id_nbytes=200)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request tensors and id take 4200 bytes, over this server's max_message_bytes (4096)" in info.value.message
    service.check_message_size(request(400), limit)  # 3200 tensor bytes
    with pytest.raises(RequestError) as info:
        service.check_message_size(request(400, weight=np.ones(400, np.float32)), limit)  # and a 1600-byte weight
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_id_is_measured_in_utf8_bytes_and_bounded() -> None:
    assert service.check_id("id", "", 32) == 0
    assert service.check_id("id", "é" * 16, 32) == 32
    with pytest.raises(OversizedId) as info:
        service.check_id("header.id", "é" * 17, 32)
    assert isinstance(info.value, engine.InvalidInput)
    assert str(info.value).startswith("header.id: takes 34 bytes (UTF-8), over this server's max_id_bytes (32)")
    with pytest.raises(OversizedId) as info:
        service.check_id("id", "é" * 100, 32)  # measured without encoding it: at least a byte a character
    assert "takes at least 100 bytes" in str(info.value)


def test_the_answer_size_counts_the_echoed_id() -> None:
    plan = convert.decode_request(request(4)).plan
    assert service.check_answer_size(plan, 2**20, id_nbytes=1000) == plan.answer_nbytes() + 1000
    with pytest.raises(RequestError) as info:
        service.check_answer_size(plan, plan.answer_nbytes() + 999, id_nbytes=1000)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    "input_shape,target_shape,elements",
    [((2**20, 1), (1, 2**20), 2**40), ((8, 1), (1, 8), 64), ((8, 5), (1, 5), 0), ((8, 5), (5,), 0), ((1, 5), (8, 5), 0), ((), (3, 4), 0)],
)
def test_only_a_broadcast_past_the_larger_operand_counts(input_shape, target_shape, elements) -> None:
    import torch

    spec = engine.LossSpec(loss=engine.KL_DIV, reduction="sum")
    plan = engine.plan(spec, input_shape, torch.float32, torch.empty(target_shape, device="meta"))
    assert plan.broadcast_elements == elements
    service.check_broadcast(plan, max(elements, 1))
    if elements:
        with pytest.raises(RequestError) as info:
            service.check_broadcast(plan, elements - 1)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"makes {elements} elements, over this server's max_broadcast_elements ({elements - 1})" in info.value.message
    bce = convert.decode_request(request(4, weight=np.ones(1, np.float32))).plan  # a weight broadcast to the input adds nothing
    assert bce.broadcast_elements == 0
