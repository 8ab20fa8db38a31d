"""What the client takes and returns: one request, its results, and exact combination of totals.

Plain dataclasses, no I/O: :class:`LossRequest` goes in; :class:`EvaluateResult` (with
:class:`SequenceStats`), :class:`PerplexityResult`, :class:`LoglikelihoodResult` and
:class:`ServerInfo` come out; :func:`combine` adds totals up exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LossRequest:
    """One evaluation, as :meth:`LossClient.evaluate` takes it (used by ``evaluate_many``)."""

    input: Any
    target: Any
    loss: str = "cross_entropy"
    weight: Any = None
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    pos_weight: Any = None
    class_axis: int | None = None
    shift_targets: bool = False
    extras: Sequence[str] = ()
    sequence_stats: bool = False
    id: str = ""
    #: kl_div: the target holds log-probabilities.
    log_target: bool = False
    #: torch's deprecated keywords (None: not given); when either is set they decide the reduction,
    #: as in torch (kl_div: a 'batchmean' reduction beside them still divides by input.size(0)).
    size_average: bool | None = None
    reduce: bool | None = None


@dataclass
class SequenceStats:
    """Per-sequence statistics (rows of the target's last axis)."""

    nll_sum: np.ndarray
    tokens: np.ndarray
    mean_nll: np.ndarray
    perplexity: np.ndarray
    is_greedy: np.ndarray


@dataclass
class EvaluateResult:
    """What torch returns (``loss``) plus the float64 totals that combine across requests."""

    loss: Any
    loss_sum: float
    weight_sum: float
    counted: int
    sequences: SequenceStats | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    @property
    def mean(self) -> float:
        """loss_sum / weight_sum (torch's mean for these options)."""
        return self.loss_sum / self.weight_sum if self.weight_sum else math.nan


def exact_sum(values: Sequence[float]) -> float:
    """Exactly rounded sum; IEEE semantics (inf - inf = nan, overflow = inf) when not finite."""
    try:
        return math.fsum(values)
    except (ValueError, OverflowError):
        return sum(values)


def exp(x: float) -> float:
    """exp(x) as float64 (numpy, torch) computes it: inf past overflow (x > ~709.78), nan for nan.

    The one rule behind every perplexity the client reports (:attr:`PerplexityResult.perplexity`,
    :mod:`lossd_client.hf`, ``lossd-client score``) and the comparison's statistics: ``math.exp``
    raises OverflowError where torch answers inf, and a guard like ``mean < 709`` turned a NaN
    mean into inf.
    """
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def combine(results: Sequence[EvaluateResult]) -> float:
    """The exact mean over several results (requests, shards or replicas)."""
    total, weight = exact_sum([r.loss_sum for r in results]), exact_sum([r.weight_sum for r in results])
    return total / weight if weight else math.nan


@dataclass
class PerplexityResult:
    """Per-token NLL (float32, never rounded to the logits' dtype), per-sequence and corpus figures.

    ``token_nll`` is shaped like the tokens; with ``shift`` position t holds -log p(token t+1), with
    torch's sign (-0.0 where the log-probability is 0, as ``F.cross_entropy(reduction='none')``), and
    positions that score nothing (the last one, ignored tokens) hold +0.0.
    """

    token_nll: Any
    sequence_nll_sum: np.ndarray
    sequence_tokens: np.ndarray
    sequence_perplexity: np.ndarray
    nll_sum: float
    tokens: int

    @property
    def mean_nll(self) -> float:
        """Corpus mean NLL per counted token: nll_sum / tokens."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """Corpus perplexity: exp(total NLL / total counted tokens), as float64 computes it (inf past
        overflow, nan for a nan NLL or no counted tokens: :func:`exp`)."""
        return exp(self.mean_nll)


@dataclass
class LoglikelihoodResult:
    """Per sequence: sum of continuation log-probs and whether greedy decoding gives it."""

    logprob: np.ndarray
    is_greedy: np.ndarray


@dataclass(frozen=True)
class ServerInfo:
    """The server's versions, device and limits (``GetServerInfo``), field for field as the proto's.

    Dtypes are names as numpy and torch spell them (``"float32"``, ``"bfloat16"``).
    """

    #: lossd-server package version.
    version: str
    #: ``torch.__version__`` on the server.
    torch_version: str
    #: Device the engine runs on, e.g. ``"cpu"`` or ``"cuda:0"``.
    device: str
    #: Largest message the server receives, in bytes (larger requests go through EvaluateChunked).
    max_receive_message_bytes: int
    #: Largest message the server sends, in bytes.
    max_send_message_bytes: int
    #: A batch closes at this many rows ...
    max_batch_rows: int
    #: ... or this many bytes of work (a request's input, or its broadcast output or answer when larger) ...
    max_batch_bytes: int
    #: ... or this long after its first request.
    max_wait_ms: float
    #: Queued requests beyond which the server answers RESOURCE_EXHAUSTED.
    max_queue_requests: int
    #: Queued input bytes beyond which the server answers RESOURCE_EXHAUSTED.
    max_queue_bytes: int
    #: Input dtypes the server accepts.
    input_dtypes: tuple[str, ...]
    #: Target dtypes the server accepts.
    target_dtypes: tuple[str, ...]
    #: Whether the server honours same-host shared-memory tensor references.
    allow_client_shm: bool
    #: The device's name: the CPU model or the CUDA device name.
    device_name: str
    #: Largest ``top_k`` a comparison may ask for.
    max_top_k: int
    #: Longest request ``id`` the server accepts, in UTF-8 bytes (it is echoed in the answer).
    max_id_bytes: int
    #: Most elements a request's broadcast output may have when it has more than its larger operand (kl_div).
    max_broadcast_elements: int
