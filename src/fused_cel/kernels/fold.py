"""Triton kernel: the target fold, dst rows += coef * src rows, in fp32 with no temporaries.

The gradient's target entries leave the chunk kernels as one fp32 number per token (a); this
adds them into the fp32 sums: dX_c[t] += a_t W[y_t] (a gather) and dW[y_t] += a_t X_c[t] (a
scatter, atomic: several tokens may share a target).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fold_kernel(
    dst_ptr,  # *fp32 [rows, D]: the accumulator (dX tile, dW or a block of it)
    dst_stride,  # elements between rows of dst
    dst_index_ptr,  # *int64 [n]: token t adds to dst row dst_index[t] (if DST_INDEXED; else row t)
    src_ptr,  # *T [rows, D]: what is added (X_c for dW, W for dX)
    src_stride,  # elements between rows of src
    src_index_ptr,  # *int64 [n]: token t adds src row src_index[t] (if not DST_INDEXED; else row t)
    coef_ptr,  # *fp32 [n]: token t's factor, the gradient at its target (0: nothing to add)
    D,  # columns of dst and src
    DST_INDEXED: tl.constexpr,  # scatter (atomic: several tokens may share a row) or gather
    BLOCK_D: tl.constexpr,  # columns per program, a power of two
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    a = tl.load(coef_ptr + t)
    if a != 0.0:
        if DST_INDEXED:
            src = tl.load(src_ptr + t * src_stride + cols, mask=mask).to(tl.float32)
            dst_row = tl.load(dst_index_ptr + t).to(tl.int64)
            tl.atomic_add(dst_ptr + dst_row * dst_stride + cols, a * src, mask=mask)
        else:
            src_row = tl.load(src_index_ptr + t).to(tl.int64)
            src = tl.load(src_ptr + src_row * src_stride + cols, mask=mask).to(tl.float32)
            dst = dst_ptr + t * dst_stride + cols
            tl.store(dst, tl.load(dst, mask=mask) + a * src, mask=mask)


def fold(
    dst: torch.Tensor,
    dst_index: torch.Tensor | None,
    src: torch.Tensor,
    src_index: torch.Tensor | None,
    coef: torch.Tensor,
) -> None:
    """dst[dst_index[t]] += coef[t] * src[t] (dW's target rows), or, with dst_index None,
    dst[t] += coef[t] * src[src_index[t]] (dX's): in fp32, with no [n, D] temporary. The scatter
    adds atomically, so rows shared by several tokens sum in no fixed order (as index_add_).
    Rows of unit column stride (the backend falls back to torch otherwise)."""
    n, D = coef.shape[0], dst.shape[1]
    if n == 0:
        return
    block_d = min(triton.next_power_of_2(D), 1024)
    index = dst_index if dst_index is not None else src_index
    _fold_kernel[(n, triton.cdiv(D, block_d))](
        dst,
        dst.stride(0),
        index,
        src,
        src.stride(0),
        index,
        coef,
        D,
        DST_INDEXED=dst_index is not None,
        BLOCK_D=block_d,
    )
