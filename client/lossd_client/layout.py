"""Layout rules that client and server must agree on byte for byte. No torch, no gRPC.

The server imports this module from the client distribution (which it depends on), so a rule
such as "which target travels with the input rows of EvaluateChunked" has one definition.
"""

from __future__ import annotations

from collections.abc import Sequence

CROSS_ENTROPY = "cross_entropy"
NLL_LOSS = "nll_loss"
BCE_WITH_LOGITS = "binary_cross_entropy_with_logits"


def target_travels_with_rows(loss: str, input_shape: Sequence[int], target_shape: Sequence[int]) -> bool:
    """EvaluateChunked: whether the target is split into rows like the input (``target_rows``).

    Probability targets (cross_entropy) and BCE targets are shaped like the input and travel with
    its rows; class-index targets (and anything not shaped like the input) travel whole in the
    ChunkHeader.
    """
    return loss != NLL_LOSS and tuple(target_shape) == tuple(input_shape)
