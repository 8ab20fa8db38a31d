"""The wire contract: generated code in sync with the .proto, reflection, health, server info."""

from __future__ import annotations

import filecmp
import pathlib
import re
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

REPO = pathlib.Path(__file__).resolve().parents[2]
COMMITTED = REPO / "client" / "lossd_client" / "_proto"


def test_generated_code_matches_proto(tmp_path):
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    committed = sorted(p.relative_to(COMMITTED) for p in COMMITTED.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert generated == committed, "run `make proto` and commit the result"
    for rel in generated:
        assert filecmp.cmp(tmp_path / rel, COMMITTED / rel, shallow=False), f"{rel} drifted from proto/: run `make proto`"


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"lossd.v1.LossService", "grpc.health.v1.Health"} <= names


def test_health_is_serving_for_overall_and_named_service(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "lossd.v1.LossService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_answers_every_kind_of_request_and_lists_the_files(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="lossd.v1.LossService"),
            reflection_pb2.ServerReflectionRequest(file_by_filename="lossd/v1/loss.proto"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
        ]
        found, by_name, missing = stub.ServerReflectionInfo(iter(requests), timeout=10)
    assert found.file_descriptor_response.file_descriptor_proto and by_name.file_descriptor_response.file_descriptor_proto
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.original_request.file_containing_symbol == "no.such.Symbol"


def _raw_call(channel, method: str, data: bytes, kind: str):
    if kind == "unary":
        return channel.unary_unary(method, request_serializer=None, response_deserializer=None)(data, timeout=10)
    if kind == "server-stream":
        return list(channel.unary_stream(method, request_serializer=None, response_deserializer=None)(data, timeout=10))
    return list(channel.stream_stream(method, request_serializer=None, response_deserializer=None)(iter([data]), timeout=10))


HEALTH_AND_REFLECTION = [
    ("/grpc.health.v1.Health/Check", "unary", "HealthCheckRequest", 4096),
    ("/grpc.health.v1.Health/Watch", "server-stream", "HealthCheckRequest", 4096),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi", "ServerReflectionRequest", 65536),
]


@pytest.mark.parametrize("method, kind, what, limit", HEALTH_AND_REFLECTION)
def test_health_and_reflection_refuse_long_or_unparsable_requests_invalid_argument(server, method, kind, what, limit):
    """grpc's health and reflection servicers parsed requests of any size (a 60 MB service name
    took health Watch's server 900 MiB over idle, outside its memory budget; reflection echoed
    the name in its answer) and answered bytes that do not parse UNKNOWN."""
    name = "a" * 20_000_000 + "\U0001f600"
    if what == "HealthCheckRequest":
        long_request = health_pb2.HealthCheckRequest(service=name).SerializeToString()
    else:
        long_request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=name).SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        for data, phrase in (
            (long_request, f"request: a {what} of {len(long_request)} bytes, more than the {limit} this server reads"),
            (b"\xff\xff\xff", f"request: not a valid {what} message"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                _raw_call(channel, method, data, kind)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert info.value.details().startswith(phrase), info.value.details()
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="lossd.v1.LossService"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_server_info(client, server):
    import asyncio
    import dataclasses

    import torch
    from lossd_client import AsyncLossClient, ServerInfo
    from lossd_client._proto.lossd.v1 import loss_pb2 as pb

    info = client.server_info()
    assert isinstance(info, ServerInfo)
    assert info.torch_version == torch.__version__
    assert info.device == "cpu"
    assert info.max_receive_message_bytes > 0 and info.max_send_message_bytes > 0
    assert info.max_batch_rows > 0 and info.max_queue_requests > 0
    assert set(info.input_dtypes) >= {"float32", "float16", "bfloat16", "float64"}
    assert "int64" in info.target_dtypes and isinstance(info.allow_client_shm, bool)
    assert info.device_name == _cpu_model() and info.device_name != "x86_64"
    # field for field as the proto's
    assert [f.name for f in dataclasses.fields(ServerInfo)] == [f.name for f in sorted(pb.ServerInfo.DESCRIPTOR.fields, key=lambda f: f.number)]

    async def from_async():
        async with AsyncLossClient(server.address, timeout_s=30) as c:
            return await c.server_info()

    assert asyncio.run(from_async()) == info


def _cpu_model() -> str:
    """What lscpu calls "Model name", read from /proc/cpuinfo here (x86 and most ARM kernels have it)."""
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    import platform

    return platform.processor() or platform.machine()


def test_device_name_is_the_cpu_model_or_the_machine(tmp_path):
    import platform

    import torch
    from lossd_server.service import device_name

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n\n")
    assert device_name(torch.device("cpu"), str(cpuinfo)) == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # some ARM kernels: no model name
    assert device_name(torch.device("cpu"), str(cpuinfo)) == (platform.processor() or platform.machine() or "cpu")
    assert device_name(torch.device("cpu"), str(tmp_path / "missing")) == (platform.processor() or platform.machine() or "cpu")


def test_readme_client_example_prints_torch_value(server):
    readme = (REPO / "README.md").read_text()
    code = re.search(r"## Client in ten lines\n\n```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace('"127.0.0.1:50051"', repr(server.address))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120).stdout
    assert out.splitlines()[0] == "tensor(0.4076) tensor(0.4076)"
