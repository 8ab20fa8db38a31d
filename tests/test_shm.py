"""Same-host shared-memory tensors (--allow-client-shm): results, bad references, cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import InvalidArgumentError, LossClient
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from lossd_client.tensors import to_proto
from serverproc import start_server

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this host")


@pytest.fixture(scope="module")
def shm_server():
    proc = start_server("--allow-client-shm")
    yield proc
    proc.stop()


def _segments() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shared_memory_results_equal_torch(shm_server, dtype, reduction):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 50, generator=g).to(dtype)
    t = torch.randint(0, 50, (300,), generator=g)
    t[::7] = -100
    before = _segments()
    with LossClient(shm_server.address, shared_memory=True, shm_min_bytes=0, timeout_s=60) as c:
        got = c.cross_entropy(x, t, reduction=reduction)
    want = F.cross_entropy(x.float(), t, reduction=reduction).to(dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want)
    assert _segments() - before == set(), "the client must unlink its segments when it closes"


def test_segments_are_reused_between_calls_and_unlinked_on_close(shm_server):
    x = torch.randn(256, 1024)
    t = torch.randint(0, 1024, (256,))
    before = _segments()
    with LossClient(shm_server.address, shared_memory=True, shm_min_bytes=0, timeout_s=60) as c:
        c.cross_entropy(x, t)
        first = _segments() - before
        for _ in range(3):
            got = c.cross_entropy(x, t)
        assert _segments() - before == first and first, "later calls reuse the first call's segments"
    torch.testing.assert_close(got, F.cross_entropy(x, t))
    assert _segments() - before == set()


def test_shared_memory_is_refused_unless_enabled(client):
    with LossClient(client.target, shared_memory=True, shm_min_bytes=0, timeout_s=30) as c:
        with pytest.raises(InvalidArgumentError, match=r"input\.shm"):
            c.cross_entropy(np.zeros((4, 3), np.float32), np.array([0, 1, 2, 0]))


def _request_with_ref(name: str, offset: int, length: int) -> pb.EvaluateRequest:
    req = pb.EvaluateRequest()
    req.input.dtype = pb.FLOAT32
    req.input.shape[:] = [4, 3]
    req.input.shm.name = name
    req.input.shm.offset = offset
    req.input.shm.length = length
    to_proto(np.array([0, 1, 2, 0]), req.target)
    return req


def test_bad_references_are_invalid_argument(shm_server):
    segment = shared_memory.SharedMemory(create=True, size=48)
    try:
        np.frombuffer(segment.buf, np.float32)[:] = np.arange(12, dtype=np.float32)
        name = segment.name.lstrip("/")
        cases = [
            (_request_with_ref("lossd-does-not-exist", 0, 48), "input.shm.name"),
            (_request_with_ref("../etc/passwd", 0, 48), "input.shm.name"),
            (_request_with_ref(name, 0, 40), "input.shm.length"),
            (_request_with_ref(name, 8, 48), "input.shm"),
        ]
        both = _request_with_ref(name, 0, 48)
        both.input.data = b"\0" * 48
        cases.append((both, "input.data"))
        with grpc.insecure_channel(shm_server.address) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            for request, field in cases:
                with pytest.raises(grpc.RpcError) as info:
                    stub.Evaluate(request, timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert field in info.value.details()
            good = stub.Evaluate(_request_with_ref(name, 0, 48), timeout=30)
        want = F.cross_entropy(torch.arange(12, dtype=torch.float32).reshape(4, 3), torch.tensor([0, 1, 2, 0]))
        assert np.frombuffer(good.loss.data, np.float32)[0] == pytest.approx(want.item(), rel=1e-6)
    finally:
        segment.close()
        segment.unlink()


def test_segments_are_removed_when_the_client_dies_mid_call(tmp_path):
    """A client killed with SIGKILL while its segment exists: the resource tracker unlinks it."""
    script = textwrap.dedent(
        """
        import sys, time
        import numpy as np
        from lossd_client.shm import SharedMemoryArena
        from lossd_client._proto.lossd.v1 import loss_pb2 as pb
        arena = SharedMemoryArena(0)
        arena.place(np.ones((256, 256), np.float32), pb.Tensor())
        print(arena.names[0], flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        name = proc.stdout.readline().strip().lstrip("/")
        assert name in _segments()
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 20
        while name in _segments() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert name not in _segments()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _rss_shmem_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


def test_server_keeps_no_mapping_after_the_call(shm_server):
    """Every request's segment is unmapped once answered (no mapping pinned by a reference cycle)."""
    x = torch.randn(1024, 4096)  # 16 MiB
    t = torch.randint(0, 4096, (1024,))
    with LossClient(shm_server.address, shared_memory=True, timeout_s=120) as c:
        for _ in range(4):
            got = c.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(got, F.cross_entropy(x, t, reduction="none"))
    assert _rss_shmem_kib(shm_server.proc.pid) < 8 * 1024
