"""Thin gRPC servicer: decode -> validate -> batcher -> encode. No loss maths here.

Validation errors become INVALID_ARGUMENT naming the field; a full queue RESOURCE_EXHAUSTED;
an expired deadline DEADLINE_EXCEEDED. Nothing a client sends can produce INTERNAL unless the
server itself is broken.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import torch
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc

from . import __version__, codec, engine
from .batcher import Batcher, BatcherClosed, DeadlineExpired, QueueFull
from .config import ServerConfig

log = logging.getLogger("lossd.service")

LOSS_NAMES = {
    pb.LOSS_KIND_UNSPECIFIED: engine.CROSS_ENTROPY,
    pb.CROSS_ENTROPY: engine.CROSS_ENTROPY,
    pb.NLL: engine.NLL,
    pb.BINARY_CROSS_ENTROPY_WITH_LOGITS: engine.BCE_WITH_LOGITS,
}
REDUCTION_NAMES = {pb.REDUCTION_UNSPECIFIED: "mean", pb.MEAN: "mean", pb.SUM: "sum", pb.NONE: "none"}
EXTRA_NAMES = {
    pb.TARGET_LOGPROB: "target_logprob",
    pb.ENTROPY: "entropy",
    pb.TARGET_RANK: "target_rank",
    pb.ARGMAX_CORRECT: "argmax_correct",
}
INPUT_DTYPES = [pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.FLOAT64]
TARGET_DTYPES = [pb.INT64, pb.UINT8, pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.FLOAT64]


class RequestError(Exception):
    """A request that must be answered with ``code``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class DecodedRequest:
    plan: engine.Plan
    input: torch.Tensor
    target: torch.Tensor


def decode_options(options: pb.LossOptions, shm_reader=None) -> tuple[engine.LossSpec, torch.Tensor | None, torch.Tensor | None]:
    """LossOptions -> (LossSpec, weight, pos_weight)."""
    if options.loss not in LOSS_NAMES:
        raise engine.InvalidInput("options.loss", f"unknown LossKind enum value {options.loss}")
    if options.reduction not in REDUCTION_NAMES:
        raise engine.InvalidInput("options.reduction", f"unknown Reduction enum value {options.reduction}")
    extras = []
    for value in options.extras:
        if value not in EXTRA_NAMES:
            raise engine.InvalidInput("options.extras", f"unknown Extra enum value {value}")
        if EXTRA_NAMES[value] not in extras:
            extras.append(EXTRA_NAMES[value])
    ls = float(options.label_smoothing)
    if math.isnan(ls) or math.isinf(ls):
        raise engine.InvalidInput("options.label_smoothing", f"must be a finite number in [0, 1], got {ls}")
    spec = engine.LossSpec(
        loss=LOSS_NAMES[options.loss],
        reduction=REDUCTION_NAMES[options.reduction],
        ignore_index=options.ignore_index if options.HasField("ignore_index") else -100,
        label_smoothing=ls,
        class_axis=options.class_axis if options.HasField("class_axis") else None,
        shift_targets=options.shift_targets,
        extras=tuple(extras),
        sequence_stats=options.sequence_stats,
    )
    weight = codec.decode("options.weight", options.weight, shm_reader) if options.HasField("weight") else None
    pos_weight = codec.decode("options.pos_weight", options.pos_weight, shm_reader) if options.HasField("pos_weight") else None
    return spec, weight, pos_weight


class MalformedMessage:
    """Stands in for a request whose bytes are not a valid protobuf message.

    grpc would otherwise answer UNKNOWN from inside its deserializer; with this the servicer
    answers INVALID_ARGUMENT like any other bad input.
    """

    id = ""

    def __init__(self, kind: str, error: Exception) -> None:
        self.kind = kind
        self.error = error

    def ByteSize(self) -> int:  # noqa: N802 - protobuf's name, used by the metrics interceptor
        return 0

    def reject(self) -> engine.InvalidInput:
        return engine.InvalidInput("request", f"not a valid {self.kind} message: {self.error}")


def _safe_deserializer(message_type):
    name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as exc:  # noqa: BLE001 - any decode failure is the client's bad input
            return MalformedMessage(name, exc)

    return deserialize


def well_formed(message):
    """Return the message, or raise InvalidInput if its bytes did not parse."""
    if isinstance(message, MalformedMessage):
        raise message.reject()
    return message


def add_to_server(servicer: LossServicer, server: grpc.aio.Server) -> None:
    """Register the servicer like the generated helper, with decode errors as INVALID_ARGUMENT."""
    handlers = {
        "Evaluate": grpc.unary_unary_rpc_method_handler(
            servicer.Evaluate, _safe_deserializer(pb.EvaluateRequest), pb.EvaluateResponse.SerializeToString
        ),
        "EvaluateStream": grpc.stream_stream_rpc_method_handler(
            servicer.EvaluateStream, _safe_deserializer(pb.EvaluateRequest), pb.EvaluateResponse.SerializeToString
        ),
        "EvaluatePacked": grpc.stream_stream_rpc_method_handler(
            servicer.EvaluatePacked, _safe_deserializer(pb.EvaluateBatch), pb.EvaluateBatchResults.SerializeToString
        ),
        "EvaluateChunked": grpc.stream_unary_rpc_method_handler(
            servicer.EvaluateChunked, _safe_deserializer(pb.EvaluateChunk), pb.EvaluateResponse.SerializeToString
        ),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo, _safe_deserializer(pb.GetServerInfoRequest), pb.ServerInfo.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("lossd.v1.LossService", handlers),))


def decode_request(request: pb.EvaluateRequest, shm_reader=None) -> DecodedRequest:
    """Decode and validate a unary request; raises engine.InvalidInput / codec.TensorError."""
    well_formed(request)
    if not request.HasField("input"):
        raise engine.InvalidInput("input", "is missing")
    if not request.HasField("target"):
        raise engine.InvalidInput("target", "is missing")
    spec, weight, pos_weight = decode_options(request.options, shm_reader)
    x = codec.decode("input", request.input, shm_reader)
    target = codec.decode("target", request.target, shm_reader)
    plan = engine.plan(spec, x.shape, x.dtype, target, weight, pos_weight)
    return DecodedRequest(plan, x, target)


def encode_result(request_id: str, result: engine.LossResult) -> pb.EvaluateResponse:
    response = pb.EvaluateResponse(id=request_id, loss_sum=result.loss_sum, weight_sum=result.weight_sum, counted=result.counted)
    codec.encode(result.loss, response.loss)
    for name, value in result.extras.items():
        codec.encode(value, response.extras[name])
    if result.sequences is not None:
        s = result.sequences
        response.sequences.nll_sum[:] = s.nll_sum
        response.sequences.tokens[:] = s.tokens
        response.sequences.mean_nll[:] = s.mean_nll
        response.sequences.perplexity[:] = s.perplexity
        response.sequences.is_greedy[:] = s.is_greedy
    return response


#: Responses are not limited by --max-message-bytes: a reduction='none' answer to a request
#: streamed with EvaluateChunked (BCE: as large as its input) still goes back as one message.
MAX_SEND_MESSAGE_BYTES = 2**31 - 1


def transport_receive_limit(max_message_bytes: int) -> int:
    """gRPC's own receive limit: above --max-message-bytes, so that a unary request over the
    configured limit (up to about twice it) reaches :func:`check_message_size` and is told about
    EvaluateChunked; beyond this, gRPC answers RESOURCE_EXHAUSTED with its own message."""
    return min(2**31 - 1, 2 * max_message_bytes + 1024 * 1024)


def check_message_size(request: pb.EvaluateRequest, decoded: DecodedRequest, max_message_bytes: int) -> None:
    """RESOURCE_EXHAUSTED for a unary request whose inline tensors exceed --max-message-bytes."""
    size = 0
    for msg, tensor in ((request.input, decoded.input), (request.target, decoded.target)):
        if not msg.HasField("shm"):
            size += tensor.numel() * tensor.element_size()
    if size > max_message_bytes:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request tensors take {size} bytes, over this server's max_message_bytes ({max_message_bytes}); "
            "send requests this large with the client-streaming EvaluateChunked RPC (a ChunkHeader, then row chunks "
            "of at most max_message_bytes each), which lossd_client does by itself",
        )


def classify(exc: BaseException) -> RequestError | None:
    """Map an exception to the status it must be answered with (None: a server bug)."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, (engine.InvalidInput, codec.TensorError)):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, QueueFull):
        return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, DeadlineExpired):
        return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline expired before compute")
    if isinstance(exc, BatcherClosed):
        return RequestError(grpc.StatusCode.UNAVAILABLE, str(exc))
    return None


class LossServicer(pb_grpc.LossServiceServicer):
    def __init__(self, config: ServerConfig, device: torch.device, batcher: Batcher, shm_reader=None) -> None:
        self.config = config
        self.device = device
        self.batcher = batcher
        self.shm_reader = shm_reader

    # ---------------------------------------------------------------- helpers
    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        if remaining is None:
            return None
        return time.monotonic() + remaining

    async def _evaluate_one(self, request: pb.EvaluateRequest, deadline: float | None) -> pb.EvaluateResponse:
        decoded = decode_request(request, self.shm_reader)
        check_message_size(request, decoded, self.config.max_message_bytes)
        result = await self.batcher.submit(decoded.plan, decoded.input, decoded.target, deadline=deadline)
        return encode_result(request.id, result)

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException, method: str):
        err = classify(exc)
        if err is None:
            log.exception("%s failed", method, exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        await context.abort(err.code, err.message)

    # ---------------------------------------------------------------- RPCs
    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        try:
            return await self._evaluate_one(request, self._deadline(context))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await self._fail(context, exc, "Evaluate")

    async def _answer(self, request: pb.EvaluateRequest, deadline: float | None) -> pb.EvaluateResponse:
        """One stream item: its response, or its failure as an ItemError (never raises)."""
        try:
            return await self._evaluate_one(request, deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported per item
            err = classify(exc)
            if err is None:
                log.exception("stream item failed", exc_info=exc)
                err = RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            return pb.EvaluateResponse(id=request.id, error=pb.ItemError(code=err.code.value[0], message=err.message))

    async def _answer_packed(self, batch: pb.EvaluateBatch, deadline: float | None) -> pb.EvaluateBatchResults:
        if isinstance(batch, MalformedMessage):
            err = batch.reject()
            failed = pb.EvaluateResponse(error=pb.ItemError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=str(err)))
            return pb.EvaluateBatchResults(responses=[failed])
        responses = await asyncio.gather(*(self._answer(r, deadline) for r in batch.requests))
        return pb.EvaluateBatchResults(responses=responses)

    async def _serve_stream(self, request_iterator: AsyncIterator, answer) -> AsyncIterator:
        """Answer every incoming message concurrently; yield each answer as soon as it is ready."""
        done: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()

        async def one(message) -> None:
            await done.put(await answer(message))

        async def reader() -> None:
            async for message in request_iterator:
                task = asyncio.ensure_future(one(message))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await done.put(None)

        reader_task = asyncio.ensure_future(reader())
        reading = True
        try:
            while True:
                item = await done.get()
                if item is None:
                    reading = False
                    if not pending and done.empty():
                        break
                    continue
                yield item
                if not reading and not pending and done.empty():
                    break
            await reader_task
        finally:
            reader_task.cancel()
            for task in list(pending):
                task.cancel()

    async def EvaluateStream(
        self, request_iterator: AsyncIterator[pb.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EvaluateResponse]:
        """Answers each item as soon as it is computed; items are matched by id."""
        deadline = self._deadline(context)
        async for response in self._serve_stream(request_iterator, lambda r: self._answer(r, deadline)):
            yield response

    async def EvaluatePacked(
        self, request_iterator: AsyncIterator[pb.EvaluateBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EvaluateBatchResults]:
        """EvaluateStream with several items per message; each message is answered as a whole."""
        deadline = self._deadline(context)
        async for results in self._serve_stream(request_iterator, lambda b: self._answer_packed(b, deadline)):
            yield results

    async def EvaluateChunked(
        self, request_iterator: AsyncIterator[pb.EvaluateChunk], context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        try:
            return await self._evaluate_chunked(request_iterator)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await self._fail(context, exc, "EvaluateChunked")

    async def _evaluate_chunked(self, request_iterator: AsyncIterator[pb.EvaluateChunk]) -> pb.EvaluateResponse:
        iterator = request_iterator.__aiter__()
        try:
            first = well_formed(await iterator.__anext__())
        except StopAsyncIteration:
            raise engine.InvalidInput("header", "EvaluateChunked received no messages") from None
        if not first.HasField("header"):
            raise engine.InvalidInput("header", "the first EvaluateChunk must carry the header")
        header = first.header
        spec, weight, pos_weight = decode_options(header.options, self.shm_reader)
        input_dtype = codec.dtype_of("header.input_dtype", header.input_dtype)
        input_shape = codec.shape_of("header.input_shape", header.input_shape)
        if not header.HasField("target"):
            raise engine.InvalidInput("header.target", "is missing")
        target_dtype, target_shape, target_nbytes = codec.expected_nbytes("header.target", header.target)
        streamed_target = len(header.target.data) == 0 and target_nbytes > 0 and tuple(target_shape) == tuple(input_shape)
        if streamed_target:
            target = torch.empty(target_shape, dtype=target_dtype, device="meta")
        else:
            target = codec.decode("header.target", header.target, self.shm_reader)
        plan = engine.plan(spec, input_shape, input_dtype, target, weight, pos_weight, target_streamed=streamed_target)
        in_unit_bytes = plan.unit_elements * codec.ITEMSIZE[header.input_dtype]
        tg_unit_bytes = plan.unit_elements * codec.ITEMSIZE[header.target.dtype] if streamed_target else 0
        unit_shape = _unit_shape(plan)
        next_unit = 0
        partials: list[engine.Partial] = []
        inflight: list[asyncio.Future] = []

        async def drain(limit: int) -> None:
            while len(inflight) > limit:
                partials.append(await inflight.pop(0))

        def consume(chunk: pb.EvaluateChunk) -> None:
            nonlocal next_unit
            # Each read of a bytes field copies it out of the message: read each once.
            rows, target_rows = chunk.input_rows, chunk.target_rows
            n_in = len(rows)
            if in_unit_bytes == 0:
                n_units = plan.units - next_unit if n_in == 0 else -1
            elif n_in % in_unit_bytes:
                raise engine.InvalidInput("input_rows", f"holds {n_in} bytes, not a whole number of rows of {in_unit_bytes} bytes")
            else:
                n_units = n_in // in_unit_bytes
            if n_units < 0 or next_unit + n_units > plan.units:
                raise engine.InvalidInput("input_rows", f"more rows than the header's input_shape {list(input_shape)} holds")
            if streamed_target and len(target_rows) != n_units * tg_unit_bytes:
                raise engine.InvalidInput(
                    "target_rows", f"expected {n_units * tg_unit_bytes} bytes for {n_units} rows, got {len(target_rows)}"
                )
            if not streamed_target and target_rows:
                raise engine.InvalidInput("target_rows", "class-index targets travel whole in the header")
            if n_units == 0:
                return
            x = codec.from_buffer("input_rows", rows, input_dtype, (n_units, *unit_shape))
            tu = codec.from_buffer("target_rows", target_rows, target_dtype, (n_units, *unit_shape)) if streamed_target else None
            start = next_unit
            next_unit += n_units
            inflight.append(
                asyncio.ensure_future(
                    self.batcher.run_in_engine(
                        lambda: plan.evaluate_units(
                            plan.unit_view(x),
                            start,
                            target_units=None if tu is None else plan.unit_view(tu),
                            device=self.device,
                            chunk_bytes=self.config.chunk_bytes,
                        )
                    )
                )
            )

        try:
            consume(first)
            async for chunk in iterator:
                if well_formed(chunk).HasField("header"):
                    raise engine.InvalidInput("header", "only the first EvaluateChunk may carry a header")
                consume(chunk)
                await drain(self.config.max_chunks_in_flight - 1)
            await drain(0)
        finally:
            for fut in inflight:
                fut.cancel()
        if next_unit != plan.units:
            raise engine.InvalidInput(
                "input_rows", f"received {next_unit} of {plan.units} rows of the header's input_shape {list(input_shape)}"
            )
        partial = engine.merge_partials(partials) if partials else plan._empty_partial(0)
        result = await self.batcher.run_in_engine(plan.finish, partial)
        return encode_result(header.id, result)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        cfg = self.config
        return pb.ServerInfo(
            version=__version__,
            torch_version=torch.__version__,
            device=str(self.device),
            device_name=device_name(self.device),
            max_receive_message_bytes=cfg.max_message_bytes,
            max_send_message_bytes=MAX_SEND_MESSAGE_BYTES,
            max_batch_rows=cfg.max_batch_rows,
            max_batch_bytes=cfg.max_batch_bytes,
            max_wait_ms=cfg.max_wait_ms,
            max_queue_requests=cfg.max_queue_requests,
            max_queue_bytes=cfg.max_queue_bytes,
            input_dtypes=INPUT_DTYPES,
            target_dtypes=TARGET_DTYPES,
            allow_client_shm=cfg.allow_client_shm,
        )


def _unit_shape(plan: engine.Plan) -> tuple[int, ...]:
    """Shape of one unit (one leading row) of the input, in its own layout."""
    shape = plan.input_shape
    if plan.kind == "bce":
        return tuple(shape[1:])
    return tuple(shape[plan.class_axis :]) if plan.class_axis > 0 else tuple(shape)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"
