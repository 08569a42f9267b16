"""The reference: what fused_cel.linear_cross_entropy computes, written the plain way.

It materialises the whole tokens x vocab logits tensor, so it is only for tests and for reading.
linear_log_probs_reference is the same for fused_cel.linear_log_probs and the token statistics.
Call it with float64 inputs (and ``compute_dtype=torch.float64``) to get the ground truth that
tests measure every other path against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    shift: bool = False,
    num_items: int | torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The semantics of fused_cel.linear_cross_entropy (``compute_dtype`` is the upcast dtype)."""
    logits, labels = _logits(hidden, weight, labels, bias, softcap, logit_scale, temperature, shift, compute_dtype)
    V = logits.shape[-1]
    flat_logits, flat_labels = logits.reshape(-1, V), labels.reshape(-1).long()
    weight = None if class_weight is None else class_weight.to(compute_dtype)
    per_token = F.cross_entropy(
        flat_logits,
        flat_labels,
        weight=weight,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    counted = flat_labels != ignore_index
    # each counted token's weight: class_weight[label] (1 without)
    w_y = torch.ones_like(per_token) if weight is None else weight[torch.where(counted, flat_labels, 0)]
    if z_loss:
        per_token = per_token + torch.where(counted, z_loss * w_y * torch.logsumexp(flat_logits, -1) ** 2, 0.0)
    if reduction == "none":
        return per_token.reshape(labels.shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    # Every label ignored (or weighing 0): loss 0, not 0/0; with num_items given, it is the divisor.
    if num_items is None:
        divisor = torch.where(counted, w_y, 0.0).sum()
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        divisor = num_items
    return total / divisor


def linear_log_probs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    shift: bool = False,
    compute_dtype: torch.dtype = torch.float32,
):
    """The semantics of fused_cel.linear_log_probs with every statistic: (log_probs, entropy,
    top1, mean_logit, log_sum_sq_probs), each 0 (False) where the label is ignored."""
    logits, labels = _logits(hidden, weight, labels, bias, softcap, logit_scale, temperature, shift, compute_dtype)
    log_p = torch.log_softmax(logits, -1)
    ignored = labels == ignore_index
    y = torch.where(ignored, 0, labels).long()[..., None]
    stats = (
        log_p.gather(-1, y).squeeze(-1),
        -(log_p.exp() * log_p).sum(-1),
        logits.argmax(-1) == y.squeeze(-1),  # the first maximum: ties go to the lowest index
        logits.mean(-1),
        torch.logsumexp(2 * log_p, -1),
    )
    return tuple(torch.where(ignored, torch.zeros((), dtype=t.dtype), t) for t in stats)


def _logits(hidden, weight, labels, bias, softcap, logit_scale, temperature, shift, compute_dtype):
    """The logits the loss sees (upcast, scaled, capped, over the temperature) and their labels."""
    logits = F.linear(hidden, weight, bias).to(compute_dtype) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    return logits, labels
