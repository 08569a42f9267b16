"""Triton kernel: a vocabulary shard's partial softmax statistics of each row of a chunk.

Rank r of a vocab-parallel group holds columns vocab_start .. vocab_start + V - 1; per token it
writes (max m_r, log sum exp(u - m_r), sum of u, the target's u or 0), which fused_cel.parallel
combines over the ranks into the loss and lse. Read from the row, or (TILE_STATS) merged from the
per-tile statistics the logits matmul wrote.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import common


@triton.heuristics({**common.HAS_SOFTCAP, **common.TILES})
@triton.jit
def _shard_stats_kernel(
    logits_ptr,  # *T [rows, V]: read only
    logits_stride,
    targets_ptr,  # *int32|int64 [rows]: global ids
    stats_ptr,  # *fp32 [rows, 4]: out
    tile_ptr,  # *fp32 [2 or 3, rows, n_tiles] or None
    n_tiles,
    tile_plane,
    V,  # columns of this shard
    vocab_start,  # global id of column 0
    softcap,  # None: no softcap
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    TILE_STATS: tl.constexpr,
    TILE_SUM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    _, here, u_y = common.target_logit(row_ptr, target, vocab_start, V, logit_scale, softcap, HAS_SOFTCAP)
    m, s, u_sum = common.stats_of_row(row_ptr, V, tile_ptr, row, n_tiles, tile_plane, logit_scale, softcap,
                                      HAS_SOFTCAP, TILE_STATS, TILE_SUM, BLOCK_T, BLOCK_V)  # fmt: skip
    tl.store(stats_ptr + row * 4, m)
    tl.store(stats_ptr + row * 4 + 1, tl.log(s))
    tl.store(stats_ptr + row * 4 + 2, u_sum)
    tl.store(stats_ptr + row * 4 + 3, tl.where(here, u_y, 0.0))


def shard_stats(logits, targets, stats, opts, *, vocab_start, tile_stats=None) -> None:
    """stats [rows, 4] fp32 <- (max, log-sum-exp - max, sum, target logit or 0) of each row's
    transformed logits over this shard's columns (global ids vocab_start ..)."""
    common.launch_rows(
        _shard_stats_kernel,
        logits,
        targets,
        stats,
        *common.tile_args(tile_stats),
        logits.shape[1],
        vocab_start,
        opts.softcap,
        opts.logit_scale,
    )
