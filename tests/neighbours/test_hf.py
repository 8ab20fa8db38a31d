"""Hugging Face as client and oracle: a tiny random GPT-2 (built from a config, nothing downloaded).

* its logits scored by lossd (``shift_targets`` / ``client.perplexity``) equal the model's own
  ``model(input_ids, labels=labels).loss``, padding with -100 included, per token and overall;
* torchmetrics' ``text.Perplexity`` is a second, independent oracle;
* ``lossd_client.hf.LossdPerplexity`` in a real ``Trainer.evaluate()`` returns the token-weighted
  corpus perplexity of a local computation, while Trainer's own ``eval_loss`` (mean of per-batch
  means) is shown to differ from it on unequal batches: the reason the integration exists.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import LossClient, LossRequest, combine
from lossd_client.hf import LossdPerplexity
from serverproc import start_server
from torchmetrics.text import Perplexity
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

VOCAB, PAD = 97, 0


@pytest.fixture(scope="module")
def hf_server():
    proc = start_server("--drain-s", "0")
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def hf_client(hf_server):
    with LossClient(hf_server.address, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(1234)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, pad_token_id=PAD, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1
    )
    m = GPT2LMHeadModel(config)
    m.eval()
    return m


@pytest.mark.parametrize("nll_sum", [math.nan, 3000.0, math.inf, 4.0])
def test_compute_metrics_perplexity_is_torchs_exp_of_the_mean(nll_sum):
    """A NaN corpus NLL gives perplexity nan (exp(nan)), not inf; a mean past exp's overflow gives inf."""
    scorer = LossdPerplexity("127.0.0.1:1")  # compute_metrics never calls the server
    try:
        got = scorer.compute_metrics((np.array([[nll_sum, 3.0], [2.0, 2.0]]), None))
    finally:
        scorer.close()
    mean = torch.tensor((nll_sum + 2.0) / 5, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor([got["nll"], got["perplexity"]], dtype=torch.float64), torch.stack([mean, mean.exp()]), equal_nan=True)
    assert got["tokens"] == 5


def test_compute_metrics_of_sequences_summing_to_inf_and_minus_inf_is_nan():
    """Sums of opposite infinities are nan, as in torch (math.fsum raised ValueError on them)."""
    scorer = LossdPerplexity("127.0.0.1:1")  # compute_metrics never calls the server
    try:
        got = scorer.compute_metrics((np.array([[math.inf, 3.0], [-math.inf, 2.0]]), None))
    finally:
        scorer.close()
    assert math.isnan(got["nll"]) and math.isnan(got["perplexity"]) and got["tokens"] == 5


def padded_batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Right-padded token ids, attention mask, and labels = ids with -100 on the padding."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_model_loss_equals_lossd_shifted_nll(model, hf_client):
    batch = padded_batch([30, 17, 5, 24], seed=7)
    batch["labels"][1, 3:6] = -100  # ignored tokens inside a sequence too
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits, batch["labels"]
    assert logits.dtype == torch.float32 and logits.shape == (4, 30, VOCAB)

    # The model's loss is the mean NLL over counted, shifted positions: lossd's mean with shift_targets.
    remote = hf_client.evaluate(LossRequest(logits, labels, class_axis=-1, shift_targets=True))
    torch.testing.assert_close(remote.loss, out.loss)
    counted = int((labels[:, 1:] != -100).sum())
    assert remote.counted == counted

    ppl = hf_client.perplexity(logits, labels, shift=True, ignore_index=-100)
    assert ppl.tokens == counted
    torch.testing.assert_close(torch.tensor(ppl.mean_nll, dtype=torch.float32), out.loss)
    assert math.isclose(ppl.perplexity, math.exp(float(out.loss)), rel_tol=1e-5)

    # Per token: position t holds -log p(label t+1); the last position and ignored targets hold 0.
    want = torch.zeros_like(labels, dtype=torch.float32)
    want[:, :-1] = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    assert ppl.token_nll.shape == labels.shape
    torch.testing.assert_close(ppl.token_nll, want)
    assert torch.all(ppl.token_nll[labels.roll(-1, dims=1) == -100] == 0)

    # Per sequence: the model scoring each sequence alone (no padding at all) gives the same sums.
    for row in range(4):
        n = int(batch["attention_mask"][row].sum())
        with torch.no_grad():
            alone = model(input_ids=batch["input_ids"][row : row + 1, :n], labels=labels[row : row + 1, :n])
        tokens = int((labels[row, 1:n] != -100).sum())
        assert int(ppl.sequence_tokens[row]) == tokens
        torch.testing.assert_close(
            torch.tensor(float(ppl.sequence_nll_sum[row]) / tokens, dtype=torch.float32), alone.loss, rtol=2e-5, atol=2e-5
        )


def test_torchmetrics_perplexity_is_a_second_oracle(model, hf_client):
    batches = [padded_batch([40, 12, 33], seed=11), padded_batch([8, 60], seed=12)]
    metric = Perplexity(ignore_index=-100).double()
    results = []
    for batch in batches:
        with torch.no_grad():
            logits = model(**batch).logits
        metric.update(logits[:, :-1].double(), batch["labels"][:, 1:])
        results.append(hf_client.evaluate(LossRequest(logits, batch["labels"], class_axis=-1, shift_targets=True, reduction="sum")))
    want = float(metric.compute())
    assert math.isclose(math.exp(combine(results)), want, rel_tol=1e-6), (math.exp(combine(results)), want)


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, f in enumerate(features):
        ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[row, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("concat", [True, False], ids=["concat_batches", "per_batch_list"])
def test_trainer_evaluate_reports_token_weighted_perplexity(model, hf_server, tmp_path, concat):
    rng = np.random.default_rng(5)
    lengths = [60, 3, 45, 4, 2, 58, 6, 50, 3, 5]  # batches of 4, 4, 2 with very unequal token counts
    dataset = [{"input_ids": rng.integers(1, VOCAB, n).tolist()} for n in lengths]
    batch_size = 4

    # Local reference: same batches, float64 totals of the model's own per-token NLL.
    nll_sum, tokens, batch_means, batch_unshifted, batch_sizes = 0.0, 0, [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate(dataset[start : start + batch_size])
        with torch.no_grad():
            out = model(**batch)
        nll = float(F.cross_entropy(out.logits[:, :-1].transpose(1, 2).double(), batch["labels"][:, 1:], reduction="sum"))
        nll_sum += nll
        tokens += int((batch["labels"][:, 1:] != -100).sum())
        batch_means.append(float(out.loss))
        batch_unshifted.append(nll / int((batch["labels"] != -100).sum()))
        batch_sizes.append(len(batch["input_ids"]))
    corpus_mean = nll_sum / tokens
    # Per-batch means of unequal batches are not the corpus mean: the reason for LossdPerplexity.
    mean_of_means = float(np.average(batch_means, weights=batch_sizes))
    assert abs(mean_of_means - corpus_mean) > 1e-3, (mean_of_means, corpus_mean)

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=batch_size,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        eval_do_concat_batches=concat,
    )
    with LossdPerplexity(hf_server.address, timeout_s=60) as scorer:
        trainer = Trainer(model=model, args=args, eval_dataset=dataset, data_collator=collate, **scorer.trainer_kwargs())
        metrics = trainer.evaluate()

    assert metrics["eval_tokens"] == tokens
    assert math.isclose(metrics["eval_nll"], corpus_mean, rel_tol=1e-6), (metrics, corpus_mean)
    assert math.isclose(metrics["eval_perplexity"], math.exp(corpus_mean), rel_tol=1e-6)
    # Trainer's eval_loss repeats each batch's mean once per sample: a sample-weighted mean of per-batch
    # means. transformers 5.23 also divides a GPT-2 batch's NLL by its *unshifted* label count (one
    # token per sequence too many); either way it is not the corpus mean.
    candidates = {
        "mean of batch means": mean_of_means,
        "mean of batch NLL / unshifted labels": float(np.average(batch_unshifted, weights=batch_sizes)),
    }
    matched = [name for name, value in candidates.items() if math.isclose(metrics["eval_loss"], value, rel_tol=1e-5)]
    assert matched, (metrics["eval_loss"], candidates)
    print(f"Trainer eval_loss {metrics['eval_loss']:.6f} = {matched[0]}; corpus mean NLL {corpus_mean:.6f}")
    assert abs(metrics["eval_loss"] - corpus_mean) > 1e-3
