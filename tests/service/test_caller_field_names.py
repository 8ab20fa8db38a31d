"""A mistake reads the same whichever call the client chose for it: the same bad request through
LossClient / AsyncLossClient, sent whole (Evaluate, Compare) and sent in chunks by the client
itself (EvaluateChunked, CompareChunked: ``chunked_above_bytes``), raises the same exception with
the same ``details``, naming the caller's field (``target``, not the chunk header's ``header.target``)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from lossd_client import AsyncLossClient, LossClient, LossRequest, compare, core
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
