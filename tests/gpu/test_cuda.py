"""The CUDA path against a real server on the GPU (skipped where CUDA is absent).

Run on a GPU machine: ``make test LAYER=gpu``; and the whole service layer on the GPU with
``LOSSD_TEST_DEVICE=cuda make test LAYER=service`` (every result checked against CPU torch).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lossd_client import InvalidArgumentError, LossClient, LossRequest, ResourceExhaustedError
from serverproc import start_server

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(scope="module")
def cuda_server():
    proc = start_server("--device", "cuda")
    yield proc
    proc.stop()


def good_call(client: LossClient) -> None:
    x, t = torch.randn(8, 5), torch.randint(0, 5, (8,))
    torch.testing.assert_close(client.cross_entropy(x, t), F.cross_entropy(x, t))


def test_the_server_runs_on_the_gpu(cuda_server):
    with LossClient(cuda_server.address, timeout_s=60) as client:
        info = client.server_info()
        assert info.device.startswith("cuda") and info.device_name == torch.cuda.get_device_name(0)
        good_call(client)


@pytest.mark.parametrize(
    "target,extra",
    [
        (torch.tensor([0, 7, 1]), {}),  # class index out of range: a device-side assert if it reached a kernel
        (torch.tensor([-3, 1, 1]), {}),
        (torch.tensor([0, 1, 2]), {"weight": torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0], dtype=torch.float64)}),  # wrong dtype
    ],
)
def test_bad_targets_never_reach_a_kernel_and_the_context_stays_usable(cuda_server, target, extra):
    with LossClient(cuda_server.address, timeout_s=60) as client:
        with pytest.raises(InvalidArgumentError):
            client.cross_entropy(torch.randn(3, 5), target, **extra)
        good_call(client)  # a poisoned CUDA context would fail every later call


def test_a_request_too_large_for_the_device_is_refused_and_the_server_keeps_serving():
    """About 3 MB of device memory: one 4 MiB engine chunk cannot fit, a small request can."""
    proc = start_server("--device", "cuda", "--cuda-memory-fraction", "0.00002")
    try:
        with LossClient(proc.address, timeout_s=300) as client:
            x = np.random.default_rng(0).standard_normal((256, 32000), dtype=np.float32)  # 32 MB
            with pytest.raises(ResourceExhaustedError, match="cuda-memory-fraction"):
                client.evaluate(LossRequest(x, np.zeros(256, np.int64), reduction="none"))
            good_call(client)
        with grpc.insecure_channel(proc.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.stop()
