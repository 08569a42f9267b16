"""Triton kernel: a chunk's logits X_c @ W.T (+ b) with the softmax statistics in the epilogue.

On the default route cuBLAS writes the logits and the cross-entropy kernel reads each row twice
(its statistics, then the gradient). Here the matmul's epilogue, which holds a [BM, BN] tile of
logits in registers anyway, also writes per row and per column tile the max m and sum of
exp(u - m) of the transformed logits u (and their sum, for label smoothing); the cross-entropy
kernel merges those ~V/256 numbers per row (common.tile_stats) and reads the row once, to write
the gradient. The statistics are those of the logits as stored, rounded to the compute dtype,
which is what the gradient pass reads back.

Persistent (one program per SM walking output tiles, grouped so that concurrent programs share
W's tiles in L2), loading through TMA descriptors on a GPU; the CPU interpreter (CI) runs the
same code with pointer loads. The route is opt-in (FUSED_CEL_MATMUL=triton, see usable): the
matmul is not cuBLAS's equal at every head, so the step gains at some heads and loses at others
(docs/benchmarks/h100-bench/matmul-route).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import round_bf16, transform

BM, BN, BK = 128, 256, 64  # output tile (tokens x vocabulary) and reduction step


class Config(NamedTuple):
    """A launch configuration of the logits kernel (experiments/matmul-tune swept them)."""

    bm: int = BM  # tile rows (tokens)
    bn: int = BN  # tile columns (vocabulary): also the statistics' granularity
    bk: int = BK  # reduction step
    stages: int = 3  # software pipeline depth
    warps: int = 8
    group_m: int = 8  # row blocks per swizzle group


def default_config(hidden: int) -> Config:
    """The configuration the chunk loop uses (the gemm probe's tuned ones, experiments/gemm-probe)."""
    return Config(stages=3 if hidden >= 3072 else 4)


INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Linear tile index -> (row block, column block): GROUP_M row blocks down each column before
    # moving right, so that programs running together read the same tiles of W.
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % size_m
    pid_n = (tile % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _mma(a, b, acc):
    # acc + a @ b in fp32. Triton's CPU interpreter multiplies 16-bit float operands of tl.dot
    # as their raw bit patterns; there they are widened first (exact products, same sums).
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.heuristics({"HAS_BIAS": lambda a: a["bias_ptr"] is not None, "HAS_SOFTCAP": lambda a: a["softcap"] is not None})
@triton.jit
def _logits_kernel(
    x,  # X_c [M, K]: a TensorDescriptor (block [BM, BK]) if USE_TMA, else the tensor
    w,  # W [N, K]: a descriptor (block [BN, BK]) or the tensor
    out,  # logits [M, N] in X's dtype: a descriptor (block [BM, BN // 2]) or the tensor
    bias_ptr,  # *T [N]: added to every row; None: no bias
    stats_ptr,  # *fp32 [3, M, n_tiles]: per row and column tile, max m, sum exp(u - m), sum u
    M,  # rows (tokens of the chunk)
    N,  # columns of out (the vocabulary, maybe padded with zero rows of W)
    K,  # hidden size
    n_valid,  # columns that are vocabulary (the statistics skip the padding)
    n_tiles,  # cdiv(n_valid, BN): column tiles with statistics
    plane,  # M * n_tiles: elements of one plane of stats
    stride_xm,  # elements between rows of X (pointer loads)
    stride_wn,  # elements between rows of W (pointer loads)
    stride_om,  # elements between rows of out (pointer stores)
    logit_scale,  # u = logit_scale * z ...
    softcap,  # ... then softcap * tanh(u / softcap); None: no softcap
    HAS_BIAS: tl.constexpr,  # add bias_ptr
    HAS_SOFTCAP: tl.constexpr,  # apply the softcap in the statistics
    SUM_U: tl.constexpr,  # write the third plane (sum of u, for label smoothing)
    USE_TMA: tl.constexpr,  # x, w, out are TensorDescriptors
    OUT_FP16: tl.constexpr,  # logits in fp16 (else bf16)
    ROUND_BF16: tl.constexpr,  # round bf16 by bits (the interpreter truncates)
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns (the statistics' granularity)
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row blocks per swizzle group
    NUM_PROGRAMS: tl.constexpr,  # the persistent grid's size
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    ks = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:  # rows, columns and K past the end load as zeros
            for ki in range(k_tiles):
                acc = _mma(x.load([off_m, ki * BLOCK_K]), w.load([off_n, ki * BLOCK_K]).T, acc)
        else:  # rows and columns past the end read row 0 (discarded); K is masked
            x_ptrs = x + tl.where(rows < M, rows, 0).to(tl.int64)[:, None] * stride_xm + ks[None, :]
            w_ptrs = w + tl.where(cols < N, cols, 0).to(tl.int64)[:, None] * stride_wn + ks[None, :]
            for ki in range(k_tiles):
                k_ok = (ks < K - ki * BLOCK_K)[None, :]
                a = tl.load(x_ptrs, mask=k_ok, other=0.0)
                b = tl.load(w_ptrs, mask=k_ok, other=0.0)
                acc = _mma(a, b.T, acc)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if ROUND_BF16:
            z = round_bf16(acc)
        elif OUT_FP16:
            z = acc.to(tl.float16)
        else:
            z = acc.to(tl.bfloat16)
        # Statistics of the stored (rounded) logits; every tile with statistics has a valid column.
        if pid_n < n_tiles:
            ok = (cols < n_valid)[None, :]
            u = tl.where(ok, transform(z.to(tl.float32), logit_scale, softcap, HAS_SOFTCAP), float("-inf"))
            m = tl.max(u, axis=1)
            s = tl.sum(tl.exp(u - m[:, None]), axis=1)
            at = stats_ptr + rows.to(tl.int64) * n_tiles + pid_n
            tl.store(at, m, mask=rows < M)
            tl.store(at + plane, s, mask=rows < M)
            if SUM_U:
                tl.store(at + 2 * plane, tl.sum(tl.where(ok, u, 0.0), axis=1), mask=rows < M)
        if USE_TMA:  # stored in two halves: less shared memory next to the pipeline's stages
            left, right = tl.split(tl.permute(tl.reshape(z, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            out.store([off_m, off_n], left)
            out.store([off_m, off_n + BLOCK_N // 2], right)
        else:
            o_ptrs = out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
            tl.store(o_ptrs, z, mask=(rows < M)[:, None] & (cols < N)[None, :])


def n_tiles(vocab: int, bn: int = BN) -> int:
    """Column tiles with statistics for a vocabulary of ``vocab`` (tiles of bn columns): the stats
    tensor is [2 or 3, M, n_tiles]."""
    return triton.cdiv(vocab, bn)


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the chunk loop takes the logits from logits_stats (else cuBLAS, and the two-pass
    cross-entropy). Opt-in, FUSED_CEL_MATMUL=triton: bf16 or fp16 operands on a CUDA GPU whose
    rows TMA can load, or CPU tensors under TRITON_INTERPRET=1."""
    if os.environ.get("FUSED_CEL_MATMUL", "auto") != "triton":
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        return False
    if x.device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return x.device.type == "cuda" and _tma_ok(x, w)


def _tma_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    # TMA: unit column stride, 16-byte aligned base and row strides (else pointer loads).
    return all(t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0 for t in (x, w))


@functools.cache
def _programs(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def logits_stats(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    stats: torch.Tensor,
    *,
    n_valid: int,
    logit_scale: float,
    softcap: float | None,
    sum_u: bool,
    config: Config | None = None,
) -> None:
    """out = x @ w.T (+ bias), rounded once to x's dtype, and the statistics of its first
    ``n_valid`` columns after the transform (logit_scale, softcap): stats[0, r, t] = max of row r's
    tile t (columns t*BN .. t*BN + BN - 1), stats[1, r, t] = sum of exp(u - that max) and, if
    ``sum_u``, stats[2, r, t] = sum of u. x [M, K], w [N, K], out [M, N] (unit column strides),
    stats fp32 [2 or 3, M, n_tiles(n_valid, config.bn)] contiguous. config: default_config(K) if None."""
    (M, K), N = x.shape, w.shape[0]
    cfg = config or default_config(K)
    tiles = n_tiles(n_valid, cfg.bn)
    if stats.shape != (2 + sum_u, M, tiles) or not stats.is_contiguous() or out.shape != (M, N):
        raise ValueError(f"logits_stats: out {tuple(out.shape)} / stats {tuple(stats.shape)} do not fit x, w")
    if M == 0:
        return
    use_tma = x.device.type == "cuda" and _tma_ok(x, w) and _tma_ok(out, out)
    programs = min(_programs(x.device) if use_tma else 4, triton.cdiv(M, cfg.bm) * triton.cdiv(N, cfg.bn))
    a, b, c = x, w, out
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a = TensorDescriptor.from_tensor(x, [cfg.bm, cfg.bk])
        b = TensorDescriptor.from_tensor(w, [cfg.bn, cfg.bk])
        c = TensorDescriptor.from_tensor(out, [cfg.bm, cfg.bn // 2])
    _logits_kernel[(programs,)](
        a,
        b,
        c,
        bias,
        stats,
        M,
        N,
        K,
        n_valid,
        tiles,
        M * tiles,
        x.stride(0),
        w.stride(0),
        out.stride(0),
        logit_scale,
        softcap,
        SUM_U=sum_u,
        USE_TMA=use_tma,
        OUT_FP16=x.dtype == torch.float16,
        ROUND_BF16=not use_tma and x.dtype == torch.bfloat16,
        BLOCK_M=cfg.bm,
        BLOCK_N=cfg.bn,
        BLOCK_K=cfg.bk,
        GROUP_M=cfg.group_m,
        NUM_PROGRAMS=programs,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
