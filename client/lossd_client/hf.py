"""Hugging Face ``transformers`` integration: exact, token-weighted eval perplexity from lossd.

Optional: install with ``pip install "lossd-client[hf]"``. The core client never imports this
module (nor torch or transformers).

Why: ``Trainer.evaluate()`` reports ``eval_loss`` as the average of the per-batch mean losses,
each batch's mean repeated once per sample: batches are weighted by their number of sequences,
never by their number of tokens. Causal-LM batches hold unequal numbers of counted tokens
(padding, ``-100`` labels, a short last batch), and the mean of per-batch means is not the
corpus mean: ``exp(eval_loss)`` is not the corpus perplexity. (transformers 5.23 also divides a
GPT-2 batch's NLL by its unshifted label count, one token per sequence too many, which lowers
``eval_loss`` further.) :class:`LossdPerplexity`
instead scores every batch's logits on a lossd server inside ``preprocess_logits_for_metrics``
and keeps, per sequence, the float64 NLL sum and the number of counted tokens (so Trainer's
and accelerate's per-sample bookkeeping - concatenation across batches, gathering across
processes, dropping the duplicated samples of a distributed sampler - stays exact). Only these
two numbers per sequence, not the ``(B, T, V)`` logits, are accumulated over the evaluation.
``compute_metrics`` then adds them up exactly (``types.exact_sum``: math.fsum, IEEE for infinities) and returns::

    eval_perplexity = exp(sum of NLL / sum of counted tokens)
    eval_nll        = sum of NLL / sum of counted tokens       (mean NLL per token, nats)
    eval_tokens     = sum of counted tokens

Usage::

    from transformers import Trainer
    from lossd_client.hf import LossdPerplexity

    scorer = LossdPerplexity("127.0.0.1:50051")          # or LossdPerplexity(LossClient(...))
    trainer = Trainer(model, args, eval_dataset=eval_ds, data_collator=collate, **scorer.trainer_kwargs())
    metrics = trainer.evaluate()                          # metrics["eval_perplexity"]

Labels follow Hugging Face's causal-LM convention: ``labels`` are the input ids with ``-100``
where nothing is scored, and the model scores position t against label t+1 (``shift=True``,
lossd's ``shift_targets``, as ``ForCausalLMLoss``). For models whose labels are already aligned
with the logits (seq2seq decoders), pass ``shift=False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .client import LossClient
from .types import exact_sum, exp

__all__ = ["LossdPerplexity", "corpus_totals"]


def corpus_totals(predictions: Any) -> tuple[float, int]:
    """(NLL sum, counted tokens) from what :meth:`LossdPerplexity.preprocess_logits_for_metrics` returned.

    ``predictions`` is Trainer's ``EvalPrediction.predictions``: one ``(n, 2)`` float64 array of
    per-sequence ``[nll_sum, tokens]`` rows, or a list of them (``eval_do_concat_batches=False``).
    """
    if isinstance(predictions, (list, tuple)):
        rows = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in predictions]) if predictions else np.zeros((0, 2))
    else:
        rows = np.asarray(predictions, dtype=np.float64).reshape(-1, 2)
    return exact_sum(rows[:, 0].tolist()), int(exact_sum(rows[:, 1].tolist()))


class LossdPerplexity:
    """``preprocess_logits_for_metrics`` + ``compute_metrics`` for ``transformers.Trainer``.

    ``client`` is a :class:`~lossd_client.LossClient` or a target for one (``"host:port"``);
    a client made here is closed by :meth:`close`. ``shift`` and ``ignore_index`` are passed to
    :meth:`LossClient.perplexity`; ``timeout_s`` bounds each batch's call.
    """

    def __init__(
        self, client: LossClient | str | Sequence[str], *, shift: bool = True, ignore_index: int = -100, timeout_s: float | None = None
    ):
        self._owned = not isinstance(client, LossClient)
        self.client = LossClient(client) if self._owned else client
        self.shift = shift
        self.ignore_index = ignore_index
        self.timeout_s = timeout_s

    def preprocess_logits_for_metrics(self, logits: Any, labels: Any) -> Any:
        """Score one batch remotely; returns a ``(B, 2)`` float64 tensor of per-sequence ``[nll_sum, tokens]``.

        ``logits`` is what the model returned besides the loss: a ``(B, T, V)`` tensor, or a tuple
        whose first element is (models that also return hidden states or caches).
        """
        import torch

        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if labels is None:
            raise ValueError("LossdPerplexity needs labels: give the eval dataset a 'labels' column (input ids, -100 where not scored)")
        result = self.client.perplexity(
            logits.detach(), labels.detach(), shift=self.shift, ignore_index=self.ignore_index, timeout_s=self.timeout_s
        )
        rows = np.stack(
            [np.asarray(result.sequence_nll_sum, dtype=np.float64), np.asarray(result.sequence_tokens, dtype=np.float64)], axis=-1
        )
        totals = torch.from_numpy(rows.reshape(-1, 2))
        # On the logits' device, so accelerate can gather it across processes (MPS has no float64).
        return totals if logits.device.type in ("cpu", "mps") else totals.to(logits.device)

    def compute_metrics(self, eval_pred: Any) -> dict[str, float]:
        """Token-weighted corpus figures from every sequence's totals: perplexity, nll, tokens."""
        predictions = eval_pred.predictions if hasattr(eval_pred, "predictions") else eval_pred[0]
        nll_sum, tokens = corpus_totals(predictions)
        mean = nll_sum / tokens if tokens else math.nan
        return {"perplexity": exp(mean), "nll": mean, "tokens": tokens}

    def trainer_kwargs(self) -> dict[str, Any]:
        """``preprocess_logits_for_metrics`` and ``compute_metrics``, to splat into ``Trainer(...)``."""
        return {"preprocess_logits_for_metrics": self.preprocess_logits_for_metrics, "compute_metrics": self.compute_metrics}

    def close(self) -> None:
        """Close the client if this object made it."""
        if self._owned:
            self.client.close()

    def __enter__(self) -> LossdPerplexity:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
