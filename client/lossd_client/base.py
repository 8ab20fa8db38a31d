"""ClientBase: the options and the methods :class:`LossClient` and :class:`AsyncLossClient` share.

Every public method whose body is the same in both clients is written once here: it builds its
request with :mod:`lossd_client.core` and hands it to ``_run``, the one method each client
implements with its own I/O (a blocking call, or a coroutine to await). ``evaluate``,
``evaluate_many``, ``server_info`` and ``health`` talk to the channel and live in each client.

``connections=k`` opens k channels to the same target, each with its own subchannel pool (gRPC
otherwise shares one connection between channels with the same arguments), so that the k
connections can land on different worker processes of a ``--workers N`` server (its port spreads
connections, not calls). Calls take them in turn (:class:`~lossd_client.core.RoundRobin`).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from . import compare, core, layout
from ._proto.lossd.v1 import loss_pb2 as pb
from ._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from .channel import SERVICE, channel_options, credentials, normalise_target
from .errors import InvalidArgumentError
from .flight import SingleFlight, deadline_of
from .shm import SegmentPool
from .types import EvaluateResult, LoglikelihoodResult, LossRequest


class Connection:
    """One channel (one connection per resolved address) with the stubs the clients call."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.stub = pb_grpc.LossServiceStub(channel)
        # requests go out as bytes the core serialised (see core.encode); answers are parsed here
        self.evaluate = _raw_method(channel.unary_unary, "Evaluate", pb.EvaluateResponse)
        self.evaluate_chunked = _raw_method(channel.stream_unary, "EvaluateChunked", pb.EvaluateResponse)
        self.streams = {
            "EvaluateStream": _raw_method(channel.stream_stream, "EvaluateStream", pb.EvaluateResponse),
            "EvaluatePacked": _raw_method(channel.stream_stream, "EvaluatePacked", pb.EvaluateBatchResults),
        }


#: A health check's deadline when neither the call nor the client gives one.
HEALTH_TIMEOUT_S = 5.0

#: The longest ``timeout_s`` a call takes. gRPC holds a deadline (now + timeout) as int64
#: nanoseconds since 1970, which end in 2262: a timeout past that (1e10 s, inf) and nan, 0 or a
#: negative one failed every call at once with only "Deadline Exceeded". A billion seconds
#: (31 years) is far above any call and far below that end; for no deadline, pass None.
MAX_TIMEOUT_S = 1e9


def checked_timeout(timeout_s: float | None) -> float | None:
    """``timeout_s`` when it is None or a number of seconds in (0, MAX_TIMEOUT_S]; else InvalidArgumentError naming it."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real):
        raise InvalidArgumentError(f"timeout_s: must be a number of seconds or None (no deadline), not {type(timeout_s).__name__}")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:  # nan and inf included (nan compares false)
        huge = isinstance(timeout_s, int) and abs(timeout_s) > 10**300  # the repr of a 5000-digit int raises ValueError
        shown = "an integer past 10**300" if huge else repr(timeout_s)
        raise InvalidArgumentError(
            f"timeout_s: must be a finite number of seconds > 0 and <= {int(MAX_TIMEOUT_S)} (gRPC's deadlines; None: no deadline), got {shown}"
        )
    return timeout_s


#: What the loss methods return: the loss (LossClient) or an awaitable of it (AsyncLossClient).
LossT = TypeVar("LossT")
#: What ``perplexity`` returns: a PerplexityResult or an awaitable of one.
PerplexityT = TypeVar("PerplexityT")
#: What ``loglikelihood`` returns: a LoglikelihoodResult or an awaitable of one.
LoglikelihoodT = TypeVar("LoglikelihoodT")
#: What ``compare`` returns: a CompareResult or an awaitable of one.
CompareT = TypeVar("CompareT")


def _loss_of(result: EvaluateResult, request: LossRequest) -> Any:
    """A torch mirror's answer: the loss."""
    return result.loss


def _loglikelihood_of(result: EvaluateResult, request: LossRequest) -> LoglikelihoodResult:
    """loglikelihood's answer (its request adds nothing to it)."""
    return core.loglikelihood_result(result)


class ClientBase(Generic[LossT, PerplexityT, LoglikelihoodT, CompareT]):
    """Connection options and the torch.nn.functional mirror; subclasses add the I/O.

    :param target: one ``host:port``, a ``dns:///name:port`` target, or a list of addresses
        (client-side round robin over them).
    :param timeout_s: default deadline of every call in seconds (None: no deadline); each method
        takes its own ``timeout_s`` too. Either is a number > 0 and at most :data:`MAX_TIMEOUT_S`
        (gRPC's deadlines), else InvalidArgumentError naming ``timeout_s``.
    :param root_certificates: PEM bytes of the CAs to trust: use TLS.
    :param private_key: PEM bytes of the client's key (mTLS, with ``certificate_chain``).
    :param certificate_chain: PEM bytes of the client's certificate chain (mTLS).
    :param max_message_bytes: the channel's message limit both ways (-1: unlimited).
    :param retries: attempts per call on UNAVAILABLE or CANCELLED (2 to 5, with backoff).
    :param chunk_bytes: input bytes per EvaluateChunked message.
    :param chunks_in_flight: kept for compatibility; unused (gRPC's flow control bounds the
        chunks in flight).
    :param chunked_above_bytes: requests with more tensor bytes than this go through
        EvaluateChunked even when they fit in one message (bounds the server's memory per request).
    :param shared_memory: send tensors of at least ``shm_min_bytes`` through same-host shared
        memory (the server must run with ``--allow-client-shm``).
    :param shm_min_bytes: smallest tensor sent through shared memory.
    :param connections: channels to open to ``target``, each its own connection; calls,
        ``evaluate_many`` streams and the parts of a large request take them in turn. Use about
        as many as the server has worker processes (``--workers``): the server's port spreads
        connections over its workers, not calls.
    :param parallel_streams: a request that goes through EvaluateChunked is cut along its rows
        into up to this many parts, sent at once over different connections and joined exactly
        (default: ``connections``; 1 never cuts; see :mod:`lossd_client.split` for what is never cut).
    """

    #: ``grpc`` or ``grpc.aio``: the module the channel comes from.
    _grpc: Any

    def __init__(
        self,
        target: str | Sequence[str] = "127.0.0.1:50051",
        *,
        timeout_s: float | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        max_message_bytes: int = -1,
        retries: int = 5,
        chunk_bytes: int = core.DEFAULT_CHUNK_BYTES,
        chunks_in_flight: int = 8,
        chunked_above_bytes: int = layout.CHUNKED_ABOVE_BYTES,
        shared_memory: bool = False,
        shm_min_bytes: int = 1024 * 1024,
        connections: int = 1,
        parallel_streams: int | None = None,
    ) -> None:
        self.target = normalise_target(target)
        self.timeout_s = checked_timeout(timeout_s)
        self.chunk_bytes = chunk_bytes
        self.chunks_in_flight = chunks_in_flight
        self.chunked_above_bytes = chunked_above_bytes
        self.shared_memory = shared_memory
        self.shm_min_bytes = shm_min_bytes
        self._turns = core.RoundRobin(connections)
        self.parallel_streams = connections if parallel_streams is None else max(1, parallel_streams)
        self._segments = SegmentPool()
        self._flights = SingleFlight()  # the server's info: one lookup at a time, the latest kept
        tls = credentials(root_certificates, private_key, certificate_chain)
        options = channel_options(max_message_bytes, retries, own_connection=True)
        if tls is None:
            channels = [self._grpc.insecure_channel(self.target, options=options) for _ in range(connections)]
        else:
            channels = [self._grpc.secure_channel(self.target, tls, options=options) for _ in range(connections)]
        self._connections = [Connection(channel) for channel in channels]
        self._channel = channels[0]
        self._stub = self._connections[0].stub

    @property
    def connections(self) -> int:
        """How many channels (connections) this client opened."""
        return len(self._connections)

    @property
    def _server_max(self) -> int | None:
        """The server's message limit, once a lookup (or ``server_info()``) learnt it."""
        info = self._flights.last
        return None if info is None else info.max_receive_message_bytes

    # ------------------------------------------------------------------ torch.nn.functional mirror
    def cross_entropy(self, input: Any, target: Any, weight: Any = None, size_average: bool | None = None, ignore_index: int = -100,
                      reduce: bool | None = None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                      timeout_s: float | None = None) -> LossT:  # fmt: skip
        """torch.nn.functional.cross_entropy, evaluated by the server (awaitable on AsyncLossClient).

        The arguments are torch's, in torch's order (positional calls mean what they mean to torch).
        """
        options = {"weight": weight, "ignore_index": ignore_index, "reduction": reduction, "label_smoothing": label_smoothing}
        grad = core.grad_enabled()  # torch checks its weight under the grad mode of the call, not of its await
        build = functools.partial(
            core.loss_request, layout.CROSS_ENTROPY, input, target, size_average=size_average, reduce=reduce, grad_enabled=grad, **options
        )
        return self._run(build, timeout_s, _loss_of)

    def nll_loss(self, input: Any, target: Any, weight: Any = None, size_average: bool | None = None, ignore_index: int = -100,
                 reduce: bool | None = None, reduction: str = "mean", *, timeout_s: float | None = None) -> LossT:  # fmt: skip
        """torch.nn.functional.nll_loss, evaluated by the server (awaitable on AsyncLossClient); torch's arguments in torch's order."""
        options = {"weight": weight, "ignore_index": ignore_index, "reduction": reduction}
        grad = core.grad_enabled()
        build = functools.partial(
            core.loss_request, layout.NLL_LOSS, input, target, size_average=size_average, reduce=reduce, grad_enabled=grad, **options
        )
        return self._run(build, timeout_s, _loss_of)

    def binary_cross_entropy_with_logits(self, input: Any, target: Any, weight: Any = None, size_average: bool | None = None,
                                         reduce: bool | None = None, reduction: str = "mean", pos_weight: Any = None, *,
                                         timeout_s: float | None = None) -> LossT:  # fmt: skip
        """torch.nn.functional.binary_cross_entropy_with_logits, evaluated by the server (awaitable on
        AsyncLossClient); torch's arguments in torch's order."""
        options = {"weight": weight, "reduction": reduction, "pos_weight": pos_weight}
        grad = core.grad_enabled()
        build = functools.partial(
            core.loss_request, layout.BCE_WITH_LOGITS, input, target, size_average=size_average, reduce=reduce, grad_enabled=grad, **options
        )
        return self._run(build, timeout_s, _loss_of)

    def kl_div(self, input: Any, target: Any, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean",
               log_target: bool = False, *, timeout_s: float | None = None) -> LossT:  # fmt: skip
        """torch.nn.functional.kl_div, evaluated by the server (awaitable on AsyncLossClient).

        ``evaluate`` with ``loss="kl_div"`` also returns the float64 totals: ``loss_sum`` and
        ``weight_sum``, the denominator of the reduction (elements for 'mean', ``input.size(0)``
        for 'batchmean', 1 for 'sum'), so ``combine`` gives the exact result over many requests.
        """
        options = {"reduction": reduction, "log_target": log_target, "size_average": size_average, "reduce": reduce}
        return self._run(functools.partial(LossRequest, input, target, layout.KL_DIV, **options), timeout_s, _loss_of)

    # ------------------------------------------------------------------ language models
    def perplexity(
        self, logits: Any, tokens: Any, *, shift: bool = True, ignore_index: int = -100, timeout_s: float | None = None
    ) -> PerplexityT:
        """(B, T, V) logits and (B, T) token ids -> per-token NLL, per-sequence and corpus perplexity."""
        build = functools.partial(core.perplexity_request, logits, tokens, shift=shift, ignore_index=ignore_index)
        return self._run(build, timeout_s, core.perplexity_result, core.LM_FIELDS)

    def loglikelihood(self, logits: Any, tokens: Any, continuation_start: Any, *, timeout_s: float | None = None) -> LoglikelihoodT:
        """lm-evaluation-harness loglikelihood: per sequence (sum of continuation log-probs, is_greedy)."""
        build = functools.partial(core.loglikelihood_request, logits, tokens, continuation_start)
        return self._run(build, timeout_s, _loglikelihood_of, core.LM_FIELDS)

    # ------------------------------------------------------------------ comparing two models
    def compare(self, reference: Any, candidate: Any, tokens: Any = None, *, ignore_index: int = -100, shift_targets: bool = False,
                top_k: int = 0, timeout_s: float | None = None, progress: Callable[[int], None] | None = None) -> CompareT:  # fmt: skip
        """Compare two models' ``(..., V)`` logits (class axis last, same shape) token by token.

        Returns a :class:`~lossd_client.compare.CompareResult` (awaitable on AsyncLossClient): dense
        arrays shaped like ``tokens`` (KL(reference || candidate), argmax agreement, the counted
        positions and, with ``tokens``, each model's probability and NLL of the token and
        ``delta_p = p_cand - p_ref``), float64 ``totals`` and the ``summary`` of
        ``llama-perplexity --kl-divergence`` (:func:`lossd_client.compare_stats.summarize`: means
        with standard errors by the usual formulas, percentiles of the dense values). ``tokens``
        equal to ``ignore_index`` do not count; ``shift_targets`` scores position t against token
        t+1; ``top_k`` adds each model's top classes and log-probabilities per position (at most the
        server's ``max_top_k``). Large logits stream through CompareChunked by themselves;
        ``progress`` is called with the bytes of each message as it is sent.
        """
        inputs = compare.CompareInputs(reference, candidate, tokens, ignore_index, shift_targets, top_k)
        return self._compare(inputs, deadline_of(self._timeout(timeout_s)), progress)

    def _compare(self, inputs: compare.CompareInputs, deadline: float | None, progress: Callable[[int], None] | None) -> Any:
        """The comparison's I/O within ``deadline`` (one for the lookup and the call): blocking in
        LossClient, a coroutine in AsyncLossClient."""
        raise NotImplementedError

    def _compare_call(self, inputs: compare.CompareInputs, progress: Callable[[int], None] | None) -> tuple[compare.Call, Any]:
        """(what to send, the RPC to send it with): Compare, or CompareChunked above the message limit."""
        call = compare.route(
            inputs,
            server_max=self._server_max,
            chunk_bytes=self.chunk_bytes,
            chunked_above_bytes=self.chunked_above_bytes,
            progress=progress,
        )
        if not call.chunked:
            return call, self._stub.Compare
        return call, self._channel.stream_unary(
            f"/{SERVICE}/CompareChunked", request_serializer=None, response_deserializer=pb.CompareResponse.FromString
        )

    # ------------------------------------------------------------------ what the subclasses use
    def _run(
        self,
        build: Callable[[], LossRequest],
        timeout_s: float | None,
        finish: Callable[[EvaluateResult, LossRequest], Any],
        fields: Mapping[str, str] | None = None,
    ) -> Any:
        """``finish(evaluate(request), request)`` of ``request = build()``: blocking in LossClient, a
        coroutine in AsyncLossClient; its errors name the request's fields by the caller's names
        ``fields`` (:func:`lossd_client.errors.caller_fields`)."""
        raise NotImplementedError

    def _timeout(self, timeout_s: float | None) -> float | None:
        """A call's deadline in seconds: its own ``timeout_s`` (checked: :func:`checked_timeout`), else the client's."""
        return self.timeout_s if timeout_s is None else checked_timeout(timeout_s)

    def _health_timeout(self, timeout_s: float | None) -> float:
        """A health check's deadline: ``timeout_s``, else the client's, else HEALTH_TIMEOUT_S."""
        timeout = self._timeout(timeout_s)
        return HEALTH_TIMEOUT_S if timeout is None else timeout

    def _needs_limit(self, req: LossRequest) -> bool:
        return core.needs_server_limit(req, shared_memory=self.shared_memory, server_max=self._server_max, shm_min_bytes=self.shm_min_bytes)

    def _route(self, req: LossRequest) -> core.Call:
        return core.route(
            req,
            server_max=self._server_max,
            chunk_bytes=self.chunk_bytes,
            chunked_above_bytes=self.chunked_above_bytes,
            segments=self._segments if self.shared_memory else None,
            shm_min_bytes=self.shm_min_bytes,
            parallel_streams=self.parallel_streams,
        )

    def _take(self, k: int) -> list[Connection]:
        """The connections of the next ``k`` calls, in turn."""
        return [self._connections[i] for i in self._turns.take(k)]

    def _stream(self, window: int, pack: int | None, return_exceptions: bool) -> tuple[core.Stream, list[Connection]]:
        """An ``evaluate_many``'s bookkeeping and the connections of its streams."""
        streams = core.stream_count(window, pack, len(self._connections))
        return core.Stream(window, pack, return_exceptions, streams), self._take(streams)

    def _health_check(self, service: str) -> tuple[Callable[..., Any], Any]:
        """(the Health service's Check method on this channel, the request for ``service``)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        return health_pb2_grpc.HealthStub(self._channel).Check, health_pb2.HealthCheckRequest(service=service)


def _raw_method(kind: Callable[..., Any], method: str, response: Any) -> Any:
    """A LossService method that sends pre-serialised request bytes."""
    return kind(f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=response.FromString)
