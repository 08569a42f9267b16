"""fused_cel: the LM head and its cross-entropy loss without the tokens x vocab logits tensor."""

from .api import (
    FusedLinearCrossEntropyLoss,
    LogProbs,
    TokenStats,
    linear_cross_entropy,
    linear_log_probs,
    triton_available,
)
from .integrations.hf import patch, unpatch
from .reference import linear_cross_entropy_reference, linear_log_probs_reference

__all__ = [
    "FusedLinearCrossEntropyLoss",
    "LogProbs",
    "TokenStats",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_log_probs",
    "linear_log_probs_reference",
    "patch",
    "triton_available",
    "unpatch",
]
__version__ = "0.1.0"
