"""lossd client: torch.nn.functional losses evaluated by a lossd server.

>>> from lossd_client import LossClient
>>> with LossClient("127.0.0.1:50051") as client:
...     loss = client.cross_entropy(logits, targets)
...     diff = client.compare(base_logits, quantized_logits, tokens)   # llama.cpp's --kl-divergence statistics
...     print(diff.summary.kld.value)
"""

from importlib.metadata import PackageNotFoundError, version

from .aio import AsyncLossClient
from .client import LossClient
from .compare import CompareResult
from .errors import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LossdError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from .types import EvaluateResult, LoglikelihoodResult, LossRequest, PerplexityResult, SequenceStats, ServerInfo, combine

try:
    __version__ = version("lossd-client")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

__all__ = [
    "AsyncLossClient",
    "CancelledError",
    "CompareResult",
    "DeadlineExceededError",
    "EvaluateResult",
    "InternalError",
    "InvalidArgumentError",
    "LoglikelihoodResult",
    "LossClient",
    "LossRequest",
    "LossdError",
    "PerplexityResult",
    "ResourceExhaustedError",
    "SequenceStats",
    "ServerInfo",
    "UnauthenticatedError",
    "UnavailableError",
    "combine",
]
