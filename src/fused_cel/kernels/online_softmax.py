"""Triton kernel: one vocabulary block of the low-memory plan's token sweep (online softmax).

The sweep (fused_cel.low_memory.token_sweep) walks W in blocks of rows, as flash attention walks
keys. Per block and token this continues the running statistics (max m, sum of exp(u - m), sum
of u, target logit) over the block's columns, writes alpha = exp(m before - m after), by which
the caller rescales what it has summed so far, and (WRITE_P) overwrites the block with
P = exp(u - m) du/dz, its target column 0: the caller multiplies P into its fp32 dX sum. Label
smoothing and the z-loss enter at the end, in the caller.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import common


@triton.heuristics({**common.HAS_SOFTCAP, **common.ROUND_BF16})
@triton.jit
def _online_softmax_kernel(
    logits_ptr,  # *T [rows, V]: a block of the vocabulary's logits; overwritten by P if WRITE_P
    logits_stride,
    targets_ptr,  # *int32|int64 [rows]: global ids
    running_ptr,  # *fp32 [rows, 4]: in and out, (m, sum of exp(u - m), sum of u, target logit or 0)
    alpha_ptr,  # *fp32 [rows]: out, exp(m before this block - m after)
    V,  # columns of the block
    vocab_start,  # global id of column 0
    vocab_total,  # the whole vocabulary
    ignore_index,
    softcap,  # None: no softcap
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    WRITE_P: tl.constexpr,  # overwrite the block with P
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    at = running_ptr + row * 4
    target = tl.load(targets_ptr + row).to(tl.int64)
    local, here, u_y = common.target_logit(row_ptr, target, vocab_start, V, logit_scale, softcap, HAS_SOFTCAP)
    m_old = tl.load(at)
    unused = tl.zeros((), tl.float32)  # the token statistics' sums (not here)
    m, s, u_sum, _, _, _, _ = common.row_stats(row_ptr, V, local, m_old, tl.load(at + 1), tl.load(at + 2), unused,
                                               unused, unused, unused, None, logit_scale, softcap, HAS_SOFTCAP, False,
                                               False, BLOCK_V)  # fmt: skip
    tl.store(at, m)
    tl.store(at + 1, s)
    tl.store(at + 2, u_sum)
    tl.store(at + 3, tl.load(at + 3) + tl.where(here, u_y, 0.0))
    tl.store(alpha_ptr + row, tl.exp(m_old - m))
    if WRITE_P:
        valid = (target >= 0) & (target < vocab_total)
        coef = tl.where(valid & (target != ignore_index), logit_scale, 0.0)
        common.write_grad(row_ptr, V, local, m, 0.0, 1.0, coef, 0.0, vocab_total, logit_scale, softcap, 0.0, 0.0,
                          None, HAS_SOFTCAP, False, False, False, BLOCK_V, ROUND_BF16)  # fmt: skip


def online_softmax(logits, targets, running, alpha, opts, *, vocab_start, vocab_total, write_p) -> None:
    """Continue ``running`` ([rows, 4] fp32: max m, sum of exp(u - m), sum of u, target logit or
    0) over the columns of ``logits`` [rows, V], global ids vocab_start .. of vocab_total; alpha
    [rows] <- exp(m before - m after); with ``write_p`` the block is overwritten with
    exp(u - m) du/dz (target column 0, ignored tokens 0)."""
    common.launch_rows(
        _online_softmax_kernel,
        logits,
        targets,
        running,
        alpha,
        logits.shape[1],
        vocab_start,
        vocab_total,
        opts.ignore_index,
        opts.softcap,
        opts.logit_scale,
        WRITE_P=write_p,
    )
