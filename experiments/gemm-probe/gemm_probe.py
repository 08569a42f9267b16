"""Probe: can Triton GEMMs with the cross-entropy fused into them beat cuBLAS + a separate CE pass?

Per chunk of M tokens the library does today (cuBLAS + one Triton row kernel):
    Z  = X @ W^T            [M, V] bf16            (cuBLAS)
    CE pass: read Z twice (lse), write G = softmax(Z) over Z in place (the row kernel)
    dX = G @ W              [M, D] fp32            (cuBLAS)
    dW += G^T @ X           [V, D] fp32            (cuBLAS)
This script times the fused alternative, written here as three persistent Triton kernels:
    A  Z = X @ W^T with an epilogue that also writes, per row and per BN-column tile of the logits
       just rounded to bf16, m = max and s = sum exp(z - m); a tiny kernel folds them into lse.
    B  dX = G @ W with G = exp(Z - lse) formed as the A operand is loaded (a "prologue"),
       split-K over the last partial wave, fp32 atomics for the split tiles.
    C  dW += G^T @ X with the same prologue on a transposed load, read-add-write epilogue.
(The one-hot part of the gradient, -1 at each target, is a rank-M sparse correction that both
schemes apply separately; it is left out here.)

Rows of the table, per shape (M, N = V, K = D); "speed" = the reference's time / this time:
    cublas_logits  torch.mm(X, W^T)                   A_plain / A_stats  kernel A without / with stats
    lse_reduce     stats -> lse                       ce_pass   the separate pass (2 reads + 1 write;
    g_write        G from a given lse (1 read + 1 write)          a Triton row kernel like fused_cel's)
    torch_dx       mm(G, W, out_dtype=fp32)           B_plain / B_fused  kernel B on G / on Z + lse
    torch_dw       addmm(dW, G^T, X) in fp32          C_plain / C_fused  kernel C on G / on Z + lse
    PIPE_*         sums: current = cublas_logits + ce_pass + torch_dx + torch_dw;
                   fused = A_stats + lse_reduce + B_fused + C_fused; hybrid = A_stats + lse_reduce
                   + g_write + torch_dx + torch_dw; triton_noprol = ... + g_write + B_plain + C_plain
The *_plain kernels run the config their fused twin was tuned to (--tune-plain: their own).

    python scripts/gemm_probe.py                  # Llama 3 and Gemma 2 heads, M=4096; autotuned
    python scripts/gemm_probe.py --quick          # one small shape
    python scripts/gemm_probe.py --config 128,256,64,3,8   # pin BM,BN,BK,stages,warps (no tuning)
    python scripts/gemm_probe.py --no-tma         # pointer loads instead of TMA descriptors
    python scripts/gemm_probe.py --check-cpu      # TRITON_INTERPRET=1 correctness run, tiny shapes
    python scripts/gemm_probe.py --dry-run-cpu    # the whole GPU flow (checks, "timings", table, CSV)
                                                  # on one tiny shape in the interpreter

Prints a table; writes $OUT/gemm_probe.csv when $OUT is set. Exit status 1 if a check failed.
"""

import argparse
import csv
import math
import os
import sys
import time

if "--check-cpu" in sys.argv or "--dry-run-cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from fused_cel.matmul import _mma, _tile_coords  # noqa: E402  (the production kernel's helpers)

LOG2E = tl.constexpr(1.4426950408889634)  # jit code may read globals only if they are constexpr
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Shared jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _halves(t, BM: tl.constexpr, W: tl.constexpr):
    # [BM, W] tile -> its left and right [BM, W // 2] halves (for subtiled TMA epilogues).
    return tl.split(tl.permute(tl.reshape(t, (BM, 2, W // 2)), (0, 2, 1)))


@triton.jit
def _put(desc, piece, off_m, off_n, ACCUMULATE: tl.constexpr):
    # TMA store of one epilogue piece; ACCUMULATE reads the destination first (beta = 1).
    if ACCUMULATE:
        piece = piece + desc.load([off_m, off_n])
    desc.store([off_m, off_n], piece)


@triton.jit
def _tma_epilogue(
    desc, tile, off_m, off_n, BM: tl.constexpr, BN: tl.constexpr, SUBTILE: tl.constexpr, ACCUMULATE: tl.constexpr
):
    # Stores a [BM, BN] register tile through a descriptor whose block is [BM, BN // SUBTILE]
    # (SUBTILE in 1, 2, 4): smaller pieces need less shared memory next to the pipeline stages.
    # TMA clips the rows and columns past the tensor's end.
    if SUBTILE == 1:
        _put(desc, tile, off_m, off_n, ACCUMULATE)
    elif SUBTILE == 2:
        t0, t1 = _halves(tile, BM, BN)
        _put(desc, t0, off_m, off_n, ACCUMULATE)
        _put(desc, t1, off_m, off_n + BN // 2, ACCUMULATE)
    else:
        t0, t1 = _halves(tile, BM, BN)
        t00, t01 = _halves(t0, BM, BN // 2)
        t10, t11 = _halves(t1, BM, BN // 2)
        _put(desc, t00, off_m, off_n, ACCUMULATE)
        _put(desc, t01, off_m, off_n + BN // 4, ACCUMULATE)
        _put(desc, t10, off_m, off_n + BN // 2, ACCUMULATE)
        _put(desc, t11, off_m, off_n + 3 * BN // 4, ACCUMULATE)


# ----------------------------------------------------------------------------------------------
# Kernel A: logits (+ per-tile softmax statistics)
# ----------------------------------------------------------------------------------------------


@triton.jit
def logits_stats_kernel(
    a,  # X [M, K] bf16: a TensorDescriptor (block [BM, BK]) if USE_TMA, else the tensor
    b,  # W [N, K] bf16: descriptor with block [BN, BK], or the tensor
    c,  # Z [M, N] bf16 output: descriptor with block [BM, BN // SUBTILE], or the tensor
    stat_m,  # fp32 [M, stats_stride]: per row and column tile, max of the (bf16-rounded) logits
    stat_s,  # fp32 [M, stats_stride]: per row and column tile, sum of exp(logit - that max)
    M,  # rows (tokens)
    N,  # columns (vocabulary)
    K,  # reduction (hidden size)
    stride_am,  # X row stride, elements (pointer variant only; last dims are contiguous)
    stride_bn,  # W row stride
    stride_cm,  # Z row stride
    stats_stride,  # row stride of stat_m / stat_s, >= cdiv(N, BN)
    BM: tl.constexpr,  # tile rows
    BN: tl.constexpr,  # tile columns (= the statistics' granularity)
    BK: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row blocks per swizzle group
    SUBTILE: tl.constexpr,  # TMA epilogue pieces per tile (1 or 2)
    STATS: tl.constexpr,  # False: plain GEMM (no statistics epilogue)
    USE_TMA: tl.constexpr,  # True: a, b, c are TensorDescriptors
    FLATTEN: tl.constexpr,  # ask the compiler to flatten the tile and K loops into one pipeline
    NUM_SMS: tl.constexpr,  # programs launched (persistent grid)
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    ks = tl.arange(0, BK)
    for tile in tl.range(pid, num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        rows = off_m + tl.arange(0, BM)
        cols = off_n + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if USE_TMA:
            # Out-of-range rows / columns / K come back as zeros from TMA.
            for ki in range(k_tiles):
                x = a.load([off_m, ki * BK])
                w = b.load([off_n, ki * BK])
                acc = _mma(x, w.T, acc)
        else:
            # Rows and columns past the end are clamped to 0 (valid loads, discarded later); only
            # K is masked.
            rows_c = tl.where(rows < M, rows, 0).to(tl.int64)
            cols_c = tl.where(cols < N, cols, 0).to(tl.int64)
            a_ptrs = a + rows_c[:, None] * stride_am + ks[None, :]
            b_ptrs = b + cols_c[:, None] * stride_bn + ks[None, :]
            for ki in range(k_tiles):
                k_ok = (ks < K - ki * BK)[None, :]
                x = tl.load(a_ptrs, mask=k_ok, other=0.0)
                w = tl.load(b_ptrs, mask=k_ok, other=0.0)
                acc = _mma(x, w.T, acc)
                a_ptrs += BK
                b_ptrs += BK
        out = acc.to(tl.bfloat16)
        if STATS:
            # Statistics of the logits as stored (bf16-rounded), like the current CE pass: then
            # G = exp(Z - lse) in kernels B and C sums to 1 per row. Columns >= N are excluded;
            # every tile has >= 1 valid column, so the max is finite.
            masked = tl.where((cols < N)[None, :], out.to(tl.float32), -float("inf"))
            tile_max = tl.max(masked, axis=1)
            tile_sum = tl.sum(tl.exp2((masked - tile_max[:, None]) * LOG2E), axis=1)
            stat_off = rows.to(tl.int64) * stats_stride + pid_n
            tl.store(stat_m + stat_off, tile_max, mask=rows < M)
            tl.store(stat_s + stat_off, tile_sum, mask=rows < M)
        if USE_TMA:
            _tma_epilogue(c, out, off_m, off_n, BM, BN, SUBTILE, False)
        else:
            c_ptrs = c + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
            tl.store(c_ptrs, out, mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def lse_reduce_kernel(
    stat_m,  # fp32 [M, stats_stride]: per-tile maxima from kernel A
    stat_s,  # fp32 [M, stats_stride]: per-tile sums of exp(logit - max)
    lse,  # fp32 [M] output: log-sum-exp per row
    n_tiles,  # column tiles actually written (cdiv(N, BN) of the config kernel A ran with)
    stats_stride,  # row stride of the statistics
    BLOCK_T: tl.constexpr,  # power of two >= n_tiles
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    ok = offs < n_tiles
    m = tl.load(stat_m + row * stats_stride + offs, mask=ok, other=-float("inf"))
    s = tl.load(stat_s + row * stats_stride + offs, mask=ok, other=0.0)
    mx = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp2((m - mx) * LOG2E), axis=0)
    tl.store(lse + row, mx + tl.log(total))


# ----------------------------------------------------------------------------------------------
# The separate CE pass of the current scheme (an approximation of fused_cel's row kernel)
# ----------------------------------------------------------------------------------------------


@triton.jit
def ce_row_kernel(
    z,  # bf16 [M, V]: logits in, G = exp(z - lse) out, in place
    lse,  # fp32 [M]: written when not HAVE_LSE, read when HAVE_LSE
    V,  # columns
    stride_zm,  # row stride of z
    HAVE_LSE: tl.constexpr,  # True: skip the statistics read (one read + one write per element)
    BLOCK: tl.constexpr,  # columns per step
):
    row = tl.program_id(0).to(tl.int64)
    zrow = z + row * stride_zm
    offs = tl.arange(0, BLOCK)
    if HAVE_LSE:
        row_lse = tl.load(lse + row)
    else:
        # Online max / sum of exp, per lane, combined at the end.
        m = tl.full((BLOCK,), -float("inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(zrow + start + offs, mask=start + offs < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp2((m - m_safe) * LOG2E) + tl.exp2((x - m_safe) * LOG2E)
            m = m_new
        mx = tl.max(m, axis=0)
        row_lse = mx + tl.log(tl.sum(s * tl.exp2((m - mx) * LOG2E), axis=0))
        tl.store(lse + row, row_lse)
    for start in range(0, V, BLOCK):
        ok = start + offs < V
        x = tl.load(zrow + start + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(zrow + start + offs, tl.exp2((x - row_lse) * LOG2E).to(tl.bfloat16), mask=ok)


# ----------------------------------------------------------------------------------------------
# Kernel B: dX = G @ W, G = exp(Z - lse) formed on load; split-K over the last partial wave
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pick_split(rem, k_tiles, NUM_SMS: tl.constexpr, MAX_SPLIT: tl.constexpr):
    # The rem tiles left after the full waves are cut into S K-ranges each; S minimises the waves
    # the rem * S pieces take, in units of a whole tile's time: ceil(rem * S / NUM_SMS) / S.
    # A larger S must win by 3% (more pieces = more atomics). S <= k_tiles.
    best_s = rem * 0 + 1
    best_w = (rem + NUM_SMS - 1) // NUM_SMS
    for s in tl.static_range(2, MAX_SPLIT + 1):
        waves = (rem * s + NUM_SMS - 1) // NUM_SMS
        better = (waves * best_s * 100 < best_w * s * 97) & (s <= k_tiles)
        best_s = tl.where(better, s, best_s)
        best_w = tl.where(better, waves, best_w)
    return best_s


def split_plan(num_tiles, k_tiles, num_sms, max_split=16):
    """Host mirror of dx_kernel's schedule (for the log): (whole tiles, split tiles, S)."""
    dp = num_tiles // num_sms * num_sms
    rem = num_tiles - dp
    best_s, best_w = 1, -(-rem // num_sms)
    for s in range(2, max_split + 1):
        waves = -(-rem * s // num_sms)
        if waves * best_s * 100 < best_w * s * 97 and s <= k_tiles:
            best_s, best_w = s, waves
    return dp, rem, best_s


@triton.jit
def dx_kernel(
    z,  # Z [M, V] bf16 logits (PROLOGUE) or G itself: descriptor, block [BM, BK], or tensor
    w,  # W [V, D] bf16: descriptor, block [BK, BN], or tensor
    out,  # fp32 [M, D] output, zeroed by the caller (split tiles are added atomically)
    lse,  # fp32 [M]: log-sum-exp per row (PROLOGUE only)
    M,  # rows (tokens)
    D,  # output columns (hidden size)
    V,  # reduction (vocabulary)
    stride_zm,  # Z row stride (pointer variant)
    stride_wv,  # W row stride (pointer variant)
    stride_om,  # out row stride
    split,  # K pieces per tile in the last partial wave; 0 = _pick_split
    BM: tl.constexpr,  # tile rows
    BN: tl.constexpr,  # tile columns
    BK: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row blocks per swizzle group
    PROLOGUE: tl.constexpr,  # True: A = exp(Z - lse) in bf16; False: A = Z as loaded (G given)
    USE_TMA: tl.constexpr,  # True: z and w are TensorDescriptors
    MAX_SPLIT: tl.constexpr,  # largest split _pick_split considers
    NUM_SMS: tl.constexpr,  # programs launched (persistent grid; must equal the grid size)
):
    # Work items: first the whole tiles of the full waves (tile-parallel, plain stores), then
    # the remaining `rem` tiles, each cut into S equal K-ranges. Those pieces are numbered
    # split-major, so concurrent programs read the same K-range of Z and W (L2 reuse).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(D, BN)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(V, BK)
    dp_tiles = num_tiles // NUM_SMS * NUM_SMS
    rem = num_tiles - dp_tiles
    n_split = tl.where(split > 0, split, _pick_split(rem, k_tiles, NUM_SMS, MAX_SPLIT))
    rem_1 = tl.maximum(rem, 1)
    ks = tl.arange(0, BK)
    for item in range(pid, dp_tiles + rem * n_split, NUM_SMS):
        in_split = item >= dp_tiles
        j = tl.maximum(item - dp_tiles, 0)
        tile = tl.where(in_split, dp_tiles + j % rem_1, item)
        piece = tl.where(in_split, j // rem_1, 0)
        pieces = tl.where(in_split, n_split, 1)
        k_lo = piece * k_tiles // pieces
        k_hi = (piece + 1) * k_tiles // pieces
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        rows = off_m + tl.arange(0, BM)
        cols = off_n + tl.arange(0, BN)
        if PROLOGUE:
            lse2 = tl.load(lse + rows, mask=rows < M, other=0.0) * LOG2E
        rows_c = tl.where(rows < M, rows, 0).to(tl.int64)
        cols_c = tl.where(cols < D, cols, 0)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_lo, k_hi):
            if USE_TMA:
                zt = z.load([off_m, ki * BK])
                wt = w.load([ki * BK, off_n])
            else:
                kk = ki * BK + ks
                zt = tl.load(z + rows_c[:, None] * stride_zm + kk[None, :], mask=(kk < V)[None, :], other=0.0)
                wt = tl.load(
                    w + kk.to(tl.int64)[:, None] * stride_wv + cols_c[None, :], mask=(kk < V)[:, None], other=0.0
                )
            if PROLOGUE:
                # Columns >= V: Z is padded with 0 there, so g = exp(-lse) is finite, and the
                # matching rows of W are zero-padded: they add exactly 0. No mask needed.
                g = tl.exp2(zt.to(tl.float32) * LOG2E - lse2[:, None]).to(tl.bfloat16)
            else:
                g = zt
            acc = _mma(g, wt, acc)
        o_ptrs = out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        o_mask = (rows < M)[:, None] & (cols < D)[None, :]
        if pieces == 1:
            tl.store(o_ptrs, acc, mask=o_mask)
        else:
            tl.atomic_add(o_ptrs, acc, mask=o_mask, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Kernel C: dW += G^T @ X, G^T formed from a transposed load of Z
# ----------------------------------------------------------------------------------------------


@triton.jit
def dw_kernel(
    z,  # Z [M, V] bf16 logits (PROLOGUE) or G: descriptor, block [BK, BM] (a Z^T tile), or tensor
    x,  # X [M, D] bf16: descriptor, block [BK, BN], or tensor
    out,  # fp32 [V, D], accumulated into (beta = 1): descriptor, block [BM, BN // SUBTILE], or tensor
    lse,  # fp32 [M]: log-sum-exp per token (PROLOGUE only)
    M,  # reduction (tokens)
    D,  # output columns (hidden size)
    V,  # output rows (vocabulary)
    stride_zm,  # Z row stride (pointer variant)
    stride_xm,  # X row stride (pointer variant)
    stride_ov,  # out row stride (pointer variant)
    BM: tl.constexpr,  # tile rows (vocabulary)
    BN: tl.constexpr,  # tile columns (hidden)
    BK: tl.constexpr,  # reduction step (tokens)
    GROUP_M: tl.constexpr,  # row blocks per swizzle group
    SUBTILE: tl.constexpr,  # TMA epilogue pieces per tile (1, 2 or 4)
    PROLOGUE: tl.constexpr,  # True: A = exp(Z - lse)^T in bf16; False: A = Z^T as loaded
    USE_TMA: tl.constexpr,  # True: z, x and out are TensorDescriptors
    FLATTEN: tl.constexpr,  # flatten the tile and K loops
    NUM_SMS: tl.constexpr,  # programs launched (persistent grid)
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(V, BM)
    num_pid_n = tl.cdiv(D, BN)
    k_tiles = tl.cdiv(M, BK)
    ks = tl.arange(0, BK)
    for tile in tl.range(pid, num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_v = pid_m * BM
        off_d = pid_n * BN
        vs = off_v + tl.arange(0, BM)
        ds = off_d + tl.arange(0, BN)
        vs_c = tl.where(vs < V, vs, 0)
        ds_c = tl.where(ds < D, ds, 0)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            kk = ki * BK + ks
            if USE_TMA:
                zt = z.load([ki * BK, off_v])  # [BK, BM]
                xt = x.load([ki * BK, off_d])  # [BK, BN]
            else:
                k64 = kk.to(tl.int64)[:, None]
                zt = tl.load(z + k64 * stride_zm + vs_c[None, :], mask=(kk < M)[:, None], other=0.0)
                xt = tl.load(x + k64 * stride_xm + ds_c[None, :], mask=(kk < M)[:, None], other=0.0)
            if PROLOGUE:
                # Tokens >= M: Z pads with 0 and lse with 0, so g = 1, but X's rows there are zero.
                lse2 = tl.load(lse + kk, mask=kk < M, other=0.0) * LOG2E
                g = tl.exp2(zt.to(tl.float32) * LOG2E - lse2[:, None]).to(tl.bfloat16)
            else:
                g = zt
            acc = _mma(g.T, xt, acc)
        if USE_TMA:
            _tma_epilogue(out, acc, off_v, off_d, BM, BN, SUBTILE, True)
        else:
            o_ptrs = out + vs.to(tl.int64)[:, None] * stride_ov + ds[None, :]
            o_mask = (vs < V)[:, None] & (ds < D)[None, :]
            prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
            tl.store(o_ptrs, prev + acc, mask=o_mask)


# ----------------------------------------------------------------------------------------------
# Host side: configs, autotuned launchers
# ----------------------------------------------------------------------------------------------


def _set_blocks(nargs, shapes):
    # Config pre-hook: give the TMA descriptors the block shapes of the config being launched.
    for name, fn in shapes.items():
        if isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = fn(nargs)


def _hook_a(nargs):
    _set_blocks(
        nargs,
        {
            "a": lambda n: [n["BM"], n["BK"]],
            "b": lambda n: [n["BN"], n["BK"]],
            "c": lambda n: [n["BM"], n["BN"] // n["SUBTILE"]],
        },
    )


def _hook_b(nargs):
    _set_blocks(nargs, {"z": lambda n: [n["BM"], n["BK"]], "w": lambda n: [n["BK"], n["BN"]]})


def _hook_c(nargs):
    _set_blocks(
        nargs,
        {
            "z": lambda n: [n["BK"], n["BM"]],
            "x": lambda n: [n["BK"], n["BN"]],
            "out": lambda n: [n["BM"], n["BN"] // n["SUBTILE"]],
        },
    )


def make_config(kind, bm, bn, bk, stages, warps, subtile=None, group_m=8):
    """One triton.Config for kernel kind 'a', 'b' or 'c'; SUBTILE (a, c) follows from BN unless given."""
    kw = dict(BM=bm, BN=bn, BK=bk, GROUP_M=group_m)
    if kind == "a":
        kw["SUBTILE"] = subtile or (2 if bn >= 256 else 1)
    if kind == "c":
        kw["SUBTILE"] = subtile or (4 if bn >= 256 else 2)
    hook = {"a": _hook_a, "b": _hook_b, "c": _hook_c}[kind]
    return triton.Config(kw, num_stages=stages, num_warps=warps, pre_hook=hook)


# (BM, BN, BK, stages, warps[, SUBTILE]): the default tuning space on the GPU.
GPU_SPACE = {
    "a": [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4)],
    "b": [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4)],
    "c": [(128, 256, 64, 3, 8), (128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4)],
}
# Shared memory, compiled for sm_90a with Triton 3.9 (limit 227 KiB = 232448 B): A 128x256 4 stages
# 229920 B (just fits); C 128x256 4 stages 246600 B (does not: left out of C's list). Configs
# that do not fit are skipped by the autotuner (OutOfResources -> time inf).


def _desc(t, use_tma):
    # A descriptor with a placeholder block (the config's pre-hook sets the real one), or t.
    return TensorDescriptor.from_tensor(t, [1] * t.dim()) if use_tma else t


class Probe:
    """The kernels, autotuned over `space` (kind -> list of (BM, BN, BK, stages, warps[, SUBTILE]))."""

    def __init__(self, space, use_tma, flatten, num_sms, group_m=8, tune_plain=False):
        self.use_tma, self.flatten, self.num_sms = use_tma, flatten, num_sms
        self.space, self.group_m, self.tune_plain = space, group_m, tune_plain
        self.tuners = {}
        self.tuned = set()  # (tuner name, id, M, D, V) of kernel C already tuned

    def _configs(self, kind):
        return [make_config(kind, *c, group_m=self.group_m) for c in self.space[kind]]

    def _tuner(self, name, fn, configs, key, **kw):
        if name not in self.tuners:
            self.tuners[name] = triton.autotune(configs=configs, key=key, **kw)(fn)
        return self.tuners[name]

    def _follow(self, name, leader, fn, key, **kw):
        # The variant without the fusion runs the config its fused twin was tuned to (so that the
        # difference is the fusion alone), unless tune_plain.
        if self.tune_plain or leader not in self.tuners or self.tuners[leader].best_config is None:
            kind = name[0]
            return self._tuner(name, fn, self._configs(kind), key, **kw)
        best = self.tuners[leader].best_config
        if name not in self.tuners or self.tuners[name].configs[0] is not best:
            self.tuners[name] = triton.autotune(configs=[best], key=key, **kw)(fn)
        return self.tuners[name]

    def _launch(self, run):
        # The first launch may fail to compile with FLATTEN on an older Triton: retry without.
        try:
            return run()
        except Exception as e:  # noqa: BLE001 -- any compile failure
            if not self.flatten:
                raise
            log(f"launch failed with FLATTEN=True ({type(e).__name__}: {str(e)[:200]}); retrying FLATTEN=False")
            self.flatten = False
            return run()

    def best(self, name):
        t = self.tuners.get(name)
        return None if t is None or getattr(t, "best_config", None) is None else t.best_config

    def stats_stride(self, N):
        return triton.cdiv(N, min(c[1] for c in self.space["a"]))

    # -- kernel A ----------------------------------------------------------------------------
    def logits(self, x, w, z, stat_m, stat_s, stats=True):
        """Z = x @ w^T into z; with stats, the per-tile statistics. Returns the BN used."""
        M, K = x.shape
        N = w.shape[0]
        key = ["M", "N", "K", "STATS", "FLATTEN"]
        if stats:
            kern = self._tuner("a_stats", logits_stats_kernel, self._configs("a"), key)
        else:
            kern = self._follow("a_plain", "a_stats", logits_stats_kernel, key)

        def run():
            kern[(self.num_sms,)](
                _desc(x, self.use_tma), _desc(w, self.use_tma), _desc(z, self.use_tma), stat_m, stat_s,
                M, N, K, x.stride(0), w.stride(0), z.stride(0), stat_m.stride(0),
                STATS=stats, USE_TMA=self.use_tma, FLATTEN=self.flatten, NUM_SMS=self.num_sms,
            )  # fmt: skip

        self._launch(run)
        return kern.best_config.kwargs["BN"]

    def lse(self, stat_m, stat_s, lse, N, bn):
        n_tiles = triton.cdiv(N, bn)
        lse_reduce_kernel[(stat_m.shape[0],)](
            stat_m, stat_s, lse, n_tiles, stat_m.stride(0), BLOCK_T=triton.next_power_of_2(n_tiles), num_warps=4
        )
        return lse

    # -- kernel B ----------------------------------------------------------------------------
    def dx(self, z, w, lse, out, prologue=True, split=0):
        """out = exp(z - lse) @ w (prologue) or z @ w; out is zeroed here first."""
        M, V = z.shape
        D = w.shape[1]
        key = ["M", "D", "V", "PROLOGUE"]
        if prologue:
            kern = self._tuner("b_fused", dx_kernel, self._configs("b"), key, reset_to_zero=["out"])
        else:
            kern = self._follow("b_plain", "b_fused", dx_kernel, key, reset_to_zero=["out"])
        out.zero_()
        kern[(self.num_sms,)](
            _desc(z, self.use_tma), _desc(w, self.use_tma), out, lse,
            M, D, V, z.stride(0), w.stride(0), out.stride(0), split,
            PROLOGUE=prologue, USE_TMA=self.use_tma, MAX_SPLIT=16, NUM_SMS=self.num_sms,
        )  # fmt: skip
        return out

    # -- kernel C ----------------------------------------------------------------------------
    def dw(self, z, x, lse, out, prologue=True):
        """out += exp(z - lse)^T @ x (prologue) or z^T @ x."""
        M, V = z.shape
        D = x.shape[1]
        key = ["M", "D", "V", "PROLOGUE", "FLATTEN"]
        name = "c_fused" if prologue else "c_plain"
        if prologue:
            kern = self._tuner(name, dw_kernel, self._configs("c"), key)
        else:
            kern = self._follow(name, "c_fused", dw_kernel, key)

        def run(dst):
            kern[(self.num_sms,)](
                _desc(z, self.use_tma), _desc(x, self.use_tma), _desc(dst, self.use_tma), lse,
                M, D, V, z.stride(0), x.stride(0), dst.stride(0),
                PROLOGUE=prologue, USE_TMA=self.use_tma, FLATTEN=self.flatten, NUM_SMS=self.num_sms,
            )  # fmt: skip

        # Tuning launches every config, each adding into its output: the first call for a shape
        # (and a fresh tuner) goes to a scratch buffer (restore_value cannot clone a descriptor).
        if (name, id(kern), M, D, V) not in self.tuned:
            self._launch(lambda: run(torch.empty_like(out)))
            self.tuned.add((name, id(kern), M, D, V))
        self._launch(lambda: run(out))
        return out


def ce_pass(z, lse, have_lse=False):
    """The current scheme's row kernel (approximation): lse (unless given), then G over z."""
    M, V = z.shape
    block = min(triton.next_power_of_2(V), 4096)
    ce_row_kernel[(M,)](z, lse, V, z.stride(0), HAVE_LSE=have_lse, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return z


# ----------------------------------------------------------------------------------------------
# torch references for the current scheme (cuBLAS)
# ----------------------------------------------------------------------------------------------


def torch_dx(G, W):
    """G @ W in fp32 out; returns (result, how)."""
    try:
        return torch.mm(G, W, out_dtype=torch.float32), "mm(out_dtype=fp32)"
    except (RuntimeError, TypeError, NotImplementedError):
        return torch.mm(G, W).float(), "mm(bf16).float()"


def torch_dw(out32, G, X, how=None):
    """out32 += G^T @ X; returns how it was done (pass `how` back in to repeat that way)."""
    if how in (None, "addmm(out_dtype=fp32, out=out32)"):
        try:
            torch.addmm(out32, G.t(), X, out_dtype=torch.float32, out=out32)
            return "addmm(out_dtype=fp32, out=out32)"
        except (RuntimeError, TypeError, NotImplementedError):
            if how is not None:
                raise
    if how in (None, "out32 += mm(out_dtype=fp32)"):
        try:
            out32 += torch.mm(G.t(), X, out_dtype=torch.float32)
            return "out32 += mm(out_dtype=fp32)"
        except (RuntimeError, TypeError, NotImplementedError):
            if how is not None:
                raise
    out32 += torch.mm(G.t(), X).float()
    return "out32 += mm(bf16).float()"


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


class Checker:
    def __init__(self):
        self.failed = []

    def rel(self, name, got, ref, tol, base=None):
        """Norm-wise relative error <= tol, and element-wise |got - ref| <= tol (|ref| + max |ref|)
        (so that one tile left unwritten fails even when it is a small part of the norm). With
        `base`, both sides are compared after subtracting it (the increment of a beta=1 update)."""
        got_d, ref_d = got.detach().to(ref.dtype), ref
        if base is not None:
            got_d, ref_d = got_d - base.to(ref.dtype), ref_d - base.to(ref.dtype)
        finite = bool(torch.isfinite(got_d).all())
        err, mx, n_bad = float("nan"), float("nan"), -1
        if finite:
            diff = (got_d - ref_d).abs()
            err = (diff.norm() / ref_d.norm().clamp(min=1e-30)).item()
            mx = diff.max().item()
            n_bad = int((diff > tol * (ref_d.abs() + ref_d.abs().max())).sum())
            del diff
        ok = finite and err <= tol and n_bad == 0
        log(
            f"  check {name:34s} rel.err {err:.2e}  max.abs {mx:.2e}  bad elems {n_bad}  (tol {tol:g}) "
            + ("ok" if ok else "FAIL")
            + ("" if finite else "  NOT ALL ELEMENTS WRITTEN / FINITE")
        )
        if not ok:
            self.failed.append(name)
        return ok

    def absmax(self, name, got, ref, tol):
        got_d = got.detach().to(ref.dtype)
        finite = bool(torch.isfinite(got_d).all())
        mx = (got_d - ref).abs().max().item() if finite else float("nan")
        ok = finite and mx <= tol
        log(f"  check {name:34s} max.abs {mx:.2e}  (tol {tol:g}) {'ok' if ok else 'FAIL'}")
        if not ok:
            self.failed.append(name)
        return ok


def make_inputs(M, N, K, device, seed):
    """X [M, K], W [N, K] bf16, normal, scaled so that X @ W^T has std ~2."""
    g = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(M, K, generator=g, device=device).to(torch.bfloat16)
    W = (torch.randn(N, K, generator=g, device=device) * (2.0 / math.sqrt(K))).to(torch.bfloat16)
    return X, W


def check_all(probe, X, W, chk, ref_dtype, tag, splits=(0,)):
    """Correctness of every kernel on (X, W) against torch in ref_dtype. Returns (Z, lse, G)."""
    dev = X.device
    M, K = X.shape
    N = W.shape[0]
    Xr, Wr = X.to(ref_dtype), W.to(ref_dtype)
    ref_logits = Xr @ Wr.t()
    ref_lse = torch.logsumexp(ref_logits, dim=-1)

    # A: poison outputs, then everything written must be finite.
    stride = probe.stats_stride(N)
    Z = torch.full((M, N), float("nan"), device=dev, dtype=torch.bfloat16)
    sm = torch.full((M, stride), float("nan"), device=dev)
    ss = torch.full((M, stride), float("nan"), device=dev)
    bn = probe.logits(X, W, Z, sm, ss, stats=True)
    n_tiles = triton.cdiv(N, bn)
    chk.rel(f"{tag} A+stats logits vs fp ref", Z, ref_logits, 1e-2)
    if dev.type == "cuda":
        chk.rel(f"{tag} A+stats logits vs torch.mm bf16", Z, (X @ W.t()).to(ref_dtype), 1e-2)
    finite_stats = bool(torch.isfinite(sm[:, :n_tiles]).all() and torch.isfinite(ss[:, :n_tiles]).all())
    log(f"  check {tag} stats all written: {finite_stats}")
    if not finite_stats:
        chk.failed.append(f"{tag} stats written")
    lse = torch.full((M,), float("nan"), device=dev)
    probe.lse(sm, ss, lse, N, bn)
    # lse is that of the bf16 logits Z (as in the current scheme): equal to logsumexp(Z) up to
    # fp32 sums, and off the exact one by Z's rounding (the interpreter truncates: larger there).
    chk.absmax(f"{tag} lse vs logsumexp(fp ref)", lse, ref_lse, 5e-2)
    chk.absmax(f"{tag} lse vs logsumexp(Z.float())", lse, torch.logsumexp(Z.to(ref_dtype), -1), 1e-4)
    Zp = torch.full_like(Z, float("nan"))
    probe.logits(X, W, Zp, sm, ss, stats=False)
    chk.rel(f"{tag} A plain logits vs fp ref", Zp, ref_logits, 1e-2)
    del Zp, ref_logits

    # The separate CE pass (the baseline) must agree with kernel A's lse.
    Zc = Z.clone()
    lse_c = torch.full((M,), float("nan"), device=dev)
    ce_pass(Zc, lse_c)
    chk.absmax(f"{tag} CE pass lse vs kernel A lse", lse_c, lse.to(ref_dtype), 1e-4)
    G_ref = torch.exp(Z.to(ref_dtype) - lse.to(ref_dtype)[:, None])
    chk.rel(f"{tag} CE pass G", Zc, G_ref, 1e-2)
    G = G_ref.to(torch.bfloat16)
    del Zc

    # B: out is zeroed by the launcher (split tiles accumulate atomically), so a tile never
    # written would read 0 and fail the comparison.
    ref_dx = G_ref @ W.to(ref_dtype)
    for split in splits:
        out = torch.full((M, K), float("nan"), device=dev)
        probe.dx(Z, W, lse, out, prologue=True, split=split)
        chk.rel(f"{tag} B fused dX (split={split or 'auto'})", out, ref_dx, 1e-2)
    out = torch.full((M, K), float("nan"), device=dev)
    probe.dx(G, W, lse, out, prologue=False)
    chk.rel(f"{tag} B plain dX (G given)", out, ref_dx, 1e-2)
    if dev.type == "cuda":
        chk.rel(f"{tag} torch dX", torch_dx(G, W)[0], ref_dx, 1e-2)
    del ref_dx, out

    # C: out starts random; the increments out - out0 are compared (a tile never written has
    # increment 0 and fails).
    out0 = torch.randn(N, K, device=dev)
    ref_dw = out0.to(ref_dtype) + G_ref.t() @ X.to(ref_dtype)
    out = out0.clone()
    probe.dw(Z, X, lse, out, prologue=True)
    chk.rel(f"{tag} C fused dW (beta=1)", out, ref_dw, 1e-2, base=out0)
    out = out0.clone()
    probe.dw(G, X, lse, out, prologue=False)
    chk.rel(f"{tag} C plain dW (G given)", out, ref_dw, 1e-2, base=out0)
    how = None
    if dev.type == "cuda":
        out = out0.clone()
        how = torch_dw(out, G, X)
        chk.rel(f"{tag} torch dW [{how}]", out, ref_dw, 1e-2, base=out0)
    del ref_dw, out, out0, G_ref
    return Z, lse, G, how


def check_cpu():
    """TRITON_INTERPRET=1: tiny shapes, fixed tiny configs, both load variants."""
    chk = Checker()
    torch.manual_seed(0)
    tiny = {"a": [(32, 64, 32, 2, 4)], "b": [(32, 64, 32, 2, 4)], "c": [(32, 64, 32, 2, 4)]}
    # N (= V) = 296 is not a multiple of BN = 64 and keeps rows 16-byte aligned for TMA; 300
    # (not aligned) only for the pointer variant. M = 72: a partial row tile; K = 96: 3 steps.
    cases = [(False, 72, 300, 96), (False, 72, 296, 96), (True, 72, 296, 96)]
    for use_tma, M, N, K in cases:
        spaces = (
            tiny,  # A: SUBTILE 1; C: SUBTILE 2; B: 6 tiles on 4 programs -> 4 whole + 2 split in 2
            {**tiny, "a": [(32, 32, 32, 2, 4)], "c": [(16, 32, 32, 2, 4)]},
            # A: SUBTILE 2 (BN 256); C: SUBTILE 4; B: 3 tiles on 4 programs -> all 3 split in 4
            {"a": [(32, 256, 32, 2, 4)], "b": [(32, 128, 32, 2, 4)], "c": [(32, 64, 32, 2, 4, 4)]},
        )
        for space in spaces:
            probe = Probe(space, use_tma=use_tma, flatten=True, num_sms=4, group_m=2)
            tag = f"[{'tma' if use_tma else 'ptr'} M={M} N={N} K={K} BN={space['a'][0][1]}]"
            log(f"case {tag}")
            X, W = make_inputs(M, N, K, "cpu", seed=M + N + K)
            check_all(probe, X, W, chk, torch.float64, tag, splits=(0, 3))
    log("CPU check: " + ("all passed" if not chk.failed else f"FAILED: {chk.failed}"))
    return not chk.failed


# ----------------------------------------------------------------------------------------------
# GPU benchmark
# ----------------------------------------------------------------------------------------------

SHAPES = {
    "llama3": (4096, 128256, 4096),
    "gemma2": (4096, 256000, 2304),
    "quick": (1024, 32064, 1024),  # N not a multiple of 128 or 256
    "tiny": (72, 296, 96),  # --dry-run-cpu
}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def cfg_str(cfg):
    if cfg is None:
        return ""
    kw = cfg.kwargs
    return f"BM{kw['BM']}/BN{kw['BN']}/BK{kw['BK']}/s{cfg.num_stages}/w{cfg.num_warps}" + (
        f"/sub{kw['SUBTILE']}" if "SUBTILE" in kw else ""
    )


def run_shape(probe, shape_name, chk, rows, dev, bench=bench):
    M, N, K = SHAPES[shape_name]
    flops = 2.0 * M * N * K
    log(f"=== {shape_name}: M={M} N(V)={N} K(D)={K}  ({flops / 1e12:.2f} TFLOP per GEMM)")
    X, W = make_inputs(M, N, K, dev, seed=sorted(SHAPES).index(shape_name) + 1)
    ref_dtype = torch.float32 if dev.type == "cuda" else torch.float64
    log(f"tuning + correctness ({ref_dtype} references on {dev.type})")
    Z, lse, G, how_dw = check_all(probe, X, W, chk, ref_dtype, f"[{shape_name}]")
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    stride = probe.stats_stride(N)
    sm = torch.empty(M, stride, device=dev)
    ss = torch.empty(M, stride, device=dev)
    Zb = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    Zs = Z.clone()  # scratch for the in-place CE pass
    lse_s = torch.empty_like(lse)
    dx_out = torch.empty(M, K, device=dev)
    dw_out = torch.zeros(N, K, device=dev)
    bn = probe.logits(X, W, Zb, sm, ss, stats=True)
    _, how_dx = torch_dx(G, W)
    how_dw = how_dw or torch_dw(dw_out, G, X)
    rows_shape = []

    def add(name, ms, kind, ref=None, cfg="", note=""):
        tflops = flops / (ms * 1e-3) / 1e12 if kind == "gemm" else float("nan")
        gbs = float("nan")
        if kind == "pass2":  # two reads + one write of Z
            gbs = 3 * M * N * 2 / (ms * 1e-3) / 1e9
        elif kind == "pass1":  # one read + one write
            gbs = 2 * M * N * 2 / (ms * 1e-3) / 1e9
        ratio = (dict(rows_shape)[ref] / ms) if ref else float("nan")
        rows_shape.append((name, ms))
        rows.append(dict(shape=shape_name, M=M, N=N, K=K, name=name, ms=ms, tflops=tflops, gbps=gbs,
                         speed_vs=ratio, vs=ref or "", config=cfg, note=note))  # fmt: skip
        log(f"  {name:22s} {ms:8.3f} ms" + (f"  {tflops:6.1f} TFLOP/s" if kind == "gemm" else "")
            + (f"  {gbs:6.0f} GB/s" if kind.startswith("pass") else "")
            + (f"  x{ratio:.3f} vs {ref}" if ref else "") + (f"  [{cfg}]" if cfg else ""))  # fmt: skip

    cfg_b = probe.best("b_fused")
    if cfg_b is not None:
        kw = cfg_b.kwargs
        tiles = triton.cdiv(M, kw["BM"]) * triton.cdiv(K, kw["BN"])
        dp, rem, n_split = split_plan(tiles, triton.cdiv(N, kw["BK"]), probe.num_sms)
        log(f"  B schedule: {tiles} tiles = {dp} whole + {rem} split in {n_split} (K pieces, atomics)")
    log("timing (do_bench median, ms)")
    add("cublas_logits", bench(lambda: torch.mm(X, W.t(), out=Zb)), "gemm")
    add("A_plain", bench(lambda: probe.logits(X, W, Zb, sm, ss, stats=False)), "gemm", "cublas_logits",
        cfg_str(probe.best("a_plain")))  # fmt: skip
    add("A_stats", bench(lambda: probe.logits(X, W, Zb, sm, ss, stats=True)), "gemm", "cublas_logits",
        cfg_str(probe.best("a_stats")))  # fmt: skip
    add("lse_reduce", bench(lambda: probe.lse(sm, ss, lse_s, N, bn)), "tiny")
    add("ce_pass", bench(lambda: ce_pass(Zs, lse_s)), "pass2", note="Triton row kernel: 2 reads + 1 write")
    add("g_write", bench(lambda: ce_pass(Zs, lse, have_lse=True)), "pass1", note="lse given: 1 read + 1 write")
    add("torch_dx", bench(lambda: torch_dx(G, W)), "gemm", note=how_dx)
    add("B_plain", bench(lambda: probe.dx(G, W, lse, dx_out, prologue=False)), "gemm", "torch_dx",
        cfg_str(probe.best("b_plain")), "G given; includes out.zero_()")  # fmt: skip
    add("B_fused", bench(lambda: probe.dx(Z, W, lse, dx_out, prologue=True)), "gemm", "torch_dx",
        cfg_str(probe.best("b_fused")), "exp prologue; includes out.zero_()")  # fmt: skip
    add("torch_dw", bench(lambda: torch_dw(dw_out, G, X, how_dw)), "gemm", note=how_dw)
    add("C_plain", bench(lambda: probe.dw(G, X, lse, dw_out, prologue=False)), "gemm", "torch_dw",
        cfg_str(probe.best("c_plain")), "G given")  # fmt: skip
    add("C_fused", bench(lambda: probe.dw(Z, X, lse, dw_out, prologue=True)), "gemm", "torch_dw",
        cfg_str(probe.best("c_fused")), "exp prologue")  # fmt: skip

    t = dict(rows_shape)
    pipes = {
        "PIPE_current": t["cublas_logits"] + t["ce_pass"] + t["torch_dx"] + t["torch_dw"],
        "PIPE_fused": t["A_stats"] + t["lse_reduce"] + t["B_fused"] + t["C_fused"],
        "PIPE_hybrid": t["A_stats"] + t["lse_reduce"] + t["g_write"] + t["torch_dx"] + t["torch_dw"],
        "PIPE_triton_noprol": t["A_stats"] + t["lse_reduce"] + t["g_write"] + t["B_plain"] + t["C_plain"],
    }
    notes = {
        "PIPE_current": "cublas_logits + ce_pass + torch_dx + torch_dw",
        "PIPE_fused": "A_stats + lse_reduce + B_fused + C_fused",
        "PIPE_hybrid": "A_stats + lse_reduce + g_write + torch_dx + torch_dw",
        "PIPE_triton_noprol": "A_stats + lse_reduce + g_write + B_plain + C_plain",
    }
    for name, ms in pipes.items():
        add(name, ms, "sum", None if name == "PIPE_current" else "PIPE_current", note=notes[name])


def parse_config(s):
    parts = [int(p) for p in s.split(",")]
    if len(parts) != 5:
        raise SystemExit("--config wants BM,BN,BK,stages,warps")
    return tuple(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small shape")
    ap.add_argument("--shapes", default="llama3,gemma2", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument(
        "--config",
        type=parse_config,
        action="append",
        help="BM,BN,BK,stages,warps for all three kernels (repeatable: tunes over those)",
    )
    ap.add_argument("--no-tma", action="store_true", help="pointer loads instead of TMA descriptors")
    ap.add_argument("--no-flatten", action="store_true", help="do not ask tl.range to flatten the loops")
    ap.add_argument(
        "--tune-plain",
        action="store_true",
        help="tune the unfused variants too (default: they reuse their fused twin's config)",
    )
    ap.add_argument("--group-m", type=int, default=8)
    ap.add_argument("--check-cpu", action="store_true", help="interpreter correctness run (sets TRITON_INTERPRET)")
    ap.add_argument("--dry-run-cpu", action="store_true", help="the GPU flow on a tiny shape in the interpreter")
    args = ap.parse_args()  # fmt: skip

    if args.check_cpu:
        sys.exit(0 if check_cpu() else 1)
    chk = Checker()
    rows = []
    if args.dry_run_cpu:
        # Exercises run_shape's bookkeeping (and the table / CSV) with one call per "timing".
        tiny = {"a": [(32, 64, 32, 2, 4)], "b": [(32, 64, 32, 2, 4)], "c": [(32, 64, 32, 2, 4)]}
        probe = Probe(tiny, use_tma=not args.no_tma, flatten=True, num_sms=4, group_m=2)

        def one_call(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

        run_shape(probe, "tiny", chk, rows, torch.device("cpu"), bench=one_call)
        sys.exit(report(rows, probe, chk))
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --check-cpu for the interpreter check)")

    props = torch.cuda.get_device_properties(0)
    log(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}, "
        f"CUDA {torch.version.cuda}; TMA={'off' if args.no_tma else 'on'}")  # fmt: skip
    space = GPU_SPACE if not args.config else {k: list(args.config) for k in "abc"}
    probe = Probe(space, use_tma=not args.no_tma, flatten=not args.no_flatten,
                  num_sms=props.multi_processor_count, group_m=args.group_m, tune_plain=args.tune_plain)  # fmt: skip
    shapes = ["quick"] if args.quick else [s.strip() for s in args.shapes.split(",") if s.strip()]
    for name in shapes:
        try:
            run_shape(probe, name, chk, rows, torch.device("cuda"))  # its tensors are freed when it returns
        except Exception as e:  # noqa: BLE001 -- report and go on to the next shape
            log(f"!! {name} aborted: {type(e).__name__}: {e}")
            chk.failed.append(f"{name} aborted")
        torch.cuda.empty_cache()
    sys.exit(report(rows, probe, chk))


def report(rows, probe, chk):
    """Prints the table, writes $OUT/gemm_probe.csv; returns the exit status."""

    print()
    print(f"{'shape':8s} {'kernel':20s} {'ms':>8s} {'TFLOP/s':>8s} {'GB/s':>6s} {'speed':>7s} {'vs':14s} config / note")
    for r in rows:
        tf = f"{r['tflops']:8.1f}" if r["tflops"] == r["tflops"] else f"{'':8s}"
        gb = f"{r['gbps']:6.0f}" if r["gbps"] == r["gbps"] else f"{'':6s}"
        sp = f"{r['speed_vs']:7.3f}" if r["speed_vs"] == r["speed_vs"] else f"{'':7s}"
        print(f"{r['shape']:8s} {r['name']:20s} {r['ms']:8.3f} {tf} {gb} {sp} {r['vs']:14s} "
              f"{' '.join(x for x in (r['config'], r['note']) if x)}")  # fmt: skip
    print("speed = reference time / this time (>1: faster than the reference)")
    print(f"tuned configs: { {k: cfg_str(probe.best(k)) for k in sorted(probe.tuners)} }; FLATTEN={probe.flatten}")
    out_dir = os.environ.get("OUT")
    if out_dir and rows:
        path = os.path.join(out_dir, "gemm_probe.csv")
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        log(f"wrote {path}")
    if chk.failed:
        log(f"CHECKS FAILED: {chk.failed}")
        return 1
    log("all checks passed")
    return 0


if __name__ == "__main__":
    main()
