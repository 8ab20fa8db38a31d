"""EvaluatePacked messages: each item answered on its own, the items of a message computed together.

A message's items are taken :data:`PACKED_SLICE_ITEMS` at a time: each item of a slice is decoded
and validated (its failure is its own ItemError), then the slice is submitted to the batcher as one
batch (:meth:`~.batcher.Batcher.submit_many`), so that a message of small requests shares one
engine pass, fused where the requests agree, even when nothing else is running. Every item
reserves its own answer; the message's reservation keeps the request bytes until every item is
answered, then holds the answers. An item whose answer may be larger than ``inline_bytes``
(--inline-batch-bytes) is encoded on a thread, and a message whose answers may be larger in all is
serialized on one (:mod:`.answers`: a million sequences' statistics held the event loop for seconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from lossd_client._proto.lossd.v1 import loss_pb2 as pb

from . import answers, batch_engine, convert, wire
from .answers import ANSWER_COPIES
from .batcher import Batcher
from .budget import MemoryBudget, Reservation
from .calls import Call
from .errors import OversizedId, status_of

#: EvaluatePacked items evaluated at once, over all packed messages of the process. Each item's
#: decode runs on the event loop when it starts; with every item of a message started together,
#: other calls (health checks included) waited behind all of them: a 50,000-item message kept a
#: health check waiting 9 s, 4 streams of 32 x 1024-item messages 0.7 s on average.
PACKED_ITEMS_AT_ONCE = 256
#: EvaluatePacked items decoded, then submitted together as one batch (fused where they agree).
PACKED_SLICE_ITEMS = 32

#: Decodes and validates one request, reserving what it needs in the reservation; returns the
#: request as a batch engine job and the bytes its answer holds once computed.
Prepare = Callable[[wire.WireRequest, Reservation], Awaitable[tuple[batch_engine.Job, int]]]


#: Copies of an item error alive at once: the response and gRPC's encoded message.
ERROR_COPIES = 2


def item_failed(request: wire.WireRequest, held: Reservation, exc: BaseException) -> pb.EvaluateResponse:
    """A stream item's failure as its ItemError, echoing the item's id (not one over max_id_bytes:
    it would hold what that limit bounds); ``held`` keeps what the error answer takes, at most what
    it held (the item's message bytes, its id among them)."""
    err = status_of(exc, "stream item")
    response = convert.error_response("" if isinstance(exc, OversizedId) else request.id, err.code.value[0], err.message)
    held.resize(min(held.nbytes, ERROR_COPIES * response.ByteSize()), "an item error")
    return response


def errors_nbytes(responses: list[pb.EvaluateResponse]) -> int:
    """What a packed message's item errors take while they wait to be sent (see item_failed)."""
    return ERROR_COPIES * sum(r.ByteSize() for r in responses if type(r) is not bytes and r.HasField("error"))


class PackedMessages:
    """Answers EvaluatePacked messages (see the module docstring); ``sole_call`` tells whether the
    stream is the only call in progress (the batcher then computes a slice at once)."""

    def __init__(self, budget: MemoryBudget, batcher: Batcher, prepare: Prepare, *, sole_call: Callable[[], bool]) -> None:
        self.budget = budget
        self.batcher = batcher
        self.prepare = prepare
        self.sole_call = sole_call
        self.inline_bytes = batcher.config.inline_batch_bytes  # answers larger are encoded on a thread
        self._turns = asyncio.Semaphore(PACKED_ITEMS_AT_ONCE // PACKED_SLICE_ITEMS)

    async def answer(self, call: Call, message: list[wire.WireRequest], held: Reservation) -> pb.EvaluateBatchResults | bytes:
        """One response per item, in order; ``held`` (the message's bytes) then holds the answers.
        When they may take more than ``inline_bytes`` (their size bounds), the answer is
        serialized on a thread: its bytes."""
        shares = [self.budget.empty() for _ in message]
        responses: list[pb.EvaluateResponse | bytes] = []
        try:
            for start in range(0, len(message), PACKED_SLICE_ITEMS):
                stop = start + PACKED_SLICE_ITEMS
                async with self._turns:
                    responses += await self._answer_slice(call, message[start:stop], shares[start:stop])
                # a slice may be decoded, computed and encoded without a pause (a sole caller's,
                # on the event loop): others (health checks) go between slices, not after the
                # message (1,024 items of 1 x 512 with every extra held the loop 0.28 s)
                await asyncio.sleep(0)
            held.resize(min(held.nbytes, errors_nbytes(responses)), "packed item errors")
            for share in shares:
                held.absorb(share)
        finally:
            for share in shares:
                share.release()
        if held.nbytes > ANSWER_COPIES * self.inline_bytes:
            return await held.run_in_thread(answers.joined, responses, 1, call.checkpoint)  # EvaluateBatchResults.responses = 1
        return pb.EvaluateBatchResults(responses=responses)

    async def _answer_slice(
        self, call: Call, requests: list[wire.WireRequest], shares: list[Reservation]
    ) -> list[pb.EvaluateResponse | bytes]:
        """Items decoded one by one, computed together: a response or an ItemError each, in order
        (never raises but for cancellation)."""
        responses: list[pb.EvaluateResponse | bytes | None] = [None] * len(requests)
        ready: list[tuple[int, int]] = []  # (item index, bytes its answer holds)
        jobs: list[batch_engine.Job] = []
        for i, (request, share) in enumerate(zip(requests, shares, strict=True)):
            try:
                job, answer_bytes = await self.prepare(request, share)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported per item
                responses[i] = item_failed(request, share, exc)
                continue
            ready.append((i, answer_bytes))
            jobs.append(job)
            del job
        outcomes = await self.batcher.submit_many(jobs, deadline=call.deadline, sole_call=self.sole_call(), caller=call.context.peer)
        jobs.clear()
        for (i, answer_bytes), outcome in zip(ready, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                responses[i] = item_failed(requests[i], shares[i], outcome)
            elif answer_bytes // ANSWER_COPIES > self.inline_bytes:
                responses[i] = await _encode_on_thread(call, requests[i], outcome, answer_bytes, shares[i], self.inline_bytes)
            else:
                responses[i] = convert.encode_result(requests[i].id, outcome)
                shares[i].resize(answer_bytes, "the answer")
        del outcomes
        return responses  # type: ignore[return-value]


async def _encode_on_thread(
    call: Call, request: wire.WireRequest, result: object, answer_bytes: int, share: Reservation, inline_bytes: int
) -> pb.EvaluateResponse | bytes:
    """A large item's answer, its wire bytes built on a thread (:func:`.answers.encode_answer`,
    stopped once the call is over); its ItemError should that fail."""
    try:
        response = await answers.encode_answer(
            convert.ANSWER, request.id, result, answer_bytes // ANSWER_COPIES, inline_bytes, share, call.checkpoint
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported per item
        return item_failed(request, share, exc)
    share.resize(answer_bytes, "the answer")
    return response
