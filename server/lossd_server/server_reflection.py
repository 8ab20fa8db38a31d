"""gRPC server reflection (grpc_reflection's servicer) behind a bounded request reader.

Registered by ``enable_server_reflection``, its requests were parsed by protobuf whatever their
size and each answer echoes its request: a 60 MB symbol name held 800 MiB of the server's memory,
outside its budget, and bytes that do not parse were answered UNKNOWN. Here a request over
MAX_REFLECTION_REQUEST_BYTES, or one that does not parse, ends the stream INVALID_ARGUMENT (see
:func:`.unary_reads.bounded`); every other request is the servicer's as before. Requests are read
as lossd's own calls read theirs (:meth:`.calls.Call.read`): within the memory budget (gRPC's
transport takes a whole message of up to its receive limit before it can be refused), and a stream
whose client sends nothing for ``--stream-idle-timeout-s`` is ended DEADLINE_EXCEEDED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from .calls import Reads
from .unary_reads import NoRequest, bounded, read_message

#: Largest reflection request this server parses: a host and one symbol or file name.
MAX_REFLECTION_REQUEST_BYTES = 64 * 1024


def handlers(service_names: Iterable[str], reads: Reads) -> grpc.GenericRpcHandler:
    """grpc.reflection.v1alpha.ServerReflection for ``service_names`` (and itself), its requests
    read as ``reads`` says (the server's own calls' way)."""
    servicer = reflection.aio.ReflectionServicer(tuple(service_names))

    async def info(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = reads.call(context)

        async def readable() -> AsyncIterator[Any]:
            while True:
                try:
                    request = await read_message(call, "ServerReflectionRequest")
                except NoRequest as refused:
                    refused.answer(context)
                    return
                if request is None:
                    return
                yield request

        async for response in servicer.ServerReflectionInfo(readable(), context):
            yield response

    method = grpc.stream_stream_rpc_method_handler(
        info,
        bounded(reflection_pb2.ServerReflectionRequest.FromString, "ServerReflectionRequest", MAX_REFLECTION_REQUEST_BYTES),
        reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(reflection.SERVICE_NAME, {"ServerReflectionInfo": method})
