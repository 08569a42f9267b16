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


def token_loss(m, log_s, u_sum, u_y, targets, loss, lse, vocab_total, ignore_index, label_smoothing, z_loss):
    """Per-token loss and lse from the row's max m, log_s = log sum exp(u - m), the sum of u and
    the target's u (all fp32 [rows]); written into loss and lse. Also combines the shards'
    statistics in fused_cel.parallel. (m - u_y) + log_s, as log_softmax forms it: no
    cancellation for the likeliest class."""
    lse.copy_(m + log_s)
    per_token = (1.0 - label_smoothing) * ((m - u_y) + log_s)
    per_token = per_token + label_smoothing * ((m - u_sum / vocab_total) + log_s)
    per_token = per_token + z_loss * lse * lse
    targets = targets.long()
    per_token = torch.where((targets >= 0) & (targets < vocab_total), per_token, float("nan"))
    loss.copy_(torch.where(targets == ignore_index, 0.0, per_token))


def target_grad_coef(p_y, lse, vocab_total, label_smoothing, z_loss):
    """d(loss)/du at the target column from p_y (fp32 [rows]), before du/dz and the token's scale:
    p_y - 1 is formed first, so a confident token loses nothing to cancellation."""
    g_y = (1.0 - label_smoothing) * (p_y - 1.0) + label_smoothing * (p_y - 1.0 / vocab_total)
    return g_y + 2.0 * z_loss * lse * p_y


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
    vocab_start: int = 0,
    vocab_total: int | None = None,
    stats: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
) -> None:
    """See fused_cel.kernels.ce_chunk: identical arguments and effects."""
    rows, V = logits.shape
    if rows == 0:
        return
    vocab_total = V if vocab_total is None else vocab_total
    u = transform(logits.float(), logit_scale, softcap)
    targets = targets.long()
    ignored = targets == ignore_index
    valid = (targets >= 0) & (targets < vocab_total)
    local = targets - vocab_start  # the target's column, if this shard holds it
    here = (local >= 0) & (local < V)
    safe = torch.where(here, local, 0)
    u_y = torch.where(here, u.gather(1, safe[:, None]).squeeze(1), 0.0)

    if compute_lse and alpha is not None:  # online: continue the running statistics
        m_old, s_old, sum_old, u_y_old = stats.clone().unbind(1)
        m = torch.maximum(m_old, u.max(dim=-1).values)
        s = s_old * torch.exp(m_old - m) + torch.exp(u - m[:, None]).sum(dim=-1)
        stats.copy_(torch.stack([m, s, sum_old + u.sum(dim=-1), u_y_old + u_y], dim=1))
        alpha.copy_(torch.exp(m_old - m))
        lse, log_s = m, torch.zeros_like(m)  # pass 2: exp(u - m), relative to the running max
    elif compute_lse:
        m = u.max(dim=-1).values
        log_s = torch.log(torch.exp(u - m[:, None]).sum(dim=-1))
        if stats is not None:  # this shard's partial statistics, combined by fused_cel.parallel
            stats.copy_(torch.stack([m, log_s, u.sum(dim=-1), u_y], dim=1))
        else:
            token_loss(
                m, log_s, u.sum(dim=-1), u_y, targets, loss, lse, vocab_total, ignore_index, label_smoothing, z_loss
            )

    if write_grad:
        # dlogits = d + target_grad * onehot(targets): the target entry stays in fp32 (kernels.py).
        coef = torch.where(ignored | ~valid, 0.0, grad_scale.float().expand(rows)) * logit_scale
        # p = exp((u - m) - log_s) with pass 1's m and log_s, as the kernel: else from lse.
        m, log_s = (m, log_s) if compute_lse else (lse, torch.zeros_like(lse))
        p = torch.exp((u - m[:, None]) - log_s[:, None])
        d = p * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / vocab_total
        du_dz = 1.0 - (u / softcap) ** 2 if softcap is not None else torch.ones_like(u)
        d *= du_dz * coef[:, None]
        p_y = torch.exp((u_y - m) - log_s)
        g_y = target_grad_coef(p_y, lse, vocab_total, label_smoothing, z_loss)
        du_dz_y = du_dz.gather(1, safe[:, None]).squeeze(1)
        target_grad.copy_(torch.where(here, g_y * du_dz_y * coef, 0.0))
        d.scatter_(1, safe[:, None], torch.where(here, 0.0, d.gather(1, safe[:, None]).squeeze(1))[:, None])
        logits.copy_(d)


def fold(
    dst: torch.Tensor,
    dst_index: torch.Tensor | None,
    src: torch.Tensor,
    src_index: torch.Tensor | None,
    coef: torch.Tensor,
) -> None:
    """See fused_cel.kernels.fold (here with an [n, D] fp32 temporary)."""
    if dst_index is not None:
        dst.index_add_(0, dst_index, coef[:, None] * src)
    else:
        dst.addcmul_(coef[:, None], src[src_index])


def tile_stats(logits: torch.Tensor, n_valid: int, tile: int, logit_scale: float, softcap: float | None):
    """The statistics fused_cel.matmul.logits_stats writes next to the logits, from the logits:
    [3, rows, tiles] fp32, per row and tile of ``tile`` columns of the first n_valid, the max m of
    the transformed logits u, the sum of exp(u - m) and the sum of u."""
    u = transform(logits[:, :n_valid].float(), logit_scale, softcap)
    tiles = -(-n_valid // tile)
    u = torch.nn.functional.pad(u, (0, tiles * tile - n_valid), value=float("-inf")).view(len(u), tiles, tile)
    m = u.amax(-1)
    return torch.stack((m, (u - m[..., None]).exp().sum(-1), torch.where(u == float("-inf"), 0.0, u).sum(-1)))
