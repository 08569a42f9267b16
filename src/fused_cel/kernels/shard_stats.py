"""Triton kernel: a vocabulary shard's partial softmax statistics of each row of a chunk.

Rank r of a vocab-parallel group holds columns vocab_start .. vocab_start + V - 1; per token it
writes (max m_r, log sum exp(u - m_r), sum of u, the target's u or 0), which fused_cel.parallel
combines over the ranks into the loss and lse (with the token statistics, three sums more). Read
from the row, or (TILE_STATS) merged from the per-tile statistics the logits matmul wrote.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import common


@triton.heuristics(
    {
        **common.HAS_SOFTCAP,
        **common.TILES,
        "WEIGHTED": lambda a: a["w_ptr"] is not None,  # (the weighted sum whenever weights come: rare here)
        "STATS": lambda a: a["width"] >= 7,
    }
)
@triton.jit
def _shard_stats_kernel(
    logits_ptr,  # *T [rows, V]: read only
    logits_stride,
    targets_ptr,  # *int32|int64 [rows]: global ids
    stats_ptr,  # *fp32 [rows, width]: out
    width,  # 4, or 7 with the token statistics' sums; one more with class weights
    tile_ptr,  # *fp32 [2 or 3, rows, n_tiles] or None
    n_tiles,
    tile_plane,
    w_ptr,  # *fp32 [vocab]: class weights of the whole vocabulary; None: none
    V,  # columns of this shard
    vocab_start,  # global id of column 0
    softcap,  # None: no softcap
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    TILE_STATS: tl.constexpr,
    TILE_SUM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    WEIGHTED: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    w_cols = w_ptr  # these columns' weights
    if WEIGHTED:
        w_cols = w_ptr + vocab_start
    _, here, u_y = common.target_logit(row_ptr, target, vocab_start, V, logit_scale, softcap, HAS_SOFTCAP)
    m, s, u_sum, c, s2, mb, uw = common.stats_of_row(row_ptr, V, target - vocab_start, tile_ptr, row, n_tiles,
                                                     tile_plane, w_cols, logit_scale, softcap,
                                                     HAS_SOFTCAP, TILE_STATS, TILE_SUM, BLOCK_T, STATS, WEIGHTED,
                                                     BLOCK_V)  # fmt: skip
    at = stats_ptr + row * width
    tl.store(at, m)
    tl.store(at + 1, tl.log(s))
    tl.store(at + 2, u_sum)
    tl.store(at + 3, tl.where(here, u_y, 0.0))
    if STATS:
        tl.store(at + 4, c)
        tl.store(at + 5, s2)
        tl.store(at + 6, mb)
    if WEIGHTED:
        tl.store(at + width - 1, uw)


def shard_stats(logits, targets, stats, opts, *, vocab_start, tile_stats=None, class_weight=None) -> None:
    """stats [rows, 4] fp32 <- (max m, log sum exp(u - m), sum, target logit or 0) of each row's
    transformed logits over this shard's columns (global ids vocab_start ..); [rows, 7]: also the
    token statistics' sums (common.row_stats: c, s2, and the max of the columns before the
    target's), not with tile_stats; with ``class_weight`` ([vocab] fp32) a last column, the sum of
    w u over the shard's columns."""
    common.launch_rows(
        _shard_stats_kernel,
        logits,
        targets,
        stats,
        stats.shape[1],
        *common.tile_args(tile_stats),
        class_weight,
        logits.shape[1],
        vocab_start,
        opts.softcap,
        opts.logit_scale,
    )
