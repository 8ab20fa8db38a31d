"""Feed a chunked call's messages to its assembler as the servicer does, without gRPC (tests of
EvaluateChunked's ChunkAssembler and CompareChunked's CompareAssembler, which share the interface)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def feed(assembler: Any, messages: Sequence[Any], chunk_bytes: int = 64) -> Any:
    """Every message's rows evaluated in order (the first message carries the header), then the
    completeness check and the finished result."""
    parts = []
    for i, message in enumerate(messages):
        rows = assembler.rows(message, first=i == 0)
        if rows is not None:
            parts.append(assembler.evaluate(rows, device=torch.device("cpu"), chunk_bytes=chunk_bytes))
    assembler.check_complete()
    return assembler.finish(parts)
