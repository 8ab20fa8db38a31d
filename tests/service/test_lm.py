"""Language-model scoring through a real server: class_axis, causal shift, extras, sequence
statistics, perplexity() and loglikelihood(), each checked against a local torch computation."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lossd_client import LossRequest
from lossd_client.errors import InvalidArgumentError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EXTRAS = ("target_logprob", "entropy", "target_rank", "argmax_correct")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def for_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """transformers' ForCausalLMLoss (loss_utils.py), restated: pad the labels with ignore_index,
    shift them left, flatten, float32 cross entropy."""
    v = logits.shape[-1]
    labels = F.pad(labels, (0, 1), value=ignore_index)
    shift_labels = labels[..., 1:].contiguous()
    return F.cross_entropy(logits.float().reshape(-1, v), shift_labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)


def shift_left(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, weight: torch.Tensor | None) -> dict:
    """Per-token terms for (..., V) logits and already-shifted (...) targets, computed the way the
    service promises: in float32 (float64 for float64 input), never rounded to half precision."""
    cd = compute_dtype(logits.dtype)
    x = logits.to(cd)
    v = x.shape[-1]
    valid = target != ignore_index
    tc = torch.where(valid, target, 0)
    logp = torch.log_softmax(x, -1)
    picked = logp.gather(-1, tc.unsqueeze(-1)).squeeze(-1)
    w = torch.ones(v, dtype=cd) if weight is None else weight.to(cd)
    wt = torch.where(valid, w[tc], 0.0)
    nll = torch.where(valid, -picked * w[tc], 0.0)
    p = logp.exp()
    entropy = -(p * logp).masked_fill(p == 0, 0.0).sum(-1)
    rank = reference_rank(logp, tc)
    return {
        "nll": nll,
        "weight": wt,
        "valid": valid,
        "target_logprob": torch.where(valid, picked, 0.0),
        "entropy": torch.where(valid, entropy, 0.0),
        "target_rank": torch.where(valid, rank, 0),
        "argmax_correct": (rank == 1) & valid,
        "greedy": (x.argmax(-1) == tc) | ~valid,
    }


def reference_rank(logp: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
    """The promised target_rank: 1 + the classes whose log-probability is greater than the
    target's (NaN greater than any number); when none is, 1 + the equal ones before it (torch.argmax's
    first maximum, NaN the maximum)."""
    at = logp.gather(-1, tc.unsqueeze(-1))
    above = (logp > at).sum(-1) + (logp.isnan() & ~at.isnan()).sum(-1)
    before = torch.arange(logp.shape[-1]) < tc.unsqueeze(-1)
    same = (logp == at) | (logp.isnan() & at.isnan())
    return 1 + torch.where(above > 0, above, (same & before).sum(-1))


def tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}


@st.composite
def lm_cases(draw):
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 7))
    v = draw(st.integers(2, 40))
    dtype = draw(st.sampled_from(DTYPES))
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    p_ignore = draw(st.sampled_from([0.0, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 8.0]))
    logits = (torch.randn(b, t, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < p_ignore] = ignore_index
    weighted = draw(st.booleans())
    weight = (torch.rand(v, generator=gen, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    return {
        "logits": logits,
        "labels": labels,
        "ignore_index": ignore_index,
        "weight": weight,
        "shift": draw(st.booleans()),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "torch_layout": draw(st.booleans()),
    }


@SETTINGS
@given(case=lm_cases())
def test_lm_scoring_matches_torch(client, case):
    logits, labels, ii, weight = case["logits"], case["labels"], case["ignore_index"], case["weight"]
    dtype = logits.dtype
    if case["torch_layout"]:
        sent, axis = logits.transpose(1, 2).contiguous(), None  # (B, V, T): torch's own layout
    else:
        sent, axis = logits, -1
    res = client.evaluate(
        LossRequest(
            sent, labels, weight=weight, ignore_index=ii, reduction=case["reduction"], class_axis=axis,
            shift_targets=case["shift"], extras=EXTRAS, sequence_stats=True,
        )
    )
    target = shift_left(labels, ii) if case["shift"] else labels
    ref = reference(logits, target, ii, weight)
    tol = tolerance(dtype)

    # the loss itself: torch's value, computed with float32 accumulation for half precision
    want = F.cross_entropy(
        logits.to(compute_dtype(dtype)).transpose(1, 2), target, weight=None if weight is None else weight.to(compute_dtype(dtype)),
        ignore_index=ii, reduction=case["reduction"],
    )
    assert res.loss.dtype == dtype
    assert tuple(res.loss.shape) == tuple(want.shape)
    if dtype in (torch.float16, torch.bfloat16):
        torch.testing.assert_close(res.loss, want.to(dtype), rtol=1e-2, atol=1e-2, equal_nan=True)
    else:
        torch.testing.assert_close(res.loss, want, **tol, equal_nan=True)
    if case["shift"] and weight is None and case["reduction"] != "none" and dtype != torch.float64:
        hf = for_causal_lm_loss(logits, labels, ii, case["reduction"])
        torch.testing.assert_close(res.loss.float(), hf, rtol=1e-2 if dtype != torch.float32 else 2e-5, atol=1e-2, equal_nan=True)

    # float64 totals
    assert res.counted == int(ref["valid"].sum())
    assert math.isclose(res.weight_sum, float(ref["weight"].double().sum()), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(res.loss_sum, float(ref["nll"].double().sum()), rel_tol=1e-5, abs_tol=1e-5)

    # dense extras, shaped like the target
    assert set(res.extras) == set(EXTRAS)
    for name in ("target_logprob", "entropy"):
        got = res.extras[name]
        assert got.dtype == compute_dtype(dtype) and got.shape == target.shape, name
        torch.testing.assert_close(got, ref[name], **tol, msg=name)
    assert res.extras["target_rank"].dtype == torch.int64
    assert torch.equal(res.extras["target_rank"], ref["target_rank"])
    assert res.extras["argmax_correct"].dtype == torch.bool
    assert torch.equal(res.extras["argmax_correct"], ref["argmax_correct"])

    # per-sequence statistics in float64
    s = res.sequences
    nll_sum = ref["nll"].double().sum(-1)
    wsum = ref["weight"].double().sum(-1)
    np.testing.assert_allclose(s.nll_sum, nll_sum.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(s.tokens, ref["valid"].sum(-1).numpy())
    mean = (nll_sum / wsum).numpy()
    np.testing.assert_allclose(s.mean_nll, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.perplexity, np.exp(mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s.is_greedy, ref["greedy"].all(-1).numpy())
    assert s.nll_sum.dtype == np.float64 and s.perplexity.dtype == np.float64


@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss"])
def test_argmax_correct_and_target_rank_agree_with_is_greedy_on_ties_and_nan(client, loss):
    """argmax_correct is per token what is_greedy asks of every token (torch.argmax of the
    log-probabilities: the first maximum, NaN the maximum); target_rank 1 is exactly it. In a row
    with a NaN both class 2 and 3 of [0.1, 0.2, nan, 0.3] were 'argmax' while is_greedy took class 0."""
    nan, inf = math.nan, math.inf
    rows = [[0.1, 0.2, nan, 0.3], [1.0, 1.0, 0.5, 1.0], [-inf, -inf, -inf, 0.0], [0.5, nan, 2.0, nan], [2.0, 1.0, 1.0, 1.0]]
    x = torch.tensor(rows).repeat_interleave(4, 0)
    targets = torch.arange(4).repeat(len(rows))
    request = LossRequest(x, targets, loss=loss, extras=["target_rank", "argmax_correct"], reduction="none")
    got = client.evaluate(request).extras
    logp = F.log_softmax(x, -1) if loss == "cross_entropy" else x
    greedy = logp.argmax(-1) == targets
    assert torch.equal(got["argmax_correct"], greedy)
    assert torch.equal(got["target_rank"], reference_rank(logp, targets))
    assert torch.equal(got["target_rank"] == 1, greedy)
    if loss == "cross_entropy":
        assert got["target_rank"][:4].tolist() == [1, 2, 3, 4]  # a NaN logit: every log-probability NaN
        assert got["target_rank"][4:8].tolist() == [1, 2, 4, 3]
        assert got["argmax_correct"][:4].tolist() == [True, False, False, False]
        for k in range(4):  # is_greedy of the same row and token
            ll = client.loglikelihood(torch.stack([x[0], x[0]])[None], torch.tensor([[0, k]]), 1)
            assert bool(ll.is_greedy[0]) == bool(got["argmax_correct"][k])
    else:
        assert got["target_rank"][12:16].tolist() == [4, 1, 3, 2]  # NaN above any number, the first NaN the argmax


def test_shift_matches_for_causal_lm_loss_by_hand(client):
    """A worked example: position t is scored against token t+1, the last position is ignored."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]])
    tokens = torch.tensor([[0, 1, 2]])
    res = client.evaluate(LossRequest(logits, tokens, class_axis=-1, shift_targets=True, reduction="none"))
    lse = torch.logsumexp(logits[0], -1)
    want = torch.tensor([[lse[0] - 0.0, lse[1] - 0.0, 0.0]])  # token 1 after pos 0, token 2 after pos 1
    torch.testing.assert_close(res.loss, want)
    torch.testing.assert_close(res.loss, for_causal_lm_loss(logits, tokens, -100, "none").reshape(1, 3))


def test_class_axis_in_the_middle_matches_torch(client):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 4, generator=gen)  # classes on axis 2
    t = torch.randint(0, 5, (2, 3, 4), generator=gen)
    got = client.evaluate(LossRequest(x, t, class_axis=2, reduction="none")).loss
    want = F.cross_entropy(x.permute(0, 2, 1, 3), t, reduction="none")
    torch.testing.assert_close(got, want)


def test_shift_and_extras_need_class_indices(client):
    x = torch.randn(2, 4, 5)
    with pytest.raises(InvalidArgumentError, match="shift_targets"):
        client.evaluate(LossRequest(x, torch.rand(2, 4, 5).softmax(-1), class_axis=-1, shift_targets=True))
    with pytest.raises(InvalidArgumentError, match="class_axis"):
        client.evaluate(LossRequest(x, torch.zeros(2, 4, dtype=torch.long), class_axis=3))


# ---------------------------------------------------------------------------- perplexity()


def local_perplexity(logits: torch.Tensor, tokens: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-token NLL (float32 math), per-sequence and corpus perplexity, by hand."""
    target = shift_left(tokens, ignore_index)
    nll = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    seq = torch.exp(nll.double().sum(-1) / valid.sum(-1))
    corpus = math.exp(float(nll.double().sum()) / int(valid.sum()))
    return nll, seq, corpus


@pytest.mark.parametrize("dtype", DTYPES)
def test_perplexity_helper(client, dtype):
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 17, 50, generator=gen) * 4).to(dtype)
    tokens = torch.randint(0, 50, (3, 17), generator=gen)
    tokens[2, 10:] = -100  # padding
    got = client.perplexity(logits, tokens)
    nll, seq, corpus = local_perplexity(logits, tokens)
    assert got.token_nll.dtype == compute_dtype(dtype) and got.token_nll.shape == (3, 17)
    torch.testing.assert_close(got.token_nll, nll.to(compute_dtype(dtype)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.sequence_perplexity, seq.numpy(), rtol=1e-5)
    assert math.isclose(got.perplexity, corpus, rel_tol=1e-5)
    np.testing.assert_array_equal(got.sequence_tokens, [16, 16, 9])
    assert got.tokens == 41
    if dtype in (torch.bfloat16, torch.float16):
        # float32 per-token NLL, not values rounded to the logits' dtype
        assert not torch.equal(got.token_nll, got.token_nll.to(dtype).float())


def _torch_exp(x: float) -> float:
    return float(torch.exp(torch.tensor(x, dtype=torch.float64)))


@pytest.mark.parametrize("sure", [1000.0, math.nan])
def test_perplexity_past_exp_overflow_or_of_nan_is_torchs_exp(client, sure):
    """A corpus mean NLL above ~709.78 (a model sure of a token the text never has) or NaN (NaN
    logits): the corpus perplexity is exp as torch computes it in float64 (inf, nan), not
    OverflowError."""
    logits = torch.zeros(1, 4, 3)
    logits[..., 0] = sure
    tokens = torch.tensor([[0, 1, 2, 1]])
    got = client.perplexity(logits, tokens)
    want_nll = F.cross_entropy(logits[0, :-1].double(), tokens[0, 1:])
    torch.testing.assert_close(torch.tensor(got.mean_nll, dtype=torch.float64), want_nll, equal_nan=True)
    assert got.perplexity == _torch_exp(got.mean_nll) or (math.isnan(got.perplexity) and math.isnan(_torch_exp(got.mean_nll)))
    assert math.isinf(got.perplexity) if sure > 0 else math.isnan(got.perplexity)
    np.testing.assert_array_equal(got.sequence_perplexity, [got.perplexity])


def test_perplexity_numpy_without_shift(client):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 6, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 6))
    got = client.perplexity(logits, tokens, shift=False, ignore_index=3)
    t = torch.from_numpy(tokens)
    want = F.cross_entropy(torch.from_numpy(logits).transpose(1, 2), t, ignore_index=3, reduction="none")
    assert isinstance(got.token_nll, np.ndarray) and got.token_nll.dtype == np.float32
    np.testing.assert_allclose(got.token_nll, want.numpy(), rtol=1e-5, atol=1e-6)
    assert got.tokens == int((t != 3).sum())


def test_async_perplexity_and_loglikelihood(server):
    from lossd_client import AsyncLossClient

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 13, generator=gen).to(torch.bfloat16)
    tokens = torch.randint(0, 13, (2, 9), generator=gen)

    async def both():
        async with AsyncLossClient(server.address, timeout_s=60) as c:
            return await c.perplexity(logits, tokens), await c.loglikelihood(logits, tokens, 4)

    ppl, ll = asyncio.run(both())
    _, seq, corpus = local_perplexity(logits, tokens)
    np.testing.assert_allclose(ppl.sequence_perplexity, seq.numpy(), rtol=1e-5)
    assert math.isclose(ppl.perplexity, corpus, rel_tol=1e-5)
    want = [harness_loglikelihood(logits[i], tokens[i], 4) for i in range(2)]
    np.testing.assert_allclose(ll.logprob, [w[0] for w in want], rtol=1e-5)
    np.testing.assert_array_equal(ll.is_greedy, [w[1] for w in want])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "no-shift"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perplexity_token_nll_is_torchs_none_loss_bit_for_bit_sign_of_zero_included(client, dtype, shift):
    """A scored token whose log-probability is exactly 0 (V = 1, a one-hot row) has NLL -0.0, as
    F.cross_entropy(reduction='none') gives it; a position that scores nothing (ignored, or the last
    one with shift) +0.0, as torch's ignored losses. token_nll was 0.0 - logprob: +0.0 for both.
    16-bit logits: torch's float32 computation (token_nll is float32, never rounded to them)."""
    gen = torch.Generator().manual_seed(11)
    one_hot = torch.full((2, 6, 5), -math.inf)
    one_hot[..., 2] = 3.0
    mixed = torch.cat([one_hot, torch.randn(2, 6, 5, generator=gen) * 3])  # (4, 6, 5): rows 0-1 one-hot
    mixed[3, 1, 0] = math.nan  # a NaN NLL: its sign bit is torch's too
    tokens = torch.full((4, 6), 2)
    tokens[2:] = torch.randint(0, 5, (2, 6), generator=gen)
    tokens[0, 3] = tokens[2, 4] = -100  # ignored positions
    single = (torch.randn(3, 4, 1, generator=gen), torch.tensor([[0, 0, -100, 0]] * 3))  # V = 1: every log-probability 0
    for logits, ids in ((mixed, tokens), single):
        logits = logits.to(dtype)
        got = client.perplexity(logits, ids, shift=shift).token_nll
        target = shift_left(ids, -100) if shift else ids
        v = logits.shape[-1]
        want = F.cross_entropy(logits.to(compute_dtype(dtype)).reshape(-1, v), target.reshape(-1), reduction="none").reshape(target.shape)
        assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)), (got, want)
        zero = want == 0
        assert zero.any() and torch.equal(torch.signbit(got[zero]), target[zero] != -100)  # scored -0.0, the others +0.0
    numpy_nll = client.perplexity(single[0].numpy(), single[1].numpy(), shift=shift).token_nll
    assert np.array_equal(np.signbit(numpy_nll), (shift_left(single[1], -100) if shift else single[1]).numpy() != -100)


# ---------------------------------------------------------------------------- loglikelihood()


def harness_loglikelihood(logits: torch.Tensor, tokens: torch.Tensor, start: int) -> tuple[float, bool]:
    """lm-evaluation-harness's loglikelihood for one (T, V) sequence whose continuation is
    tokens[start:]: the log-probs of the continuation tokens from the logits of the positions
    before each, summed; is_greedy when every continuation token is the argmax there."""
    logp = F.log_softmax(logits.float(), dim=-1)
    cont = tokens[start:]
    scored = logp[start - 1 : len(tokens) - 1]
    greedy = bool((scored.argmax(dim=-1) == cont).all())
    return float(scored.gather(1, cont.unsqueeze(-1)).sum()), greedy


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 3), t=st.integers(2, 9), v=st.integers(2, 30), dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1), peaked=st.booleans(),
)
def test_loglikelihood_matches_harness_definition(client, b, t, v, dtype, seed, peaked):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, v, (b, t), generator=gen)
    logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64)
    if peaked:  # make greedy continuations likely: each position predicts the next token
        logits[:, :-1].scatter_add_(-1, tokens[:, 1:].unsqueeze(-1), torch.full((b, t - 1, 1), 6.0, dtype=torch.float64))
    logits = logits.to(dtype)
    starts = torch.randint(1, t, (b,), generator=gen)
    got = client.loglikelihood(logits, tokens, starts.numpy())
    for i in range(b):
        lp, greedy = harness_loglikelihood(logits[i], tokens[i], int(starts[i]))
        assert math.isclose(float(got.logprob[i]), lp, rel_tol=1e-5, abs_tol=1e-5), (i, got.logprob[i], lp)
        assert bool(got.is_greedy[i]) == greedy, i
    assert got.logprob.dtype == np.float64


def test_is_greedy_takes_the_first_of_maxima_the_log_softmax_makes_equal(client):
    """Two logits 1e-7 apart among 50,000 have the same float32 log-probability: the harness's
    argmax (of log_softmax) is the first; lossd took the argmax of the raw logits (the second)."""
    logits = torch.zeros(2, 50_000)
    logits[0, 1] = 1e-7
    logp = F.log_softmax(logits, -1)
    assert logp[0, 0] == logp[0, 1] and logits.argmax(-1)[0] == 1
    for continuation in (0, 1):
        tokens = torch.tensor([5, continuation])
        got = client.loglikelihood(logits, tokens, 1)
        assert bool(got.is_greedy[0]) == harness_loglikelihood(logits, tokens, 1)[1] == (continuation == 0)


def test_loglikelihood_one_sequence_and_bad_start(client):
    logits = torch.randn(5, 7)
    tokens = torch.tensor([1, 2, 3, 4, 5])
    got = client.loglikelihood(logits, tokens, 2)
    lp, greedy = harness_loglikelihood(logits, tokens, 2)
    assert got.logprob.shape == (1,)
    assert math.isclose(float(got.logprob[0]), lp, rel_tol=1e-6)
    assert bool(got.is_greedy[0]) == greedy
    with pytest.raises(InvalidArgumentError, match="continuation_start"):
        client.loglikelihood(logits, tokens, 0)


@pytest.mark.parametrize(
    "start, named",
    [(2.9, "got 2.9"), ("3", "got '3'"), (True, "got True"), (None, "got None"), ([1.5, 2.5], "a list of float64"),
     (np.array([2.0, 3.0]), "a ndarray of float64"), (torch.tensor([2, 3, 4]), "one per sequence (2), got shape [3]"),
     ([[2, 3]], "got shape [1, 2]"), ([1, [2]], "continuation_start: expected an integer")],
    ids=["float", "str", "bool", "none", "floats", "float-array", "three-for-two", "2-d", "ragged"],
)  # fmt: skip
def test_continuation_start_of_another_kind_is_refused_naming_it(client, start, named):
    """A float was truncated (2.9 scored the continuation from 2), a str or bool taken as an
    int, None and a list of another length raised bare TypeError / ValueError."""
    logits, tokens = torch.randn(2, 6, 9), torch.randint(0, 9, (2, 6))
    with pytest.raises(InvalidArgumentError, match="continuation_start") as raised:
        client.loglikelihood(logits, tokens, start)
    assert named in str(raised.value)


@pytest.mark.parametrize("start", [3, np.int32(3), torch.tensor(3), [3, 3], np.array([3, 3], np.uint8), torch.tensor([3, 3])], ids=str)
def test_continuation_start_of_any_integer_kind_is_taken(client, start):
    logits, tokens = torch.randn(2, 6, 9), torch.randint(0, 9, (2, 6))
    want = client.loglikelihood(logits, tokens, 3)
    got = client.loglikelihood(logits, tokens, start)
    assert np.array_equal(got.logprob, want.logprob) and np.array_equal(got.is_greedy, want.is_greedy)


def test_no_negative_zeros_where_the_math_gives_zero(client):
    """An empty continuation has log-probability 0.0 and a one-hot row entropy 0.0; both came back -0.0."""
    logits, tokens = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    logprob = client.loglikelihood(logits, tokens, 5).logprob
    assert np.array_equal(logprob, [0.0, 0.0]) and not np.signbit(logprob).any()
    rows = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf, 5.0, -math.inf], [1.0, 2.0, 3.0], [math.nan, 0.0, 0.0]])
    for dtype in (torch.float32, torch.float64):
        request = LossRequest(rows.to(dtype), torch.tensor([0, 1, 2, 0]), extras=["entropy"], reduction="none")
        got = client.evaluate(request).extras["entropy"]
        assert torch.equal(got[:2], torch.zeros(2, dtype=dtype)) and not torch.signbit(got[:2]).any()
        p = torch.softmax(rows[2].to(dtype), 0)
        torch.testing.assert_close(got[2], -(p * p.log()).sum())
        assert got[3].isnan()


@pytest.mark.parametrize("value", ["no", 2, None, 1.0], ids=repr)
def test_shift_must_be_a_bool(client, value):
    """shift="no" meant True (its truth value)."""
    logits, tokens = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    with pytest.raises(InvalidArgumentError, match=f"^options.shift: argument 'shift' must be bool, not {type(value).__name__}$"):
        client.perplexity(logits, tokens, shift=value)
    assert client.perplexity(logits, tokens, shift=np.bool_(False)).tokens == 10


def test_zero_d_tokens_are_refused_naming_them(client):
    """``tokens.shape[0]`` of a 0-d array raised a bare IndexError."""
    zero_d = r"^tokens: expected token ids of one sequence \(T,\) or a batch \(B, T\), got a 0-d array$"
    with pytest.raises(InvalidArgumentError, match=zero_d):
        client.loglikelihood(torch.randn(5, 7), torch.tensor(3), 1)
    with pytest.raises(InvalidArgumentError, match="^tokens: expected token ids of one sequence"):
        client.loglikelihood(np.zeros((5, 7), np.float32), np.uint16(3), 1)


def test_a_uint64_start_past_int64_is_reported_as_it_is(client):
    """np.uint64(2**64 - 1) wrapped to -1 in the message."""
    logits, tokens = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    with pytest.raises(InvalidArgumentError, match=rf"^continuation_start: {2**64 - 1} is outside \[1, 5\] for sequence 0$"):
        client.loglikelihood(logits, tokens, np.uint64(2**64 - 1))
    with pytest.raises(InvalidArgumentError, match=rf"^continuation_start: {2**63} is outside \[1, 5\] for sequence 1$"):
        client.loglikelihood(logits, tokens, np.array([2, 2**63], dtype=np.uint64))



@pytest.mark.parametrize("method", ["perplexity", "loglikelihood", "compare"])
def test_torch_uint64_token_ids_past_int64_are_refused_as_numpy_ones_are(client, method):
    """A torch.uint64 id of 2**64 - 100 was cast to int64 before the range check: -100, the default
    ignore_index, so perplexity counted 9 of 10 tokens without a word."""
    logits = torch.randn(1, 10, 7)
    ids = np.random.default_rng(0).integers(0, 7, (1, 10)).astype(np.uint64)
    ids[0, 4] = 2**64 - 100
    tokens = torch.from_numpy(ids)
    call = {
        "perplexity": lambda t: client.perplexity(logits, t),
        "loglikelihood": lambda t: client.loglikelihood(logits, t, 2),
        "compare": lambda t: client.compare(logits, logits, t),
    }[method]
    for ids in (tokens, tokens.numpy()):
        with pytest.raises(InvalidArgumentError, match=rf"^tokens: token id {2**64 - 100} is out of int64 range$"):
            call(ids)

def test_an_empty_list_of_starts_for_no_sequences_is_taken(client):
    """[] is one integer per sequence of an empty batch (numpy makes it float64: it was refused)."""
    logits, tokens = torch.randn(0, 5, 7), torch.zeros(0, 5, dtype=torch.long)
    for start in ([], (), 1):
        got = client.loglikelihood(logits, tokens, start)
        assert got.logprob.shape == (0,) and got.is_greedy.shape == (0,)
    refused = "^continuation_start: expected an integer or one integer per sequence, got a list of float64$"  # as before
    with pytest.raises(InvalidArgumentError, match=refused):
        client.loglikelihood(torch.randn(2, 5, 7), torch.zeros(2, 5, dtype=torch.long), [])


# ---------------------------------------------------------------------------- token ids
TOKEN_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, np.int32, np.uint16, np.uint8, np.int64]


def _token_ids(tokens: torch.Tensor, dtype) -> object:
    return tokens.to(dtype) if isinstance(dtype, torch.dtype) else tokens.numpy().astype(dtype)


@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=str)
def test_token_ids_of_any_integer_dtype_work_in_both_helpers(client, dtype):
    """perplexity and loglikelihood take token ids of any integer dtype, numpy or torch (as int64
    on the wire): perplexity refused int32 / int16 (and uint8 with (B, T, V) logits) that
    loglikelihood took."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 11, generator=gen)
    tokens = torch.randint(0, 11, (2, 6), generator=gen)
    ppl = client.perplexity(logits, _token_ids(tokens, dtype))
    nll, seq, corpus = local_perplexity(logits, tokens)
    torch.testing.assert_close(ppl.token_nll, nll, rtol=1e-5, atol=1e-5)
    assert math.isclose(ppl.perplexity, corpus, rel_tol=1e-5)
    ll = client.loglikelihood(logits, _token_ids(tokens, dtype), 2)
    want = [harness_loglikelihood(logits[i], tokens[i], 2) for i in range(2)]
    np.testing.assert_allclose(ll.logprob, [w[0] for w in want], rtol=1e-5)


@pytest.mark.parametrize("tokens", [torch.zeros(2, 6), np.zeros((2, 6), np.float32), torch.zeros(2, 6, dtype=torch.bool)], ids=["torch-float", "numpy-float", "bool"])
def test_token_ids_that_are_not_integers_are_rejected_by_both_helpers(client, tokens):
    logits = torch.randn(2, 6, 11)
    with pytest.raises(InvalidArgumentError, match="^tokens: expected token ids of an integer dtype"):
        client.perplexity(logits, tokens)
    with pytest.raises(InvalidArgumentError, match="^tokens: expected token ids of an integer dtype"):
        client.loglikelihood(logits, tokens, 2)


@pytest.mark.parametrize("bad", [-100, -1])
def test_loglikelihood_refuses_a_continuation_token_the_loss_would_ignore(client, bad):
    """A continuation token of -100 (ignore_index) was left out of the sum: a wrong log-likelihood
    (the harness's gather fails on it). A negative id in the context is never scored: accepted."""
    logits = torch.randn(1, 6, 11, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([[1, 2, bad, 4, 5, 6]])
    with pytest.raises(InvalidArgumentError, match=rf"^tokens: continuation token {bad} at sequence 0, position 2"):
        client.loglikelihood(logits, tokens, 1)
    got = client.loglikelihood(logits, tokens, 3)
    assert math.isclose(float(got.logprob[0]), harness_loglikelihood(logits[0], tokens[0], 3)[0], rel_tol=1e-6)
