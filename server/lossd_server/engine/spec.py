"""What a loss call asks for: names, options and the kinds of target. No tensors are read here."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

CROSS_ENTROPY = "cross_entropy"
NLL = "nll_loss"
BCE_WITH_LOGITS = "binary_cross_entropy_with_logits"
#: kl_div is planned apart (:mod:`.kl_plan`); LOSSES are the losses :func:`~.validate.build_plan` plans.
KL_DIV = "kl_div"
LOSSES = (CROSS_ENTROPY, NLL, BCE_WITH_LOGITS)
REDUCTIONS = ("mean", "sum", "none")
EXTRAS = ("target_logprob", "entropy", "target_rank", "argmax_correct")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CLASS_TARGET_DTYPES = (torch.int64, torch.uint8)
#: dtypes of the extras that are not in the compute dtype
EXTRA_DTYPES = {"target_rank": torch.int64, "argmax_correct": torch.bool}

#: Bytes of compute-dtype logits evaluated per chunk. Large enough to amortise per-call
#: overhead, small enough to stay in cache-friendly territory and bound extra memory.
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
#: The part of an answer's size bound that is not its tensors (ids, totals, field tags).
ANSWER_OVERHEAD_BYTES = 1024


def oversized_row_nbytes(rows: int, row_bytes: int, copies: int) -> int:
    """What evaluating ``rows`` rows of ``row_bytes`` compute-dtype bytes takes beyond the engine's
    usual chunk-sized buffers: a row is never split, so a row over DEFAULT_CHUNK_BYTES makes chunks
    (and their ``copies`` temporaries) that large. Counted in a plan's working bytes, so that the
    memory budget holds them (one comparison of 15-million-class rows peaked 632 MiB over the idle
    server, uncounted). Without rows no row is made: nothing (an empty [0, 2**40] input, which
    torch evaluates, was refused for 4 TiB rows it never has)."""
    return copies * max(0, row_bytes - DEFAULT_CHUNK_BYTES) if rows else 0


#: The cap for binary_cross_entropy_with_logits, whose torch kernel allocates several
#: chunk-sized temporaries: below the server's 1 MiB mmap threshold they are reused from the heap
#: instead of being mapped and page-faulted in per chunk (8M float32 elements, reduction='mean',
#: under the server's allocator settings: 0.067 s with 4 MiB chunks, 0.020 s with 512 KiB).
ELEMENTWISE_CHUNK_BYTES = 512 * 1024


class TargetKind(enum.Enum):
    """How a request's target is read: torch decides by the target's shape and the loss."""

    CLASS = "class"  # class indices (cross_entropy, nll_loss)
    PROB = "prob"  # class probabilities shaped like the input (cross_entropy)
    BCE = "bce"  # binary targets shaped like the input (binary_cross_entropy_with_logits)
    KL = "kl"  # probabilities or log-probabilities broadcast with the input (kl_div; see .kl_plan)


class InvalidInput(ValueError):
    """The request is invalid; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidDtype(InvalidInput):
    """An InvalidInput for a dtype torch rejects; ``field`` names the tensor (e.g. ``input``)."""


@dataclass(frozen=True)
class LossSpec:
    """The options of one loss call, as torch.nn.functional takes them."""

    loss: str = CROSS_ENTROPY
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    class_axis: int | None = None
    shift_targets: bool = False
    extras: tuple[str, ...] = ()
    sequence_stats: bool = False
    log_target: bool = False  # kl_div only
    size_average: bool | None = None  # torch's legacy keywords, kl_div only (other losses resolve them into reduction)
    reduce: bool | None = None

    @property
    def smoothing(self) -> float:
        """The label smoothing cross_entropy applies: torch ignores NaN, negative and 0 values."""
        return self.label_smoothing if self.loss == CROSS_ENTROPY and self.label_smoothing > 0.0 else 0.0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
