"""Triton kernel: cross-entropy over one chunk of logits, loss and gradient in one launch.

One program handles one token (one row of the chunk). It walks the vocabulary in blocks of
BLOCK_V columns, twice:

  pass 1  online softmax in fp32 registers: running max, running sum of exp, and (for label
          smoothing) the running sum of the logits -> log-sum-exp and the token's loss;
  pass 2  re-reads the row and overwrites it, in place and in the row's own dtype, with
          d(loss)/d(logits) times the token's gradient scale, except the target column: it is
          written as 0, and its gradient goes out as one fp32 number per token.

Either pass can be left out: no pass 2 when no gradient is wanted (forward under no_grad, or
reduction="none" whose gradient waits for backward), no pass 1 when the log-sum-exp is already
known (that backward). Row offsets are 64-bit, so rows x vocab may exceed 2**31.

The math, with u = transformed logits and p = softmax(u):
    u       = logit_scale * z, then softcap * tanh(u / softcap) if softcap is set
    loss    = (1 - eps) * (lse - u[y]) + eps * (lse - mean(u)) + c * lse**2
    dloss/du_j = p_j * (1 + 2 c lse) - eps / V - (1 - eps) * [j == y]
    du/dz   = logit_scale * (1 - (u / softcap)**2)    (logit_scale alone without softcap)
    dense_j = (p_j * (1 + 2 c lse) - eps / V) * du_j/dz_j * scale, j != y  -> the chunk, rounded
    target  = ((1-eps)(p_y - 1) + eps (p_y - 1/V) + 2 c lse p_y) * du_y/dz_y * scale -> fp32
so that dlogits = dense + target * onehot(y). The caller folds the target part into dX, dW and
db in fp32: the target entries are the gradient's largest, and rounding them to bf16 (as plain
PyTorch does) puts a systematic error into every gradient. p_y - 1 is formed first, in fp32
(exactly, for p_y >= 1/2), so a confident token loses nothing to cancellation.
A vocabulary shard (fused_cel.parallel): the row holds global ids vocab_start .. + V - 1 of
vocab_total. Pass 1 then writes only the shard's partial statistics (SHARD_STATS), which the
ranks combine into lse; pass 2 runs with that lse, and a target on another shard has no column
here (target gradient 0, every column dense).
Ignored tokens get loss 0 and gradient 0. A label outside [0, V) that is not ignore_index gets a
NaN loss (never an out-of-bounds read); the public API rejects such labels before this point.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import torch_impl


@triton.jit
def _transform(z, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    # Raw logits (fp32) -> the logits the loss sees.
    u = z * logit_scale
    if HAS_SOFTCAP:
        # tanh(x) = 2 * sigmoid(2x) - 1 has an absolute error ~1e-7 (exact limits at +-inf): for
        # |x| < 1/4 an odd polynomial instead (Taylor to x**9: truncation < 1e-8, so ~1e-7 relative
        # from fp32 rounding), so that small capped logits keep a relative accuracy (a mean of
        # them may cancel to far less than the logits).
        x = u * (1.0 / softcap)
        x2 = x * x
        poly = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
        u = softcap * tl.where(tl.abs(x) < 0.25, poly, 2.0 * tl.fdiv(1.0, 1.0 + tl.exp(-2.0 * x)) - 1.0)
    return u


@triton.jit
def _round_bf16(x):
    # fp32 -> bf16, round to nearest even, by bits. Triton's CPU interpreter truncates in
    # .to(tl.bfloat16), which would double the gradient's rounding error there; GPUs round.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


@triton.jit
def _ce_chunk_kernel(
    logits_ptr,  # *T [rows, V]: this chunk's logits; overwritten by the gradient if WRITE_GRAD
    logits_stride,  # elements from one row of logits to the next
    targets_ptr,  # *int32|int64 [rows]: each token's target id (or ignore_index)
    loss_ptr,  # *fp32 [rows]: per-token loss out (written if COMPUTE_LSE)
    lse_ptr,  # *fp32 [rows]: per-token log-sum-exp, written if COMPUTE_LSE, else read
    scale_ptr,  # *fp32: each token's gradient multiplier (1/divisor, or backward's grad_output)
    scale_stride,  # 0: one multiplier for all tokens, 1: one per token
    target_grad_ptr,  # *fp32 [rows]: out, each token's gradient at its target (if WRITE_GRAD)
    stats_ptr,  # *fp32 [rows, 4]: out, this shard's (max, log-sum-exp - max, sum, target logit) if SHARD_STATS;
    # in and out, the running (max m, sum of exp(u - m), sum, target logit) if ONLINE
    alpha_ptr,  # *fp32 [rows]: out if ONLINE, exp(m before this block - m after): what the caller rescales by
    tile_stats_ptr,  # *fp32 [2 or 3, rows, n_tiles]: per column tile max, sum of exp(u - max)(, sum of u) if TILE_STATS
    n_tiles,  # column tiles of tile_stats
    tile_plane,  # rows * n_tiles: elements of one plane of tile_stats
    V,  # columns of logits: the vocabulary, or this shard of it
    vocab_start,  # global id of column 0 (0 unless the vocabulary is sharded)
    vocab_total,  # size of the whole vocabulary (V unless sharded)
    ignore_index,  # target id that marks a token as not counted
    label_smoothing,  # eps in [0, 1]
    z_loss,  # c: coefficient of lse**2
    softcap,  # cap of the tanh softcap (unused unless HAS_SOFTCAP)
    logit_scale,  # multiplier applied to logits before the softcap
    HAS_SOFTCAP: tl.constexpr,  # apply softcap * tanh(u / softcap)
    COMPUTE_LSE: tl.constexpr,  # run pass 1 (loss and lse); otherwise read lse
    SHARD_STATS: tl.constexpr,  # pass 1 writes the shard's partial statistics, not loss and lse
    ONLINE: tl.constexpr,  # pass 1 continues running statistics; pass 2 writes exp(u - m) du/dz * scale
    TILE_STATS: tl.constexpr,  # pass 1 merges tile_stats instead of reading the row
    TILE_SUM: tl.constexpr,  # tile_stats has the sum of u (label smoothing)
    BLOCK_T: tl.constexpr,  # tiles merged per step, a power of two
    WRITE_GRAD: tl.constexpr,  # run pass 2 (gradient in place)
    BLOCK_V: tl.constexpr,  # vocabulary columns per step, a power of two
    ROUND_BF16: tl.constexpr,  # round the bf16 gradient by bits (the CPU interpreter)
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < vocab_total)
    local = target - vocab_start  # the target's column, if this shard holds it
    here = (local >= 0) & (local < V)

    # The target's logit, read before pass 2 overwrites the row.
    z_y = tl.load(row_ptr + tl.where(here, local, 0)).to(tl.float32)
    u_y = _transform(z_y, logit_scale, softcap, HAS_SOFTCAP)
    if COMPUTE_LSE:
        if ONLINE:  # the statistics of the columns before this block (m = -inf before the first)
            m = tl.load(stats_ptr + row * 4)
            s = tl.load(stats_ptr + row * 4 + 1)
            u_sum = tl.load(stats_ptr + row * 4 + 2)
        else:
            m = tl.full((), float("-inf"), tl.float32)
            s = tl.zeros((), tl.float32)
            u_sum = tl.zeros((), tl.float32)
        m_old = m
        if TILE_STATS:  # merge the matmul's per-tile statistics (fused_cel.matmul): no read of the row
            for t0 in range(0, n_tiles, BLOCK_T):
                offs = t0 + tl.arange(0, BLOCK_T)
                ok = offs < n_tiles
                at = tile_stats_ptr + row * n_tiles + offs
                tile_m = tl.load(at, mask=ok, other=float("-inf"))
                m_new = tl.maximum(m, tl.max(tile_m, axis=0))
                tile_s = tl.load(at + tile_plane, mask=ok, other=0.0)
                s = s * tl.exp(m - m_new) + tl.sum(tile_s * tl.exp(tile_m - m_new), axis=0)
                if TILE_SUM:
                    u_sum += tl.sum(tl.load(at + 2 * tile_plane, mask=ok, other=0.0), axis=0)
                m = m_new
        else:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < V
                z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                u = tl.where(mask, _transform(z, logit_scale, softcap, HAS_SOFTCAP), float("-inf"))
                m_new = tl.maximum(m, tl.max(u, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(u - m_new), axis=0)
                u_sum += tl.sum(tl.where(mask, u, 0.0), axis=0)
                m = m_new
        # lse = m + log_s, kept apart: (m - u_y) + log_s loses nothing when u_y is the max.
        log_s = tl.log(s)
        if ONLINE:
            tl.store(stats_ptr + row * 4, m)
            tl.store(stats_ptr + row * 4 + 1, s)
            tl.store(stats_ptr + row * 4 + 2, u_sum)
            u_y_sum = tl.load(stats_ptr + row * 4 + 3)
            tl.store(stats_ptr + row * 4 + 3, u_y_sum + tl.where(here, u_y, 0.0))
            tl.store(alpha_ptr + row, tl.exp(m_old - m))
            lse, log_s = m, 0.0  # pass 2: exp(u - m), relative to the running max
        elif SHARD_STATS:  # combined across the shards by fused_cel.parallel
            tl.store(stats_ptr + row * 4, m)
            tl.store(stats_ptr + row * 4 + 1, log_s)
            tl.store(stats_ptr + row * 4 + 2, u_sum)
            tl.store(stats_ptr + row * 4 + 3, tl.where(here, u_y, 0.0))
        else:
            lse = m + log_s
            loss = (1.0 - label_smoothing) * ((m - u_y) + log_s)
            loss += label_smoothing * ((m - u_sum / vocab_total) + log_s)
            loss += z_loss * lse * lse
            loss = tl.where(valid, loss, float("nan"))
            loss = tl.where(ignored, 0.0, loss)
            tl.store(loss_ptr + row, loss)
            tl.store(lse_ptr + row, lse)
    else:
        lse = tl.load(lse_ptr + row)
        m, log_s = lse, 0.0

    if WRITE_GRAD:
        coef = tl.load(scale_ptr + row * scale_stride).to(tl.float32) * logit_scale
        coef = tl.where(valid & (target != ignore_index), coef, 0.0)
        p_coef = 1.0 + 2.0 * z_loss * lse
        p_y = tl.exp((u_y - m) - log_s)
        g_y = (1.0 - label_smoothing) * (p_y - 1.0) + label_smoothing * (p_y - 1.0 / vocab_total)
        g_y += 2.0 * z_loss * lse * p_y
        inv_cap = 1.0 / softcap  # one division per row, not per element
        if HAS_SOFTCAP:
            t_y = u_y * inv_cap
            g_y = g_y * (1.0 - t_y * t_y)
        tl.store(target_grad_ptr + row, tl.where(here, g_y * coef, 0.0))
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            u = _transform(z, logit_scale, softcap, HAS_SOFTCAP)
            d = tl.exp((u - m) - log_s) * p_coef - label_smoothing / vocab_total
            d = tl.where(cols == local, 0.0, d)
            if HAS_SOFTCAP:
                t = u * inv_cap
                d = d * (1.0 - t * t)
            d = d * coef
            if ROUND_BF16:
                d = _round_bf16(d)
            tl.store(row_ptr + cols, d.to(logits_ptr.dtype.element_ty), mask=mask)


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
    tile_stats: torch.Tensor | None = None,
) -> None:
    """Cross-entropy of one chunk of logits, through the Triton kernel.

    logits [rows, V] (unit column stride) is overwritten with the gradient if ``write_grad``.
    ``loss`` and ``lse`` ([rows], fp32) are written if ``compute_lse``; otherwise ``lse`` is read.
    ``grad_scale`` is an fp32 tensor of one element (all tokens) or ``rows`` elements (per token).
    ``target_grad`` ([rows], fp32) receives the gradient at each target if ``write_grad``:
    d(loss)/d(logits) = (the chunk as written) + target_grad[:, None] * onehot(targets).

    A vocabulary shard: the columns are global ids vocab_start .. vocab_start + V - 1 of a
    vocabulary of vocab_total; target_grad is 0 for a token whose target is on another shard.
    With ``stats`` ([rows, 4] fp32) given, pass 1 writes the shard's partial statistics there,
    (max, log-sum-exp - max, sum, target logit or 0) of the transformed logits, instead of loss
    and lse; fused_cel.parallel combines them across the shards.
    With ``alpha`` ([rows] fp32) given as well (online mode, autograd.run_token_blocks: the columns
    are a block of the vocabulary), stats holds running statistics (max m, sum of exp(u - m), sum
    of u, target logit or 0) of the blocks before, which pass 1 continues; alpha receives
    exp(m_before - m_after), and pass 2 writes exp(u - m) du/dz * grad_scale * logit_scale
    (label_smoothing and z_loss must be 0 then: the caller applies them at the end), the target
    column 0. loss and lse are not written.
    ``tile_stats`` ([2 or 3, rows, tiles] fp32, from matmul.logits_stats, which wrote these logits):
    pass 1 merges the per-tile max, sum of exp and (plane 2, needed with label smoothing) sum of
    u instead of reading the row (not with ``alpha``).
    """
    rows, V = logits.shape
    if rows == 0:
        return
    if write_grad:
        scale_stride = 0 if grad_scale.numel() == 1 else 1
    else:
        grad_scale, scale_stride, target_grad = lse, 0, lse  # not accessed
    block_v = min(triton.next_power_of_2(V), 4096)
    _ce_chunk_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets,
        loss if loss is not None else lse,
        lse,
        grad_scale,
        scale_stride,
        target_grad,
        stats if stats is not None else lse,
        alpha if alpha is not None else lse,
        tile_stats if tile_stats is not None else lse,
        0 if tile_stats is None else tile_stats.shape[2],
        0 if tile_stats is None else tile_stats.shape[1] * tile_stats.shape[2],
        V,
        vocab_start,
        V if vocab_total is None else vocab_total,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap if softcap is not None else 1.0,
        logit_scale,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_LSE=compute_lse,
        SHARD_STATS=stats is not None and alpha is None,
        ONLINE=alpha is not None,
        TILE_STATS=tile_stats is not None,
        TILE_SUM=tile_stats is not None and tile_stats.shape[0] == 3,
        BLOCK_T=1 if tile_stats is None else min(triton.next_power_of_2(tile_stats.shape[2]), 1024),
        WRITE_GRAD=write_grad,
        BLOCK_V=block_v,
        ROUND_BF16=logits.device.type == "cpu" and logits.dtype == torch.bfloat16,
        num_warps=8 if block_v >= 2048 else 4,
    )


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
    adds atomically, so rows shared by several tokens sum in no fixed order (as index_add_);
    fused_cel.autograd uses torch_impl.fold when deterministic algorithms are requested."""
    n, D = coef.shape[0], dst.shape[1]
    if n == 0:
        return
    if src.stride(1) != 1 or dst.stride(1) != 1:  # the kernel reads rows of unit column stride
        return torch_impl.fold(dst, dst_index, src, src_index, coef)
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
            x = _round_bf16(x)
        tl.store(out_ptr + row, x.to(out_ptr.dtype.element_ty), mask=mask)


def _scale(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, rows: int, n: int, stride: int) -> None:
    block = 4096
    round_bf16 = x.device.type == "cpu" and out.dtype == torch.bfloat16
    _scale_kernel[(triton.cdiv(n, block), rows)](
        x, out, scale, n, stride, BLOCK=block, IN_PLACE=out is x, ROUND_BF16=round_bf16, num_warps=8
    )


def scale_into(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """out = x * scale (a one-element fp32 tensor), computed in fp32 and rounded once to out's
    dtype: the cast of an fp32 gradient sum at the memory's speed (torch.mul with a dtype change
    ran at less than half of it on an H100)."""
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
