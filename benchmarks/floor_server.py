"""The transport floor: a bare ``grpc.aio`` server that only receives the request bytes.

Every lossd method is answered with a few bytes (an empty response), nothing is parsed,
nothing is computed: whatever lossd spends above this server's CPU per call is lossd's own.
EvaluateChunked and CompareChunked are client-streaming sinks that read every message. Same receive limits and
transport options as lossd.

Run: ``python -m benchmarks.floor_server --port 0`` (prints ``listening on 127.0.0.1:<port>``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

SERVICE = "lossd.v1.LossService"
ANSWER = b""  # an empty EvaluateResponse


async def unary(request: bytes, context) -> bytes:
    return ANSWER


async def sink(request_iterator, context) -> bytes:
    async for _ in request_iterator:
        pass
    return ANSWER


async def echo_stream(request_iterator, context):
    async for _ in request_iterator:
        yield ANSWER


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.so_reuseport", 0),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 1 << 20),
        ]
    )
    handlers = {
        "Evaluate": grpc.unary_unary_rpc_method_handler(unary),
        "EvaluateChunked": grpc.stream_unary_rpc_method_handler(sink),
        "EvaluateStream": grpc.stream_stream_rpc_method_handler(echo_stream),
        "EvaluatePacked": grpc.stream_stream_rpc_method_handler(echo_stream),
        "Compare": grpc.unary_unary_rpc_method_handler(unary),
        "CompareChunked": grpc.stream_unary_rpc_method_handler(sink),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"floor server listening on {host}:{bound}: SERVING", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
