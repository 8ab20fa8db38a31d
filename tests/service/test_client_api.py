"""The client's calling conventions, sync and async twins alike: keywords beside a request, the
caller's ids through evaluate_many, what a closed client and a passed deadline raise."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import AsyncLossClient, LossClient, LossRequest
from lossd_client import errors as lossd_errors
from lossd_client.errors import InvalidArgumentError


def _both(server, use):
    """``use(client)`` with a LossClient and (awaited) with an AsyncLossClient."""
    with LossClient(server.address, timeout_s=60) as client:
        sync = use(client)
        if hasattr(sync, "__next__"):
            sync = list(sync)

    async def main():
        async with AsyncLossClient(server.address, timeout_s=60) as client:
            got = use(client)
            if hasattr(got, "__aiter__"):
                return [r async for r in got]
            return await got

    return sync, asyncio.run(asyncio.wait_for(main(), 60))


def test_keywords_beside_a_request_replace_its_fields(server):
    """They were dropped without a word: the plain mean came back, no extras."""
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    req = LossRequest(x, y)
    for got in _both(server, lambda c: c.evaluate(req, reduction="none", label_smoothing=0.5, extras=("entropy",))):
        assert torch.equal(got.loss, F.cross_entropy(x, y, reduction="none", label_smoothing=0.5))
        assert list(got.extras) == ["entropy"]
    assert req.reduction == "mean" and req.extras == ()  # the caller's request is left as it was


def test_a_keyword_that_is_no_field_is_a_type_error(server):
    req = LossRequest(torch.randn(4, 5), torch.tensor([0, 1, 4, 2]))
    with LossClient(server.address) as client, pytest.raises(TypeError, match="reduktion"):
        client.evaluate(req, reduktion="sum")


def test_evaluate_many_answers_with_the_callers_ids(server):
    """The wire numbers the items; the results came back with those numbers instead of the ids."""
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    items = [LossRequest(x, y, id="doc-17"), {"input": x, "target": y, "id": "doc-18"}, (x, y), LossRequest(x, y, id="0")]
    for results in _both(server, lambda c: c.evaluate_many(items, window=2)):
        assert [r.id for r in results] == ["doc-17", "doc-18", "", "0"]


def test_closing_an_async_client_fails_its_calls_in_progress_with_cancelled_error(server):
    """grpc.aio raised asyncio.CancelledError in the calling task, as if the task had been
    cancelled (a BaseException: ``except Exception`` missed it); the blocking client raises
    lossd_client's CancelledError, and so does the async one now. A task that is itself
    cancelled still gets asyncio's."""
    big_x, big_y = torch.randn(2048, 2000), torch.randint(0, 2000, (2048,))

    async def main():
        client = AsyncLossClient(server.address, timeout_s=60)
        await client.server_info()

        async def unary():
            for _ in range(500):
                await client.cross_entropy(big_x, big_y, reduction="none")

        async def many():
            async def source():
                for _ in range(100_000):
                    await asyncio.sleep(0.002)
                    yield (big_x[:4], big_y[:4])

            async for _ in client.evaluate_many(source(), window=4):
                pass

        tasks = [asyncio.ensure_future(unary()), asyncio.ensure_future(many())]
        cancelled_task = asyncio.ensure_future(unary())
        await asyncio.sleep(0.5)
        cancelled_task.cancel()
        await client.close()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(asyncio.CancelledError):
            await cancelled_task
        return outcomes

    for outcome in asyncio.run(asyncio.wait_for(main(), 60)):
        assert isinstance(outcome, lossd_errors.CancelledError), repr(outcome)
        assert outcome.details == "Channel closed!"


def test_async_evaluate_many_past_its_deadline_is_deadline_exceeded(server):
    """A blocking source given to the async client blocks its event loop; the stream, written to
    after its deadline, ended INTERNAL "Internal error from Core" (InternalError: a server failure,
    which it was not). The blocking client raises DeadlineExceededError; the async one now too."""
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 4, 2])

    def slow():
        for _ in range(4):
            time.sleep(0.5)
            yield (x, y)

    async def main():
        async with AsyncLossClient(server.address) as client:
            return [r async for r in client.evaluate_many(slow(), timeout_s=0.8)]

    for _ in range(3):  # the INTERNAL came in about 3 runs of 4
        with pytest.raises(lossd_errors.DeadlineExceededError):
            asyncio.run(asyncio.wait_for(main(), 60))


def test_one_extra_may_be_named_alone(server):
    """A lone name was taken letter by letter ("unknown extra 'e'")."""
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    with LossClient(server.address) as client:
        alone = client.evaluate(LossRequest(x, y, reduction="none", extras="entropy"))
        listed = client.evaluate(LossRequest(x, y, reduction="none", extras=("entropy",)))
    assert list(alone.extras) == ["entropy"] and torch.equal(alone.extras["entropy"], listed.extras["entropy"])


def test_unscored_positions_of_token_nll_are_zero_not_negative_zero(server):
    logits, tokens = torch.randn(2, 6, 9), torch.randint(0, 9, (2, 6))
    tokens[0, 3] = -100
    for got in _both(server, lambda c: c.perplexity(logits, tokens)):
        want = F.cross_entropy(logits[:, :-1].reshape(-1, 9), tokens[:, 1:].reshape(-1), reduction="none").reshape(2, 5)
        assert torch.equal(torch.signbit(got.token_nll[:, :-1]), torch.signbit(want))  # torch's ignored losses are +0.0
        assert not torch.signbit(got.token_nll[:, -1]).any()


def test_a_health_timeout_of_zero_is_refused_not_five_seconds():
    """health(timeout_s=0) waited 5 s ('or 5.0'), then 0 s, which fails at once: now it is refused
    (see the timeout_s test below); the default applies only when neither the call nor the client
    gives a timeout."""
    with LossClient("127.0.0.1:1") as plain, LossClient("127.0.0.1:1", timeout_s=2.5) as timed:
        assert plain._health_timeout(None) == 5.0 and plain._health_timeout(0.5) == 0.5
        assert timed._health_timeout(None) == 2.5 and timed._health_timeout(7) == 7
        for client in (plain, timed):
            with pytest.raises(InvalidArgumentError, match=r"^timeout_s: .* got 0$"):
                client._health_timeout(0)


#: timeout_s values every call failed with at once, with only "Deadline Exceeded": gRPC's deadline
#: (now + timeout, int64 nanoseconds since 1970) overflows past about 7.4e9 s.
BAD_TIMEOUTS = [float("nan"), float("inf"), float("-inf"), -1, 0, 0.0, 1e10, 2**70]


@pytest.mark.parametrize("timeout_s", BAD_TIMEOUTS)
def test_a_client_timeout_out_of_range_is_refused_naming_it(timeout_s):
    for kind in (LossClient, AsyncLossClient):
        with pytest.raises(InvalidArgumentError, match=r"^timeout_s: must be a finite number of seconds > 0 and <= 1000000000 "):
            kind("127.0.0.1:1", timeout_s=timeout_s)
    with pytest.raises(InvalidArgumentError, match=r"^timeout_s: must be a number of seconds or None \(no deadline\), not str"):
        LossClient("127.0.0.1:1", timeout_s="5")
    LossClient("127.0.0.1:1", timeout_s=1e9).close()  # the bound itself, and None (no deadline), are accepted
    LossClient("127.0.0.1:1", timeout_s=None).close()


def test_a_call_timeout_out_of_range_is_refused_naming_it_and_the_client_still_serves(server):
    """Each method's own timeout_s, sync and async: nan and 1e10 were DeadlineExceededError at once."""
    x, y = np.zeros((2, 3), np.float32), np.array([0, 1])
    calls = {
        "cross_entropy": lambda c, t: c.cross_entropy(x, y, timeout_s=t),
        "evaluate": lambda c, t: c.evaluate(LossRequest(x, y), timeout_s=t),
        "health": lambda c, t: c.health(timeout_s=t),
        "server_info": lambda c, t: c.server_info(timeout_s=t),
        "compare": lambda c, t: c.compare(x, x, timeout_s=t),
        "evaluate_many": lambda c, t: c.evaluate_many([LossRequest(x, y)], timeout_s=t),
    }

    async def finish(got):
        if hasattr(got, "__aiter__"):
            return [r async for r in got]
        return await got

    async def run_async(use):
        async with AsyncLossClient(server.address, timeout_s=60) as client:
            for bad in (float("nan"), 1e10, -1):
                with pytest.raises(InvalidArgumentError, match=r"^timeout_s: "):
                    await finish(use(client, bad))
            return await finish(use(client, 30))

    for name, use in calls.items():
        with LossClient(server.address, timeout_s=60) as client:
            for bad in (float("nan"), 1e10, -1):
                with pytest.raises(InvalidArgumentError, match=r"^timeout_s: "):
                    got = use(client, bad)
                    list(got) if hasattr(got, "__next__") else got
            assert use(client, 30) is not None, name
        assert asyncio.run(asyncio.wait_for(run_async(use), 60)) is not None, name



@pytest.mark.parametrize("loss", ["binary_cross_entropy_with_logits", "kl_div"])
def test_an_ignore_index_given_to_a_loss_that_takes_none_is_refused_not_dropped(server, loss):
    """torch's binary_cross_entropy_with_logits and kl_div take no ignore_index (TypeError); the
    client dropped one given through a LossRequest, so the server's refusal never came."""
    x = np.zeros((2, 3), np.float32)
    with LossClient(server.address) as client:
        with pytest.raises(InvalidArgumentError, match="ignore_index"):
            client.evaluate(LossRequest(x, x, loss=loss, ignore_index=3))
        assert client.evaluate(LossRequest(x, x, loss=loss)).counted == 6  # the default is no ignore_index at all


def test_an_id_utf8_cannot_encode_is_invalid_argument_naming_it(server):
    """A lone surrogate raised a bare UnicodeEncodeError from protobuf."""
    x, t = np.zeros((2, 3), np.float32), np.array([0, 1])
    with LossClient(server.address) as client:
        with pytest.raises(InvalidArgumentError, match=r"^id: not encodable as UTF-8"):
            client.evaluate(LossRequest(x, t, id="a\ud800b"))


@pytest.mark.parametrize("chunked", [False, True])
def test_long_class_weights_equal_torch_through_every_path(server, chunked):
    """Class weights past OPTIONS_CHECKED_FROM_BYTES are read as views of the message (the server's
    wire walker), not by protobuf: the same values as torch's, unary and chunked (header weights)."""
    classes = 200_000
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, classes, generator=g)
    t = torch.tensor([0, classes - 1, 17])
    w = torch.rand(classes, generator=g)
    extra = {"chunked_above_bytes": 4096, "chunk_bytes": 1 << 20} if chunked else {}
    with LossClient(server.address, timeout_s=60, **extra) as client:
        for reduction in ("none", "mean", "sum"):
            got = client.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.1)
            want = F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.1)
            if reduction == "none":
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want)
        pos_weight = torch.rand(classes, generator=g)
        target = torch.rand(3, classes, generator=g)
        got = client.binary_cross_entropy_with_logits(x, target, weight=w, pos_weight=pos_weight, reduction="none")
        assert torch.equal(got, F.binary_cross_entropy_with_logits(x, target, weight=w, pos_weight=pos_weight, reduction="none"))


def test_class_weights_with_c_elements_on_more_axes_are_taken_where_torch_takes_them(server):
    """torch takes a class weight of any shape with C elements for class indices of an input with
    3 or more axes (nll_loss2d checks only the number): lossd refused (1, C), (C, 1), (2, 3)
    weights there (probe 13 F3). Unary and chunked alike; refusals keep torch's message."""
    gen = torch.Generator().manual_seed(13)
    x, t = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64), torch.randint(0, 6, (2, 3), generator=gen)
    t[0, 0] = -100
    with LossClient(server.address, timeout_s=60) as unary, LossClient(server.address, timeout_s=60, chunked_above_bytes=0) as chunked:
        for client in (unary, chunked):
            for shape in [(1, 6), (6, 1), (2, 3)]:
                w = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
                torch.testing.assert_close(client.cross_entropy(x, t, w), F.cross_entropy(x, t, w))
                logp = x.log_softmax(1)
                torch.testing.assert_close(client.nll_loss(logp, t, w, reduction="sum"), F.nll_loss(logp, t, w, reduction="sum"))
                lm = client.evaluate(LossRequest(x.movedim(1, -1), t, weight=w, class_axis=-1, reduction="none"))
                torch.testing.assert_close(lm.loss, F.cross_entropy(x, t, w, reduction="none"))
            w = torch.rand(6, 1, generator=gen, dtype=torch.float64)
            want = F.cross_entropy(x, t, w, label_smoothing=0.1, reduction="sum")
            torch.testing.assert_close(client.cross_entropy(x, t, w, label_smoothing=0.1, reduction="sum"), want)
            row = torch.ones(1, 6, dtype=torch.float64)
            refused = [
                ((x[:, :, 0], t[:, 0], row), {}, "but got weight tensor of shape: [1, 6]"),
                ((x, t, row), {"label_smoothing": 0.1}, "shape '[1, 1, 1]' is invalid for input of size 6"),
                ((x, t, w), {"label_smoothing": 0.1}, "Index tensor must have the same number of dimensions as input tensor"),
            ]
            for args, kwargs, message in refused:
                with pytest.raises(InvalidArgumentError) as info:
                    client.cross_entropy(*args, **kwargs)
                assert info.value.details.startswith("options.weight: ") and message in info.value.details
