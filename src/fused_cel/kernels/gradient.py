"""Triton kernel: the gradient of a chunk of logits in place, from each token's known lse.

What backward of reduction "none" runs (with each token's grad_output as its scale), what the
low-memory plan's vocabulary pass runs on each block of W, and a vocabulary shard's second pass
(after the ranks have combined their statistics into the lse). The columns are global ids
vocab_start .. vocab_start + V - 1 of a vocabulary of vocab_total; a target outside them has no
column here (target gradient 0, every column dense).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import common


@triton.heuristics(
    {
        **common.HAS_SOFTCAP,
        **common.WEIGHTED,
        "ENT_GRAD": lambda a: a["ent_scale_ptr"] is not None,  # the entropy's gradient too
        **common.ROUND_BF16,
    }
)
@triton.jit
def _gradient_kernel(
    logits_ptr,  # *T [rows, V]: overwritten by the gradient
    logits_stride,
    targets_ptr,  # *int32|int64 [rows]: global ids
    lse_ptr,  # *fp32 [rows]: each token's log-sum-exp over the whole vocabulary
    scale_ptr,  # *fp32 [1 or rows]
    scale_stride,  # 0 or 1
    target_grad_ptr,  # *fp32 [rows]: out, the gradient at the target (0 if not in these columns)
    ent_scale_ptr,  # *fp32 [rows]: each token's multiplier of its entropy's gradient; None: none
    entropy_ptr,  # *fp32 [rows]: each token's entropy (read with ent_scale_ptr)
    w_ptr,  # *fp32 [vocab_total]: class weights of the whole vocabulary; None: none
    w_total_ptr,  # *fp32 [1]: their sum
    V,  # columns of this block or shard
    vocab_start,  # global id of column 0
    vocab_total,  # the whole vocabulary
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,  # None: no softcap
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    WEIGHTED: tl.constexpr,
    COLUMN_WEIGHTS: tl.constexpr,
    ENT_GRAD: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    local, here, u_y = common.target_logit(row_ptr, target, vocab_start, V, logit_scale, softcap, HAS_SOFTCAP)
    valid = (target >= 0) & (target < vocab_total)
    lse = tl.load(lse_ptr + row)
    counts = valid & (target != ignore_index)
    coef = tl.where(counts, tl.load(scale_ptr + row * scale_stride).to(tl.float32) * logit_scale, 0.0)
    w_y = 1.0
    w_total = 1.0
    w_cols = w_ptr  # these columns' weights
    if WEIGHTED:
        w_y = tl.load(w_ptr + tl.where(valid, target, 0))
        w_total = tl.load(w_total_ptr)
        w_cols = w_ptr + vocab_start
    g_y = common.grad_at_target(u_y, lse, 0.0, lse, vocab_total, label_smoothing, z_loss, w_y, w_total, WEIGHTED)
    g_y = g_y * coef
    ent_coef = 0.0
    mean_u = 0.0
    if ENT_GRAD:  # H = lse - E_p[u]
        ent_coef = tl.where(counts, tl.load(ent_scale_ptr + row) * logit_scale, 0.0)
        mean_u = lse - tl.load(entropy_ptr + row)
        g_y += ent_coef * common.entropy_grad(u_y, lse, 0.0, mean_u)
    if HAS_SOFTCAP:
        g_y = g_y * common.softcap_grad(u_y, 1.0 / softcap)
    tl.store(target_grad_ptr + row, tl.where(here, g_y, 0.0))
    a = common.p_coef(lse, vocab_total, label_smoothing, z_loss, w_y, w_total, WEIGHTED)
    common.write_grad(row_ptr, V, local, lse, 0.0, a, coef, label_smoothing, vocab_total, logit_scale, softcap,
                      ent_coef, mean_u, w_cols, HAS_SOFTCAP, ENT_GRAD, COLUMN_WEIGHTS, False, BLOCK_V,
                      ROUND_BF16)  # fmt: skip


def gradient(
    logits,
    targets,
    lse,
    scale,
    target_grad,
    opts,
    *,
    vocab_start=0,
    vocab_total=None,
    ent_scale=None,
    entropy=None,
    class_weight=None,
    class_weight_sum=None,
) -> None:
    """Overwrite ``logits`` [rows, V] with the gradient, times ``scale``, given each token's lse;
    target_grad [rows] receives the gradient at each target (see kernels.cross_entropy). The
    columns are global ids vocab_start .. vocab_start + V - 1 of a vocabulary of vocab_total
    (default V). With ``ent_scale`` ([rows] fp32) and ``entropy`` ([rows], each token's): plus
    ent_scale times the entropy's gradient. ``class_weight`` ([vocab_total] fp32, the whole
    vocabulary's) and ``class_weight_sum`` ([1]): F.cross_entropy's weight=."""
    common.launch_rows(
        _gradient_kernel,
        logits,
        targets,
        lse,
        scale,
        0 if scale.numel() == 1 else 1,
        target_grad,
        ent_scale,
        entropy,
        class_weight,
        class_weight_sum,
        logits.shape[1],
        vocab_start,
        logits.shape[1] if vocab_total is None else vocab_total,
        opts.ignore_index,
        opts.label_smoothing,
        opts.z_loss,
        opts.softcap,
        opts.logit_scale,
    )
