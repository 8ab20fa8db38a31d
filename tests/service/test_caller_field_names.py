"""A mistake reads the same whichever call the client chose for it: the same bad request through
LossClient / AsyncLossClient, sent whole (Evaluate, Compare) and sent in chunks by the client
itself (EvaluateChunked, CompareChunked: ``chunked_above_bytes``), raises the same exception with
the same ``details``, naming the caller's field (``target``, not the chunk header's ``header.target``).
The LM helpers and compare name their arguments (``tokens``, ``logits``), not the request fields
they travel as (``target``, ``input``), on both routes and in both clients."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from lossd_client import AsyncLossClient, LossClient, LossRequest, compare, core
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from lossd_client.errors import InvalidArgumentError, LossdError

CHUNKED = {"chunked_above_bytes": 64, "chunk_bytes": 256}  # past 512 bytes (SMALL_REQUEST_BYTES), chunks of a few rows

rng = np.random.default_rng(7)
X = rng.standard_normal((64, 5), dtype=np.float32)  # 1280 bytes
T = rng.integers(0, 5, 64)
OUT_OF_RANGE = T.copy()
OUT_OF_RANGE[9] = 5
REF = rng.standard_normal((2, 30, 11), dtype=np.float32)  # 2640 bytes a model
TOKENS = rng.integers(0, 11, (2, 30))

# (what, "evaluate" with a LossRequest or "compare" with its arguments, the field the error names)
CASES: list[tuple[str, str, Any, str]] = [
    ("target shape mismatch", "evaluate", LossRequest(X, T[:63]), "target"),
    ("target out of range", "evaluate", LossRequest(X, OUT_OF_RANGE), "target"),
    ("class weight shape", "evaluate", LossRequest(X, T, weight=np.ones(4, np.float32)), "options.weight"),
    ("label_smoothing over 1", "evaluate", LossRequest(X, T, label_smoothing=1.5), "options.label_smoothing"),
    ("integer input", "evaluate", LossRequest(X.astype(np.int32), T), "input"),
    ("compare vocabularies", "compare", ((REF, rng.standard_normal((2, 30, 12), dtype=np.float32), TOKENS), {}), "candidate"),
    ("compare top_k over the limit", "compare", ((REF, REF, TOKENS), {"top_k": 21}), "options.top_k"),
]
IDS = [c[0] for c in CASES]


def _call(client: Any, method: str, args: Any) -> Any:
    if method == "evaluate":
        return client.evaluate(args)
    positional, keywords = args
    return client.compare(*positional, **keywords)


def _goes_chunked(method: str, args: Any, server_max: int, **options: Any) -> bool:
    """Whether a client with ``options`` sends the request in chunks (the test compares two routes)."""
    if method == "evaluate":
        return core.route(args, server_max=server_max, **options).chunked
    (reference, candidate, tokens), keywords = args
    inputs = compare.CompareInputs(reference, candidate, tokens, top_k=keywords.get("top_k", 0))
    return compare.route(compare.with_token_ids(inputs), server_max=server_max, **options).chunked


def _sync_error(address: str, method: str, args: Any, **options: Any) -> LossdError:
    with LossClient(address, timeout_s=60, **options) as client, pytest.raises(LossdError) as info:
        _call(client, method, args)
    return info.value


def _async_error(address: str, method: str, args: Any, **options: Any) -> LossdError:
    async def main() -> LossdError:
        async with AsyncLossClient(address, timeout_s=60, **options) as client:
            with pytest.raises(LossdError) as info:
                await _call(client, method, args)
            return info.value

    return asyncio.run(main())


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(("what", "method", "args", "field"), CASES, ids=IDS)
def test_unary_and_chunked_calls_raise_the_same_error(server, client, kind, what, method, args, field):
    server_max = client.server_info().max_receive_message_bytes
    assert not _goes_chunked(method, args, server_max) and _goes_chunked(method, args, server_max, **CHUNKED), what
    error = _sync_error if kind == "sync" else _async_error
    unary, chunked = error(server.address, method, args), error(server.address, method, args, **CHUNKED)
    assert type(unary) is type(chunked) is InvalidArgumentError, (unary, chunked)
    assert unary.details.startswith(field + ": "), unary.details
    assert chunked.details == unary.details, (chunked.details, unary.details)


# The helpers whose arguments travel under other field names: perplexity(logits, tokens) and
# loglikelihood(logits, tokens, start) send them as ``input`` and ``target``, compare(reference,
# candidate, tokens) its tokens as ``target``. Their errors name the caller's arguments whoever found
# the mistake, the rest of the server's message as it is.
LOGITS = rng.standard_normal((2, 30, 11), dtype=np.float32)  # 2640 bytes
TOKENS_OUT_OF_RANGE = TOKENS.copy()
TOKENS_OUT_OF_RANGE[1, 17] = 11

# (what, helper, its arguments, the argument the error names, the request field the server names)
HELPER_CASES: list[tuple[str, str, tuple[Any, ...], str, str]] = [
    ("perplexity tokens out of range", "perplexity", (LOGITS, TOKENS_OUT_OF_RANGE), "tokens", "target"),
    ("perplexity tokens shape", "perplexity", (LOGITS, TOKENS[:, :20]), "tokens", "target"),
    ("perplexity integer logits", "perplexity", (LOGITS.astype(np.int32), TOKENS), "logits", "input"),
    ("loglikelihood tokens out of range", "loglikelihood", (LOGITS, TOKENS_OUT_OF_RANGE, 5), "tokens", "target"),
    ("loglikelihood tokens shape", "loglikelihood", (LOGITS, TOKENS[:, :20], 5), "tokens", "target"),
    ("loglikelihood integer logits", "loglikelihood", (LOGITS.astype(np.int32), TOKENS, 5), "logits", "input"),
    ("compare tokens out of range", "compare", (REF, REF, TOKENS_OUT_OF_RANGE), "tokens", "target"),
    ("compare tokens shape", "compare", (REF, REF, TOKENS[:, :20]), "tokens", "target"),
    ("compare float tokens", "compare", (REF, REF, TOKENS.astype(np.float32)), "tokens", "target"),
    ("compare integer candidate", "compare", (REF, REF.astype(np.int32), TOKENS), "candidate", "candidate"),
]
HELPER_IDS = [c[0] for c in HELPER_CASES]


def _helper_request(helper: str, args: tuple[Any, ...]) -> Any:
    """The request the helper sends (a LossRequest, or compare's CompareInputs)."""
    if helper == "compare":
        return compare.CompareInputs(*args)
    build = core.perplexity_request if helper == "perplexity" else core.loglikelihood_request
    return build(*args, shift=True, ignore_index=-100) if helper == "perplexity" else build(*args)


def _servers_details(address: str, helper: str, args: tuple[Any, ...]) -> str:
    """What the server says of the helper's request sent whole: its message names the request's field."""
    if helper != "compare":
        return _sync_error(address, "evaluate", _helper_request(helper, args)).details
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.LossServiceStub(channel).Compare(compare.request(_helper_request(helper, args)), timeout=60)
    return info.value.details()


def _helper_error(kind: str, address: str, helper: str, args: tuple[Any, ...], **options: Any) -> LossdError:
    if kind == "sync":
        with LossClient(address, timeout_s=60, **options) as client, pytest.raises(LossdError) as info:
            getattr(client, helper)(*args)
        return info.value

    async def main() -> LossdError:
        async with AsyncLossClient(address, timeout_s=60, **options) as client:
            with pytest.raises(LossdError) as info:
                await getattr(client, helper)(*args)
            return info.value

    return asyncio.run(main())


@pytest.mark.parametrize("route", ["unary", "chunked"])
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(("what", "helper", "args", "argument", "field"), HELPER_CASES, ids=HELPER_IDS)
def test_lm_helpers_and_compare_name_the_callers_arguments(server, client, route, kind, what, helper, args, argument, field):
    server_max = client.server_info().max_receive_message_bytes
    options = CHUNKED if route == "chunked" else {}
    request = _helper_request(helper, args)
    if helper == "compare":
        chunked = compare.route(compare.with_token_ids(request), server_max=server_max, **options).chunked
    else:
        chunked = core.route(request, server_max=server_max, **options).chunked
    assert chunked == (route == "chunked"), what
    servers = _servers_details(server.address, helper, args)
    assert servers.startswith(field + ": "), servers
    error = _helper_error(kind, server.address, helper, args, **options)
    assert type(error) is InvalidArgumentError, error
    assert error.details == argument + servers.removeprefix(field), (error.details, servers)
    assert str(error) == error.details
