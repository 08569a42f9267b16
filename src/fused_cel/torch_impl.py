"""Pure-PyTorch cross-entropy over one chunk of logits: the fallback of kernels.ce_chunk.

Same contract as the Triton launcher, written with torch ops so that it runs anywhere (CPU, or a
GPU without Triton) and reads as the statement of what the kernel computes. It works in fp32
temporaries the size of the chunk, never of the whole batch.
"""

from __future__ import annotations

import torch


def transform(z: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    """Raw logits -> the logits the loss sees: scale, then the optional tanh softcap."""
    u = z * logit_scale
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    return u


def ce_chunk(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor | None,
    lse: torch.Tensor,
    grad_scale: torch.Tensor | None,
    target_grad: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    compute_lse: bool,
    write_grad: bool,
) -> None:
    """See fused_cel.kernels.ce_chunk: identical arguments and effects."""
    rows, V = logits.shape
    if rows == 0:
        return
    u = transform(logits.float(), logit_scale, softcap)
    targets = targets.long()
    ignored = targets == ignore_index
    valid = (targets >= 0) & (targets < V)
    safe = torch.where(valid, targets, 0)

    if compute_lse:
        # log_softmax forms (u - max) - log(sum): no cancellation for the likeliest classes.
        log_p = torch.log_softmax(u, dim=-1)
        lse.copy_(torch.logsumexp(u, dim=-1))
        per_token = (1.0 - label_smoothing) * -log_p.gather(1, safe[:, None]).squeeze(1)
        per_token = per_token - label_smoothing * log_p.mean(dim=-1)
        per_token = per_token + z_loss * lse * lse
        per_token = torch.where(valid, per_token, float("nan"))
        loss.copy_(torch.where(ignored, 0.0, per_token))

    if write_grad:
        # dlogits = d + target_grad * onehot(targets): the target entry stays in fp32 (kernels.py).
        coef = torch.where(ignored | ~valid, 0.0, grad_scale.float().expand(rows)) * logit_scale
        p = torch.exp(log_p) if compute_lse else torch.exp(u - lse[:, None])
        d = p * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / V
        du_dz = 1.0 - (u / softcap) ** 2 if softcap is not None else torch.ones_like(u)
        d *= du_dz * coef[:, None]
        p_y = p.gather(1, safe[:, None]).squeeze(1)
        g_y = (1.0 - label_smoothing) * (p_y - 1.0) + label_smoothing * (p_y - 1.0 / V) + 2.0 * z_loss * lse * p_y
        target_grad.copy_(g_y * du_dz.gather(1, safe[:, None]).squeeze(1) * coef)
        d.scatter_(1, safe[:, None], 0.0)
        logits.copy_(d)
