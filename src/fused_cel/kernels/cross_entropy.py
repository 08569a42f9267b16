"""Triton kernel: the cross-entropy of a chunk of logits, loss and gradient in one launch.

One program per token (a row of the chunk), walking the vocabulary BLOCK_V columns at a time:
  pass 1  online softmax in fp32 registers (max, sum of exp, sum of u for label smoothing),
          or with TILE_STATS a merge of the statistics the logits matmul wrote (no read of the
          row) -> the token's loss and log-sum-exp;
  pass 2  (WRITE_GRAD) re-reads the row and overwrites it with d(loss)/d(logits) times the
          token's scale, except the target column: written 0, its gradient goes out as one
          fp32 number per token (target_grad). The caller folds it into dX, dW and db in fp32:
          the target entries are the gradient's largest, and rounding them to bf16 (as plain
          PyTorch does) puts a systematic error into every gradient.
The token statistics (STATS: entropy, top-1, mean logit, log sum p**2) come from pass 2 where
there is one (the p it computes for the gradient, summed per lane: a few operations a column),
else from pass 1 (three more sums and a max there).
Row offsets are 64-bit. Ignored tokens get loss 0 and gradient 0; a label outside [0, V) that is
not ignore_index gets a NaN loss (never an out-of-bounds read).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import common


@triton.heuristics(
    {
        **common.HAS_SOFTCAP,
        **common.TILES,
        **common.WEIGHTED,
        "WRITE_GRAD": lambda a: a["target_grad_ptr"] is not None,  # pass 2
        "STATS": lambda a: a["entropy_ptr"] is not None,  # the token statistics ...
        "ROW_STATS": lambda a: a["entropy_ptr"] is not None and a["target_grad_ptr"] is None,  # ... from pass 1
        **common.ROUND_BF16,
    }
)
@triton.jit
def _cross_entropy_kernel(
    logits_ptr,  # *T [rows, V]: the chunk's logits; overwritten by the gradient if WRITE_GRAD
    logits_stride,  # elements from one row to the next
    targets_ptr,  # *int32|int64 [rows]
    loss_ptr,  # *fp32 [rows]: out
    lse_ptr,  # *fp32 [rows]: out
    scale_ptr,  # *fp32 [1 or rows]: each token's gradient multiplier (if WRITE_GRAD)
    scale_stride,  # 0: one multiplier for all tokens, 1: one per token
    target_grad_ptr,  # *fp32 [rows]: out, each token's gradient at its target; None: no pass 2
    entropy_ptr,  # *fp32 [rows]: out, each token's entropy (0 where ignored); None: no statistics
    extras_ptr,  # *fp32 [rows, 3]: out: target is the first argmax (1/0), mean u, log sum p**2 (0 where ignored)
    tile_ptr,  # *fp32 [2 or 3, rows, n_tiles]: the matmul's per-tile statistics; None: read the row
    n_tiles,  # column tiles of tile_ptr
    tile_plane,  # rows * n_tiles
    w_ptr,  # *fp32 [V]: class weights; None: none (not with tile_ptr)
    w_total_ptr,  # *fp32 [1]: their sum
    V,  # columns: the vocabulary
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,  # None: no softcap
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    TILE_STATS: tl.constexpr,
    TILE_SUM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    WEIGHTED: tl.constexpr,
    COLUMN_WEIGHTS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    STATS: tl.constexpr,
    ROW_STATS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_V: tl.constexpr,  # columns per step
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    _, valid, u_y = common.target_logit(row_ptr, target, 0, V, logit_scale, softcap, HAS_SOFTCAP)
    ignored = target == ignore_index
    w_y = 1.0
    w_total = 1.0
    if WEIGHTED:
        w_y = tl.load(w_ptr + tl.where(valid, target, 0))
        w_total = tl.load(w_total_ptr)
    m, s, u_sum, c, s2, mb, uw = common.stats_of_row(row_ptr, V, target, tile_ptr, row, n_tiles, tile_plane, w_ptr,
                                                     logit_scale, softcap, HAS_SOFTCAP, TILE_STATS, TILE_SUM, BLOCK_T,
                                                     ROW_STATS, COLUMN_WEIGHTS, BLOCK_V)  # fmt: skip
    log_s = tl.log(s)
    lse = m + log_s
    if WEIGHTED:  # the smoothing term weighs each column
        loss = common.token_loss(m, log_s, uw, u_y, V, label_smoothing, z_loss, w_y, w_total, WEIGHTED)
    else:
        loss = common.token_loss(m, log_s, u_sum, u_y, V, label_smoothing, z_loss, w_y, w_total, WEIGHTED)
    loss = tl.where(valid, loss, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(lse_ptr + row, lse)
    pu, p2 = c / s, s2 / (s * s)  # the statistics from pass 1 (ROW_STATS); pass 2 gives them otherwise
    if WRITE_GRAD:
        coef = tl.load(scale_ptr + row * scale_stride).to(tl.float32) * logit_scale
        coef = tl.where(valid & (target != ignore_index), coef, 0.0)
        g_y = common.grad_at_target(u_y, m, log_s, lse, V, label_smoothing, z_loss, w_y, w_total, WEIGHTED)
        if HAS_SOFTCAP:
            g_y = g_y * common.softcap_grad(u_y, 1.0 / softcap)
        tl.store(target_grad_ptr + row, tl.where(valid, g_y * coef, 0.0))
        a = common.p_coef(lse, V, label_smoothing, z_loss, w_y, w_total, WEIGHTED)
        pu, p2, mb = common.write_grad(row_ptr, V, target, m, log_s, a, coef, label_smoothing, V, logit_scale, softcap,
                                       0.0, 0.0, w_ptr, HAS_SOFTCAP, False, COLUMN_WEIGHTS, STATS, BLOCK_V,
                                       ROUND_BF16)  # fmt: skip
    if STATS:
        entropy, top1, mean_u, log_sum_sq = common.token_stats(m, log_s, u_sum, pu, p2, mb, u_y, V)
        tl.store(entropy_ptr + row, tl.where(ignored, 0.0, entropy))
        tl.store(extras_ptr + row * 3, tl.where(valid & (target != ignore_index) & top1, 1.0, 0.0))
        tl.store(extras_ptr + row * 3 + 1, tl.where(ignored, 0.0, mean_u))
        tl.store(extras_ptr + row * 3 + 2, tl.where(ignored, 0.0, log_sum_sq))


def cross_entropy(
    logits,
    targets,
    loss,
    lse,
    opts,
    *,
    scale=None,
    target_grad=None,
    tile_stats=None,
    entropy=None,
    extras=None,
    class_weight=None,
    class_weight_sum=None,
) -> None:
    """Loss and lse ([rows] fp32, written) of each row of ``logits`` [rows, V] (unit column
    stride); with ``target_grad`` ([rows] fp32) also the gradient, times ``scale`` (fp32, one
    element or rows): the row is overwritten with it, except the target column (0), and
    target_grad receives the gradient at the target, so that
        d(loss)/d(logits) = logits as written + target_grad[:, None] * onehot(targets).
    ``tile_stats`` ([2 or 3, rows, tiles] fp32, from kernels.logits): pass 1 merges them
    instead of reading the row. ``entropy`` ([rows] fp32) and ``extras`` ([rows, 3] fp32): each
    token's entropy, and whether its target is the first argmax (1 or 0), its mean logit and
    log sum p**2, all 0 where ignored (not with tile_stats). ``class_weight`` ([V] fp32) and
    ``class_weight_sum`` ([1] fp32): F.cross_entropy's weight= (not with tile_stats)."""
    # The statistics' extra work a column makes the kernel compute-bound: shorter steps and fewer
    # warps keep more rows in flight (experiments/stats-lanes)
    shape = {}
    if entropy is not None:
        shape = dict(block_max=1024, warps=4) if target_grad is not None else dict(block_max=512, warps=1)
    common.launch_rows(
        _cross_entropy_kernel,
        logits,
        targets,
        loss,
        lse,
        scale,
        0 if scale is None or scale.numel() == 1 else 1,
        target_grad,
        entropy,
        extras,
        *common.tile_args(tile_stats),
        class_weight,
        class_weight_sum,
        logits.shape[1],
        opts.ignore_index,
        opts.label_smoothing,
        opts.z_loss,
        opts.softcap,
        opts.logit_scale,
        **shape,
    )
