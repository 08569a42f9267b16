"""Triton kernel: rows times a factor, computed in fp32 and rounded once to the output's dtype.

The casts of the fp32 gradient sums at the memory's speed (torch.mul with a dtype change does
not reach it), and the token sweep's rescaling of its dX sums by rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import round_bf16


@triton.jit
def _scale_kernel(
    x_ptr,  # *T [rows, n]: read, row r times scale[r]
    out_ptr,  # *U [rows, n] (same strides): written; x_ptr itself when IN_PLACE
    scale_ptr,  # *fp32 [rows]: the factors
    n,  # elements per row
    x_stride,  # elements between rows
    BLOCK: tl.constexpr,  # elements per program
    IN_PLACE: tl.constexpr,  # out is x: a row whose factor is 1 is not read at all
    ROUND_BF16: tl.constexpr,  # round by bits (the CPU interpreter truncates)
):
    r = tl.program_id(1)
    s = tl.load(scale_ptr + r)
    if not IN_PLACE or s != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        row = r.to(tl.int64) * x_stride + offs
        x = tl.load(x_ptr + row, mask=mask).to(tl.float32) * s
        if ROUND_BF16:
            x = round_bf16(x)
        tl.store(out_ptr + row, x.to(out_ptr.dtype.element_ty), mask=mask)


def _scale(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, rows: int, n: int, stride: int) -> None:
    block = 4096
    round_bf16 = x.device.type == "cpu" and out.dtype == torch.bfloat16
    _scale_kernel[(triton.cdiv(n, block), rows)](
        x, out, scale, n, stride, BLOCK=block, IN_PLACE=out is x, ROUND_BF16=round_bf16, num_warps=8
    )


def scale_into(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """out = x * scale (a one-element fp32 tensor), computed in fp32 and rounded once to out's
    dtype."""
    if not (x.is_contiguous() and out.is_contiguous()) or x.shape != out.shape:
        return torch.mul(x, scale, out=out)
    if x.numel():
        _scale(x, out, scale, 1, x.numel(), 0)
    return out


def scale_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x *= scale (a one-element fp32 tensor) in place, rounded once; when scale is 1 (the usual
    grad_output) the kernel reads only the scale, so an already-rounded gradient costs no pass
    over its memory, and the host never looks at the value."""
    if not x.is_contiguous() or x.numel() == 0:
        return x.mul_(scale)
    _scale(x, x, scale, 1, x.numel(), 0)
    return x


def scale_rows_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x[r] *= scale[r] in place (x [rows, n] with unit column stride, scale [rows] fp32); rows
    whose factor is 1 (the running max did not move) are not touched."""
    if x.stride(1) != 1 or x.shape[0] > 65535:
        return x.mul_(scale[:, None])
    if x.numel():
        _scale(x, x, scale, x.shape[0], x.shape[1], x.stride(0))
    return x
