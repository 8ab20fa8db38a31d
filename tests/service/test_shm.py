"""Same-host shared-memory tensors (--allow-client-shm): results, cleanup, and every attack we know of:
each is INVALID_ARGUMENT naming the field, and the server keeps serving."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lossd_client import InvalidArgumentError, LossClient
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from lossd_client.shm import HEADER_BYTES, MAGIC, NAME_PREFIX, TOKEN_BYTES, Segment, SharedMemoryArena, create_segment
from lossd_client.tensors import to_proto
from lossd_server import wire
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


GOOD_X = np.arange(12, dtype=np.float32).reshape(4, 3)
GOOD_T = np.array([0, 1, 2, 0])


def _request_with_ref(name: str, offset: int, length: int, token: bytes = b"", shape: tuple[int, ...] = (4, 3)) -> pb.EvaluateRequest:
    req = pb.EvaluateRequest()
    req.input.dtype = pb.FLOAT32
    req.input.shape[:] = shape
    req.input.shm.name = name
    req.input.shm.offset = offset
    req.input.shm.length = length
    req.input.shm.token = token
    to_proto(np.zeros(shape[0], np.int64) if shape != (4, 3) else GOOD_T, req.target)
    return req


def _ref_to(segment: Segment, nbytes: int = GOOD_X.nbytes, shape: tuple[int, ...] = (4, 3)) -> pb.EvaluateRequest:
    return _request_with_ref(segment.name.lstrip("/"), HEADER_BYTES, nbytes, segment.token, shape)


@contextlib.contextmanager
def _lossd_segment(data: np.ndarray = GOOD_X, write: bool = True):
    """A segment as lossd_client creates it (prefix, header, token), ``data`` after the header; unlinked after."""
    segment = create_segment(data.nbytes)
    try:
        if write:
            np.frombuffer(segment.shm.buf, np.uint8, count=data.nbytes, offset=HEADER_BYTES)[:] = data.view(np.uint8).reshape(-1)
        yield segment
    finally:
        segment.shm.close()
        with contextlib.suppress(FileNotFoundError):
            segment.shm.unlink()


@contextlib.contextmanager
def _scratch(prefix: str = "lossd-test-"):
    """A fresh path in /dev/shm; whatever the test put there is removed afterwards."""
    path = os.path.join("/dev/shm", prefix + secrets.token_hex(8))
    try:
        yield path
    finally:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)


def _assert_still_serving(server) -> None:
    """The process lives, health is SERVING and a good shared-memory call equals torch."""
    assert server.proc.poll() is None, f"the server died (exit {server.proc.returncode})"
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    x = torch.randn(64, 33)
    t = torch.randint(0, 33, (64,))
    with LossClient(server.address, shared_memory=True, shm_min_bytes=0, timeout_s=30) as c:
        got = c.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(got, F.cross_entropy(x, t, reduction="none"))


def _refused(server, request: pb.EvaluateRequest, field: str, phrase: str = "") -> str:
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=10)
    details = info.value.details()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(field + ":"), details
    assert phrase in details, details
    return details


def test_client_segments_carry_prefix_header_and_a_fresh_token():
    with SharedMemoryArena(0) as arena:
        a, b = pb.Tensor(), pb.Tensor()
        assert arena.place(np.ones((8, 8), np.float32), a) and arena.place(np.ones(5, np.int64), b)
        assert a.shm.name.startswith(NAME_PREFIX) and b.shm.name.startswith(NAME_PREFIX) and a.shm.name != b.shm.name
        assert (a.shm.offset, a.shm.length, len(a.shm.token)) == (HEADER_BYTES, 256, TOKEN_BYTES)
        assert a.shm.token != b.shm.token
        for ref in (a.shm, b.shm):
            with open(os.path.join("/dev/shm", ref.name), "rb") as f:
                assert f.read(HEADER_BYTES) == MAGIC + ref.token + bytes(HEADER_BYTES - len(MAGIC) - TOKEN_BYTES)
                f.seek(ref.offset)
                assert f.read(ref.length) == (np.ones((8, 8), np.float32) if ref is a.shm else np.ones(5, np.int64)).tobytes()
        names = {a.shm.name, b.shm.name}
    assert not names & _segments()


def test_bad_references_are_invalid_argument(shm_server):
    with _lossd_segment() as segment:
        name = segment.name.lstrip("/")
        cases = [
            (_request_with_ref("lossd-does-not-exist", HEADER_BYTES, 48, segment.token), "input.shm.name"),
            (_request_with_ref("../etc/passwd", HEADER_BYTES, 48, segment.token), "input.shm.name"),
            (_request_with_ref("lossd-../../etc/passwd", HEADER_BYTES, 48, segment.token), "input.shm.name"),
            (_request_with_ref(name + "\n", HEADER_BYTES, 48, segment.token), "input.shm.name"),
            (_request_with_ref(name, HEADER_BYTES, 40, segment.token), "input.shm.length"),
            (_request_with_ref(name, 0, 48, segment.token), "input.shm.offset"),
            (_request_with_ref(name, 8, 48, segment.token), "input.shm.offset"),
            (_request_with_ref(name, 4096, 48, segment.token), "input.shm"),
            (_request_with_ref(name, 2**63, 48, segment.token), "input.shm"),
            # a length no tensor of this shape has: reserved as the shape says, refused as invalid
            (_request_with_ref(name, HEADER_BYTES, 2**64 - 1, segment.token), "input.shm.length"),
            (_request_with_ref(name, HEADER_BYTES, 2**40, segment.token), "input.shm.length"),
        ]
        both = _ref_to(segment)
        both.input.data = b"\0" * 48
        cases.append((both, "input.data"))
        for request, field in cases:
            _refused(shm_server, request, field)
        with grpc.insecure_channel(shm_server.address) as channel:
            good = pb_grpc.LossServiceStub(channel).Evaluate(_ref_to(segment), timeout=30)
    want = F.cross_entropy(torch.from_numpy(GOOD_X), torch.from_numpy(GOOD_T))
    assert np.frombuffer(good.loss.data, np.float32)[0] == want.item()
    _assert_still_serving(shm_server)


def test_a_long_segment_name_is_refused_before_it_is_decoded_and_never_echoed_whole(shm_server):
    """A 40 MB name of ASCII and one emoji was copied and decoded by protobuf (4 bytes a character)
    and echoed whole in the error (the server's memory 900 MiB over idle for a 60 MB name; the
    client got RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of the
    error): a reference longer than any valid one is refused as the message is read, naming it,
    and an invalid name short enough to be read is shown cut."""
    long_name = "lossd-" + "a" * 40_000_000 + "\U0001f600"
    request = _request_with_ref(long_name, HEADER_BYTES, 48, b"t" * TOKEN_BYTES)
    ref_bytes = request.input.shm.ByteSize()
    details = _refused(
        shm_server, request, "input.shm", f"takes {ref_bytes} bytes; a valid reference takes at most {wire.MAX_SHM_REF_BYTES}"
    )
    assert len(details) < 1000, details
    weighted = _request_with_ref("lossd-x", HEADER_BYTES, 48, b"t" * TOKEN_BYTES)
    weighted.options.weight.dtype = pb.FLOAT32
    weighted.options.weight.shape[:] = [3]
    weighted.options.weight.shm.name = long_name
    _refused(shm_server, weighted, "options.weight.shm", "a valid reference takes at most")
    wide = "lossd-" + "!" * 300  # short enough to be read, not a valid name
    details = _refused(shm_server, _request_with_ref(wide, HEADER_BYTES, 48, b"t" * TOKEN_BYTES), "input.shm.name", "invalid segment name")
    assert f"... ({len(wide)} characters)" in details and wide not in details, details
    _assert_still_serving(shm_server)


def test_shared_memory_class_weights_are_reserved_before_they_are_copied():
    """options.weight by reference: its bytes count against the budget before the copy (a 1 GiB
    weight used to be copied on the event loop, past a 256 MiB budget, and then refused)."""
    server = start_server("--allow-client-shm", "--memory-budget-bytes", str(256 << 20), "--max-message-bytes", str(16 << 20))
    try:
        before = server.status_kib("VmHWM")
        with _lossd_segment(np.zeros(2**26, np.float32)) as segment:  # 256 MiB of weights
            request = pb.EvaluateRequest()
            to_proto(GOOD_X, request.input)
            to_proto(GOOD_T, request.target)
            w = request.options.weight
            w.dtype, w.shape[:] = pb.FLOAT32, [2**26]
            w.shm.name, w.shm.offset, w.shm.length, w.shm.token = segment.name.lstrip("/"), HEADER_BYTES, 2**28, segment.token
            with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
                pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory_budget_bytes" in info.value.details()
        assert server.status_kib("VmHWM") - before < 64 * 1024, "the weight was copied"
    finally:
        server.stop()


def _fifo(stack, path):
    os.mkfifo(path, 0o600)
    return _request_with_ref(os.path.basename(path), HEADER_BYTES, 48, b"t" * 16)


def _directory(stack, path):
    os.mkdir(path, 0o700)
    return _request_with_ref(os.path.basename(path), HEADER_BYTES, 48, b"t" * 16)


def _symlink_to_a_valid_segment(stack, path):
    segment = stack.enter_context(_lossd_segment())
    os.symlink(os.path.join("/dev/shm", segment.name.lstrip("/")), path)
    return _request_with_ref(os.path.basename(path), HEADER_BYTES, 48, segment.token)


def _symlink_to_a_file_outside(stack, path):
    os.symlink("/etc/hostname", path)
    return _request_with_ref(os.path.basename(path), HEADER_BYTES, 48, b"t" * 16)


def _hard_link_to_a_valid_segment(stack, path):
    segment = stack.enter_context(_lossd_segment())
    os.link(os.path.join("/dev/shm", segment.name.lstrip("/")), path)
    return _request_with_ref(os.path.basename(path), HEADER_BYTES, 48, segment.token)


def _unrelated_regular_file(stack, path):
    with open(path, "wb") as f:
        f.write(b"secret bytes of another program " * 32)
    return _request_with_ref(os.path.basename(path), HEADER_BYTES, 48, b"secret bytes of ")


def _unrelated_file_without_the_prefix(stack, path):
    other = stack.enter_context(_scratch("unrelated-"))
    with open(other, "wb") as f:
        f.write(b"\0" * 4096)
    return _request_with_ref(os.path.basename(other), HEADER_BYTES, 48, b"t" * 16)


def _character_device(stack, path):
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    return _request_with_ref(os.path.basename(path), HEADER_BYTES, 48, b"t" * 16)


def _wrong_token(stack, path):
    segment = stack.enter_context(_lossd_segment())
    wrong = bytes(b ^ 1 for b in segment.token)
    return _request_with_ref(segment.name.lstrip("/"), HEADER_BYTES, 48, wrong)


def _missing_token(stack, path):
    segment = stack.enter_context(_lossd_segment())
    return _request_with_ref(segment.name.lstrip("/"), HEADER_BYTES, 48)


def _short_token(stack, path):
    segment = stack.enter_context(_lossd_segment())
    return _request_with_ref(segment.name.lstrip("/"), HEADER_BYTES, 48, segment.token[:8])


def _wrong_magic(stack, path):
    segment = stack.enter_context(_lossd_segment())
    segment.shm.buf[:8] = b"NOTLOSSD"
    return _ref_to(segment)


def _truncated_after_the_header(stack, path):
    segment = stack.enter_context(_lossd_segment())
    os.truncate(os.path.join("/dev/shm", segment.name.lstrip("/")), HEADER_BYTES + 8)
    return _ref_to(segment)


def _truncated_into_the_header(stack, path):
    segment = stack.enter_context(_lossd_segment())
    os.truncate(os.path.join("/dev/shm", segment.name.lstrip("/")), 10)
    return _ref_to(segment)


def _truncated_to_nothing(stack, path):
    segment = stack.enter_context(_lossd_segment())
    os.truncate(os.path.join("/dev/shm", segment.name.lstrip("/")), 0)
    return _ref_to(segment)


def _sparse_segment(stack, path):
    data = np.ones((1024, 16), np.float32)  # 64 KiB: pages past the header page are never written
    segment = stack.enter_context(_lossd_segment(data, write=False))
    return _ref_to(segment, data.nbytes, (1024, 16))


ATTACKS = {
    "fifo": (_fifo, "input.shm.name", "FIFO"),
    "directory": (_directory, "input.shm.name", "directory"),
    "symlink-to-a-valid-segment": (_symlink_to_a_valid_segment, "input.shm.name", "symbolic link"),
    "symlink-outside": (_symlink_to_a_file_outside, "input.shm.name", "symbolic link"),
    "hard-link-to-a-valid-segment": (_hard_link_to_a_valid_segment, "input.shm.name", "hard links"),
    "unrelated-regular-file": (_unrelated_regular_file, "input.shm.name", "not a lossd segment"),
    "unrelated-file-without-prefix": (_unrelated_file_without_the_prefix, "input.shm.name", "invalid segment name"),
    "character-device": (_character_device, "input.shm.name", "character device"),
    "missing-file": (lambda stack, path: _request_with_ref(os.path.basename(path), HEADER_BYTES, 48, b"t" * 16), "input.shm.name", "no shared-memory segment"),
    "wrong-token": (_wrong_token, "input.shm.token", "does not match"),
    "missing-token": (_missing_token, "input.shm.token", "is missing"),
    "short-token": (_short_token, "input.shm.token", "8 bytes"),
    "wrong-magic": (_wrong_magic, "input.shm.name", "not a lossd segment"),
    "truncated-after-header": (_truncated_after_the_header, "input.shm", "exceeds the segment's 72 bytes"),
    "truncated-into-header": (_truncated_into_the_header, "input.shm.name", "not a lossd segment"),
    "truncated-to-nothing": (_truncated_to_nothing, "input.shm.name", "not a lossd segment"),
    "sparse-segment": (_sparse_segment, "input.shm", "never written"),
}  # fmt: skip


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacks_are_invalid_argument_and_the_server_keeps_serving(shm_server, attack):
    setup, field, phrase = ATTACKS[attack]
    with contextlib.ExitStack() as stack, _scratch() as path:
        request = setup(stack, path)
        started = time.monotonic()
        _refused(shm_server, request, field, phrase)
        assert time.monotonic() - started < 5, "answered at once, not after a wait on something the client controls"
        _assert_still_serving(shm_server)


def test_segment_truncated_while_calls_read_it(shm_server):
    """A thread truncates and regrows the referenced segment while 50 calls read it: each call is
    answered (a full read, or INVALID_ARGUMENT naming input.shm), and the server never dies."""
    x = torch.randn(512, 2048)
    t = torch.randint(0, 2048, (512,))
    data = x.numpy()
    stop = threading.Event()
    truncations = 0
    with _lossd_segment(data) as segment:
        path = os.path.join("/dev/shm", segment.name.lstrip("/"))
        full = HEADER_BYTES + data.nbytes

        def shrink_and_regrow() -> None:
            nonlocal truncations
            fd = os.open(path, os.O_RDWR)
            try:
                while not stop.is_set():
                    os.ftruncate(fd, HEADER_BYTES)
                    truncations += 1
                    time.sleep(0.001)
                    os.ftruncate(fd, full)
                    os.pwrite(fd, data.tobytes(), HEADER_BYTES)
                    time.sleep(0.002)
            finally:
                os.close(fd)

        request = _ref_to(segment, data.nbytes, (512, 2048))
        request.target.CopyFrom(to_proto(t.numpy()))
        request.options.reduction = pb.NONE
        outcomes = []
        thread = threading.Thread(target=shrink_and_regrow)
        thread.start()
        try:
            with grpc.insecure_channel(shm_server.address) as channel:
                stub = pb_grpc.LossServiceStub(channel)
                for _ in range(50):
                    try:
                        reply = stub.Evaluate(request, timeout=30)
                        outcomes.append(np.frombuffer(reply.loss.data, np.float32).shape)
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
                        assert exc.details().startswith("input.shm"), exc.details()
                        outcomes.append(exc.details())
        finally:
            stop.set()
            thread.join(10)
    assert len(outcomes) == 50 and truncations > 0
    assert all(o == (512,) or isinstance(o, str) for o in outcomes)
    _assert_still_serving(shm_server)


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


def _maps_of_shm(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if "/dev/shm/" in line]


def test_server_never_maps_a_client_segment(shm_server):
    """The server copies segments, never maps them: not while a call computes (a mapping there is
    what a truncating client turned into SIGBUS), and nothing is kept after the call."""
    x = torch.randn(1024, 4096)  # 16 MiB
    t = torch.randint(0, 4096, (1024,))
    pid = shm_server.proc.pid
    seen: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.extend(_maps_of_shm(pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with LossClient(shm_server.address, shared_memory=True, timeout_s=120) as c:
            for _ in range(6):
                got = c.cross_entropy(x, t, reduction="none")
    finally:
        done.set()
        sampler.join(10)
    torch.testing.assert_close(got, F.cross_entropy(x, t, reduction="none"))
    assert seen == [], f"the server mapped a client segment: {seen[:1]}"
    assert _maps_of_shm(pid) == [] and _rss_shmem_kib(pid) < 8 * 1024


def test_shared_memory_client_routes_inline_bytes_past_the_message_limit_like_the_plain_client():
    """Tensors under shm_min_bytes (and class weights) travel inline: with shared_memory=True they
    went as one Evaluate message whatever the server's --max-message-bytes, and a request the plain
    client sends through EvaluateChunked was refused RESOURCE_EXHAUSTED."""
    server = start_server("--allow-client-shm", "--max-message-bytes", "65536", "--memory-budget-bytes", str(1 << 30))
    try:
        g = torch.Generator().manual_seed(5)
        x, t = torch.randn(64, 1000, generator=g), torch.randint(0, 1000, (64,), generator=g)  # 256 KB: under shm_min_bytes
        w = torch.rand(10_000, generator=g)  # 40 KB of class weights: inline, and under the limit
        xw, tw = torch.randn(300, 10_000, generator=g), torch.randint(0, 10_000, (300,), generator=g)  # 12 MB: in shared memory
        for kwargs in ({}, {"shared_memory": True}):
            with LossClient(server.address, timeout_s=60, **kwargs) as client:
                torch.testing.assert_close(client.cross_entropy(x, t), F.cross_entropy(x, t))
                torch.testing.assert_close(client.cross_entropy(xw, tw, weight=w), F.cross_entropy(xw, tw, weight=w))
                tiny = torch.randn(3, 4, generator=g), torch.tensor([0, 1, 2])
                torch.testing.assert_close(client.cross_entropy(*tiny), F.cross_entropy(*tiny))
    finally:
        assert server.stop() == 0, server.log()
