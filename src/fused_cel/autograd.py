"""The chunk loop, and the forward and backward work of the op (fused_cel.op wraps them).

For each chunk of tokens:  logits = X_c @ W.T (+ b)   -> a preallocated [chunk, V] buffer
                           loss, lse, and d(loss)/d(logits) in place   (kernels / torch_impl)
                           dX_c  = dlogits @ W          (own rows of dX)
                           dW   += dlogits.T @ X_c      (accumulated across chunks)
                           db   += dlogits.sum(0)
so the whole [N, V] logits tensor never exists. dlogits is split as dense + a * onehot(y): the
buffer holds every entry but the target's (written 0), and the target entry (one fp32 number a per
token) is folded in without rounding, as the gathers/scatters dX_c += a * W[y], dW[y] += a * X_c.

For reduction "mean" and "sum" all of this runs in forward, and backward only multiplies the
saved gradients by the scalar grad_output (times 1/n for the mean): forward, scale_grads. For
reduction "none" the per-token grad_output is needed inside the loop, so forward computes only the
loss (and keeps the per-token log-sum-exp) and backward runs the loop again (backward_none): one
extra logits matmul, documented in the README.

Precision policy: the logits buffer and the dense part of its gradient are in the compute dtype,
like plain PyTorch's logits and the gradient it feeds to the linear layer; the gradient's target
entries (its largest) stay in fp32, where plain PyTorch rounds them to bf16 with a systematic
error. The chunk holds the unscaled gradient (entries in [-1, 1], so fp16 does not underflow).
Every matmul accumulates in fp32 (cuBLAS). dX and dW are held in fp32 until backward, which
scales them by grad_output and rounds once to their own dtype: dW sums over all chunks in fp32,
never in bf16. The fp32 dW accumulator costs
V x D x 4 bytes beyond dW itself when W is not fp32 (none when it is, as under autocast with fp32
parameters).
"""

from __future__ import annotations

import dataclasses

import torch

from . import budget, parallel, torch_impl

try:
    from . import kernels, matmul
except ImportError:  # no Triton: only the torch backend
    kernels = matmul = None


@dataclasses.dataclass(frozen=True)
class Options:
    """Loss options, already validated by fused_cel.functional."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    chunk_size: int | None = None
    memory_budget: float | None = None  # bytes of working memory (fused_cel.budget)
    backend: str = "torch"  # "triton" or "torch": which ce_chunk runs

    def ce_kwargs(self) -> dict:
        return dict(
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
        )


def auto_chunk_size(n_tokens: int, vocab: int, dim: int, device: torch.device, backend: str, weight_grad: bool) -> int:
    """Tokens per chunk when the caller gives none.

    The Triton path keeps one [chunk, V] buffer in the compute dtype. Larger chunks make the dW
    accumulation (which reads and writes V x D in fp32 once per chunk) cheap next to its matmul:
    on an H100 at Llama 3's head, 2048 -> 4096 tokens took fwd+bwd from 1.22x to 1.16x the
    matmul floor, 1.41x -> 1.15x at Qwen 2.5's (docs/benchmarks). That traffic next to the dW
    matmul's flops is about 8 / (2 * chunk) bytes per flop whatever V and D are, so when dW is
    computed chunks have at least 4096 tokens: Gemma 2's head (D = 2304) took 53.7 ms with
    2304-token chunks and 49.7 ms with 4096 (+839 MiB). The buffer may be as large as W
    (chunk = D tokens) at no cost in peak memory, because backward holds the fp32 dW and dX
    accumulators together with the dW and dX they are rounded into, which is larger; a chunk
    of 4096 with D < 4096 costs V x (4096 - D) x 2 bytes more. Without dW, 2**28 elements (512
    MiB in bf16). The torch path holds a few fp32 temporaries of the chunk: 2**22 elements.
    """
    if backend == "triton" and device.type == "cuda":
        budget = max(2**28, vocab * max(dim, 4096)) if weight_grad else 2**28
        chunk = max(128, budget // max(vocab, 1) // 128 * 128)  # a multiple of 128 for the matmuls
    else:
        chunk = max(16, 2**22 // max(vocab, 1))
    return max(1, min(chunk, n_tokens))


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """out (+)= a @ b, accumulating in fp32 and rounding once to out's dtype."""
    if out.dtype == a.dtype:
        if accumulate:
            torch.addmm(out, a, b, out=out)
        else:
            torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and out.is_cuda:
        # cuBLAS with low-precision inputs and an fp32 result: no upcast copies.
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        product = torch.mm(a.float(), b.float())
        if accumulate:
            out.add_(product)
        else:
            out.copy_(product)


def run_chunks(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    targets: torch.Tensor,
    opts: Options,
    *,
    loss: torch.Tensor | None,
    lse: torch.Tensor,
    grad_scale: torch.Tensor | None = None,
    dx: torch.Tensor | None = None,
    dw: torch.Tensor | None = None,
    db: torch.Tensor | None = None,
    shard: parallel.Shard | None = None,
    out_scale: torch.Tensor | None = None,
    pad: bool = True,
) -> None:
    """The chunk loop. x [N, D], w [V, D], b [V] are in the compute dtype; targets [N].

    ``loss`` given: compute per-token loss and lse (pass 1); else read lse. Any of dx [N, D],
    dw [V, D], db [V] (all fp32) given: write the gradient (scaled per token by grad_scale, one
    element or N) and fold it into them. dx, dw and db are overwritten, not added to.
    ``shard``: w and b are this rank's rows of a vocabulary split over a process group
    (fused_cel.parallel); dx is then this shard's part, summed over the group by the caller.
    A dx that is not fp32, or an ``out_scale``: each chunk's dX is summed in an fp32 tile and
    rounded once into dx, times out_scale (the low-memory plan). ``pad``: allow the padded W.
    """
    N, V = x.shape[0], w.shape[0]
    write_grad = dx is not None or dw is not None or db is not None
    if N == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return
    if shard is None:
        chunk = opts.chunk_size or auto_chunk_size(N, V, x.shape[1], x.device, opts.backend, dw is not None)
    else:  # every rank must cut the same chunks: plan from what all ranks share
        plan_v = -(-shard.total // shard.world)
        chunk = opts.chunk_size or auto_chunk_size(N, plan_v, x.shape[1], x.device, opts.backend, False)
        stats = torch.empty((min(chunk, N), 4), dtype=torch.float32, device=x.device) if loss is not None else None
    ce_chunk, fold = _ops(opts.backend)
    per_token_scale = grad_scale is not None and grad_scale.numel() != 1
    # A V that is not a multiple of 64 (GPT-2's 50257) pushes cuBLAS off its fast kernels: the
    # logits and dX matmuls ran 5-7x slower on an H100. So W is padded with zero rows (a copy of
    # W, only for such V): their logits are exactly 0 and add nothing to dX.
    v_pad = -(-V // 64) * 64 if pad else V
    w_mm, b_mm = w, b
    if v_pad != V:
        w_mm = torch.nn.functional.pad(w, (0, 0, 0, v_pad - V))
        b_mm = None if b is None else torch.nn.functional.pad(b, (0, v_pad - V))
    buf = torch.empty((min(chunk, N), v_pad), dtype=x.dtype, device=x.device)
    # The Triton logits matmul with the softmax statistics in its epilogue (fused_cel.matmul):
    # then the cross-entropy kernel reads each row once, not twice.
    tile_buf, planes = None, 3 if opts.label_smoothing else 2
    if opts.backend == "triton" and loss is not None and matmul is not None and matmul.usable(x, w_mm):
        tile_buf = torch.empty(planes * min(chunk, N) * matmul.n_tiles(V), dtype=torch.float32, device=x.device)
    target_grad = torch.empty(min(chunk, N), dtype=torch.float32, device=x.device) if write_grad else None
    dx_tile = None
    if dx is not None and (dx.dtype != torch.float32 or out_scale is not None):
        dx_tile = torch.empty((min(chunk, N), x.shape[1]), dtype=torch.float32, device=x.device)
    if db is not None:
        db.zero_()
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        xc, logits_mm = x[start:end], buf[: end - start]
        logits = logits_mm[:, :V]
        tg = None if target_grad is None else target_grad[: end - start]
        tile_stats = None
        if tile_buf is not None:
            tile_stats = tile_buf[: planes * (end - start) * matmul.n_tiles(V)].view(planes, end - start, -1)
            matmul.logits_stats(xc, w_mm, b_mm, logits_mm, tile_stats, n_valid=V, logit_scale=opts.logit_scale,
                                softcap=opts.softcap, sum_u=planes == 3)  # fmt: skip
        elif b_mm is None:
            torch.mm(xc, w_mm.t(), out=logits_mm)
        else:
            torch.addmm(b_mm, xc, w_mm.t(), out=logits_mm)
        kw = {} if tile_stats is None else dict(tile_stats=tile_stats)
        chunk_loss = None if loss is None else loss[start:end]
        chunk_scale = grad_scale[start:end] if per_token_scale else grad_scale
        if shard is None:
            ce_chunk(
                logits,
                targets[start:end],
                chunk_loss,
                lse[start:end],
                chunk_scale,
                tg,
                compute_lse=loss is not None,
                write_grad=write_grad,
                **opts.ce_kwargs(),
                **kw,
            )
        else:
            tt = targets[start:end]
            _shard_chunk(ce_chunk, logits, tt, chunk_loss, lse[start:end], chunk_scale, tg, stats, opts, shard, kw)
        if not write_grad:
            continue
        # The target entries: token t's gradient at its target y_t is tg_t (0 where ignored, or
        # where y_t is on another shard).
        y = (targets[start:end] - (0 if shard is None else shard.start)).clamp(0, V - 1)
        if dx is not None:
            dxc = dx[start:end] if dx_tile is None else dx_tile[: end - start]
            _mm(logits_mm, w_mm, out=dxc)
            fold(dxc, None, w, y, tg)
            if dx_tile is not None:
                _round_into(dx[start:end], dxc, out_scale, opts.backend)
        if dw is not None:
            _mm(logits.t(), xc, out=dw, accumulate=start > 0)
            fold(dw, y, xc, None, tg)
        if db is not None:
            db.add_(logits.sum(0, dtype=torch.float32))
            db.index_add_(0, y, tg)


def run_token_blocks(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    targets: torch.Tensor,
    opts: Options,
    plan: budget.Plan,
    *,
    loss: torch.Tensor | None,
    lse: torch.Tensor,
    grad_scale: torch.Tensor | None = None,
    dx: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> None:
    """The low-memory plan's token pass: loss, lse and dX with a chunk x block buffer, never a
    row of the whole vocabulary (whose chunk would be a few hundred tokens at 64 MiB, so that the
    matmuls re-read W for every one of them).

    plan.chunk tokens at a time, W in blocks of plan.block_vocab rows. Per block: the logits, their
    statistics merged into running ones (max m, s = sum exp(u - m), sum of u, target logit), and,
    if dX is wanted, the block overwritten with P = exp(u - m) du/dz (its target column 0) and
    A = A * exp(m_old - m) + P @ W_block: the online softmax of flash attention, with W as both
    keys and values. At the end lse = m + log s and, with e = scale * logit_scale * eps / V,
        dX_t = scale (1 + 2c lse) / s * A_t - e * sum_v W_v + (target_grad_t + e) * W_y
    summed in fp32 and rounded once into dx (times out_scale). The eps term needs du/dz to be the
    same for every column: not with softcap (autograd then uses run_chunks).
    ``loss`` None: the loss and lse are recomputed but not written (backward knows them).
    """
    N, V, D = x.shape[0], w.shape[0], x.shape[1]
    ce_chunk, fold = _ops(opts.backend)
    eps, z, cap, ls = opts.label_smoothing, opts.z_loss, opts.softcap, opts.logit_scale
    if dx is not None and eps and cap is not None:
        raise ValueError("run_token_blocks: softcap with label smoothing needs run_chunks")
    tokens_max, cols_max = min(plan.chunk, N), min(plan.block_vocab, V)
    f32 = dict(dtype=torch.float32, device=x.device)
    buf = torch.empty(tokens_max * cols_max, dtype=x.dtype, device=x.device)
    stats = torch.empty((tokens_max, 4), **f32)
    alpha_buf = torch.empty(tokens_max, **f32)
    acc = torch.empty((tokens_max, D), **f32) if dx is not None else None
    rescale = kernels.scale_rows_ if opts.backend == "triton" else lambda a, alpha: a.mul_(alpha[:, None])
    scratch = torch.empty((4, tokens_max), **f32)  # loss/lse when not kept, target grads not used
    ones = torch.ones((), **f32)
    colsum = w.sum(0, dtype=torch.float32) if dx is not None and eps else None
    for t0 in range(0, N, tokens_max):
        n = min(t0 + tokens_max, N) - t0
        xc, tt, a = x[t0 : t0 + n], targets[t0 : t0 + n], None if acc is None else acc[:n]
        run, alpha = stats[:n], alpha_buf[:n]
        run[:, 0], run[:, 1:] = float("-inf"), 0.0  # m, then s, sum of u, target logit
        for v0, cols in _vocab_blocks(V, cols_max):
            logits, w_blk = buf[: n * cols].view(n, cols), w[v0 : v0 + cols]
            if b is None:
                torch.mm(xc, w_blk.t(), out=logits)
            else:
                torch.addmm(b[v0 : v0 + cols], xc, w_blk.t(), out=logits)
            # Running statistics continued over the block; P = exp(u - m) du/dz * logit_scale
            # written over it (no smoothing, no z-loss: applied at the end; target column 0).
            ce_chunk(logits, tt, None, scratch[0, :n], ones, scratch[1, :n], compute_lse=True, write_grad=a is not None,
                     stats=run, alpha=alpha, label_smoothing=0.0, z_loss=0.0, vocab_start=v0, vocab_total=V,
                     ignore_index=opts.ignore_index, softcap=cap, logit_scale=ls)  # fmt: skip
            if a is None:
                continue
            if v0 > 0:
                rescale(a, alpha)
            _mm(logits, w_blk, out=a, accumulate=v0 > 0)
        m, s, u_sum, u_y = run.unbind(1)
        log_s = torch.log(s)
        keep = loss is not None
        out_loss, out_lse = (loss[t0 : t0 + n], lse[t0 : t0 + n]) if keep else (scratch[2, :n], scratch[3, :n])
        torch_impl.token_loss(m, log_s, u_sum, u_y, tt, out_loss, out_lse, V, opts.ignore_index, eps, z)
        if a is None:
            continue
        y = tt.long()
        valid = (y >= 0) & (y < V) & (y != opts.ignore_index)
        scale = grad_scale[t0 : t0 + n] if grad_scale.numel() != 1 else grad_scale.reshape(1).expand(n)
        scale = torch.where(valid, scale.float(), 0.0)
        p_y = torch.exp((u_y - m) - log_s)
        g_y = torch_impl.target_grad_coef(p_y, out_lse, V, eps, z)
        if cap is not None:
            g_y = g_y * (1.0 - (u_y / cap) ** 2)
        g_y = g_y * scale * ls
        a.mul_((scale * (1.0 + 2.0 * z * out_lse) / s)[:, None])
        if colsum is not None:
            e = scale * (ls * eps / V)
            a.addr_(e, colsum, alpha=-1.0)
            g_y = g_y + e
        fold(a, None, w, y.clamp(0, V - 1), g_y)
        _round_into(dx[t0 : t0 + n], a, out_scale, opts.backend)


def _vocab_blocks(vocab: int, width: int):
    """(first row, rows) of the blocks the low-memory plan walks W in, ``width`` rows each. This
    plan has no padded W, and cuBLAS is several times slower for an odd matrix size: so a last
    block of an odd vocabulary that is large (GPT-2 at 256 MiB: 20177 rows) is cut into a multiple
    of 64 rows and the vocab % 64 rows after them; a small one stays whole (one more launch cost
    more there)."""
    for v0 in range(0, vocab, width):
        rows = min(v0 + width, vocab) - v0
        if rows > 1024 and rows % 64:
            yield v0, rows // 64 * 64
            yield v0 + rows // 64 * 64, rows % 64
        else:
            yield v0, rows


def run_vocab_blocks(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    targets: torch.Tensor,
    opts: Options,
    plan: budget.Plan,
    *,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    dw: torch.Tensor | None,
    db: torch.Tensor | None,
    out_scale: torch.Tensor | None,
) -> None:
    """The low-memory plan's vocabulary pass: dW and db without a V x D fp32 accumulator.

    W in blocks of plan.block_rows rows; per block, the logits of every token (plan.block_tokens
    at a time) are recomputed and turned into the gradient with the known lse, and the block's
    dW (db) is summed in an fp32 tile and rounded once into dw (db), times out_scale.
    """
    N, V, D = x.shape[0], w.shape[0], x.shape[1]
    ce_chunk, fold = _ops(opts.backend)
    per_token_scale = grad_scale.numel() != 1
    rows_max, tokens_max = min(plan.block_rows, V), min(plan.block_tokens, N)
    f32 = dict(dtype=torch.float32, device=x.device)
    buf = torch.empty(rows_max * tokens_max, dtype=x.dtype, device=x.device)
    target_grad = torch.empty(tokens_max, **f32)
    acc = torch.empty((rows_max, D), **f32) if dw is not None else None
    acc_b = torch.empty(rows_max, **f32) if db is not None else None
    for v0, rows in _vocab_blocks(V, rows_max):
        for t0 in range(0, N, tokens_max):
            n = min(t0 + tokens_max, N) - t0
            xc, logits, tg = x[t0 : t0 + n], buf[: n * rows].view(n, rows), target_grad[:n]
            if b is None:
                torch.mm(xc, w[v0 : v0 + rows].t(), out=logits)
            else:
                torch.addmm(b[v0 : v0 + rows], xc, w[v0 : v0 + rows].t(), out=logits)
            ce_chunk(
                logits,
                targets[t0 : t0 + n],
                None,
                lse[t0 : t0 + n],
                grad_scale[t0 : t0 + n] if per_token_scale else grad_scale,
                tg,
                compute_lse=False,
                write_grad=True,
                vocab_start=v0,
                vocab_total=V,
                **opts.ce_kwargs(),
            )
            y = (targets[t0 : t0 + n] - v0).clamp(0, rows - 1)  # tg is 0 where y is not in the block
            if acc is not None:
                _mm(logits.t(), xc, out=acc[:rows], accumulate=t0 > 0)
                fold(acc[:rows], y, xc, None, tg)
            if acc_b is not None:
                if t0 == 0:
                    acc_b.zero_()
                acc_b[:rows].add_(logits.sum(0, dtype=torch.float32))
                acc_b[:rows].index_add_(0, y, tg)
        if acc is not None:
            _round_into(dw[v0 : v0 + rows], acc[:rows], out_scale, opts.backend)
        if acc_b is not None:
            _round_into(db[v0 : v0 + rows], acc_b[:rows], out_scale, opts.backend)


def _token_pass(x, w, b, targets, opts: Options, plan: budget.Plan | None, *, shard=None, **kw) -> None:
    """The token pass of a plan: the vocabulary sweep (low memory) or the chunk loop."""
    if plan is not None and plan.block_vocab:
        run_token_blocks(x, w, b, targets, opts, plan, **kw)
    else:
        run_chunks(x, w, b, targets, _with_plan(opts, plan), shard=shard, pad=_pad(plan), **kw)


def _ops(backend: str):
    """(ce_chunk, fold) of the backend. fold, dst rows += coef * src rows (the gradient's target
    entries), is the Triton kernel (atomic, no temporaries) unless deterministic algorithms are
    requested."""
    if backend != "triton":
        return torch_impl.ce_chunk, torch_impl.fold
    deterministic = torch.are_deterministic_algorithms_enabled()
    return kernels.ce_chunk, torch_impl.fold if deterministic else kernels.fold


def _round_into(out: torch.Tensor, src: torch.Tensor, scale: torch.Tensor | None, backend: str) -> None:
    """out = src * scale (if given), computed in fp32 and rounded once to out's dtype; on the
    Triton backend by kernels.scale_into (torch.mul with a dtype change is slower, see there),
    unless src is a fake or functional tensor (traced for a compiled graph)."""
    if scale is None:
        out.copy_(src)
    elif backend == "triton" and scale.numel() == 1 and type(src) is torch.Tensor:
        kernels.scale_into(out, src, scale.reshape(1).float())
    else:
        torch.mul(src, scale, out=out)


def _shard_chunk(ce_chunk, logits, targets, loss, lse, grad_scale, target_grad, stats, opts, shard, tile) -> None:
    """One chunk of a vocabulary shard: partial statistics, combined over the group, then the
    gradient. tile: ce_chunk's tile_stats argument, if the matmul wrote them."""
    kw = dict(vocab_start=shard.start, vocab_total=shard.total, **opts.ce_kwargs())
    if loss is not None:
        rows_stats = stats[: logits.shape[0]]
        ce_chunk(logits, targets, None, lse, None, None, compute_lse=True, write_grad=False, stats=rows_stats, **kw,
                 **tile)  # fmt: skip
        parallel.combine(rows_stats, targets, loss, lse, shard, opts)
    if target_grad is not None:
        ce_chunk(logits, targets, None, lse, grad_scale, target_grad, compute_lse=False, write_grad=True, **kw)


def _cast_into(src: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """src * scale rounded once to dtype. When no cast is needed an eager call reuses src's storage
    (then, on the Triton backend, a scale of 1 costs no pass over src); traced for a compiled graph
    (src a fake or functional tensor) it computes out of place, and the compiler reuses the buffer
    (AOTAutograd donates saved tensors to the backward graph)."""
    if src.dtype == dtype:
        if type(src) is not torch.Tensor:
            return src * scale
        if backend == "triton" and scale.numel() == 1:
            return kernels.scale_(src, scale.reshape(1).float())
        return src.mul_(scale)
    out = torch.empty(src.shape, dtype=dtype, device=src.device)
    _round_into(out, src, scale, backend)
    return out


Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def forward(hidden, weight, bias, targets, divisor, opts: Options, compute_dtype, need, shard=None):
    """The forward op's work: (loss, lse, grads). hidden [N, D] and targets [N] are flattened
    (shift applied); hidden, weight and bias come in their own dtypes and run in compute_dtype.

    loss is reduced as opts.reduction says; lse [N] is what reduction "none" keeps for backward.
    For "mean" and "sum", grads holds dX, dW, db where ``need`` asks for them (else None), laid
    out as grad_layout says, for scale_grads to finish in backward. For "none", or when no
    gradient is needed, only the loss runs (one pass per chunk, no gradient buffers).
    """
    x, w = hidden.to(compute_dtype), weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    f32 = dict(dtype=torch.float32, device=x.device)
    loss, lse = torch.empty(x.shape[0], **f32), torch.empty(x.shape[0], **f32)
    if opts.reduction == "none" or not any(need):
        plan = _plan(opts, hidden, weight, bias, compute_dtype, (False, False, False))
        _token_pass(x, w, b, targets, opts, plan, loss=loss, lse=lse, shard=shard)
        return _reduce(loss, opts.reduction, divisor), lse, (None, None, None)
    # The chunk holds the unscaled gradient (entries in [-1, 1]: no fp16 underflow of p / n);
    # the mean's 1/divisor joins grad_output in backward, in fp32, except in the gradients that
    # the plan rounds in forward (times 1/divisor).
    plan, dtypes, prescaled = grad_layout(opts, hidden, weight, bias, compute_dtype, need)
    grads = empty_grads(x, w, need, dtypes)
    out_scale = None if divisor is None or not prescaled[0] else 1.0 / divisor
    ones = torch.ones((), **f32)
    _run_plan(
        x, w, b, targets, opts, plan, grads, loss=loss, lse=lse, grad_scale=ones, out_scale=out_scale, shard=shard
    )
    return _reduce(loss, opts.reduction, divisor), lse, grads


def scale_grads(
    grads: Grads, prescaled, dtypes, grad_out: torch.Tensor, divisor: torch.Tensor | None, backend
) -> Grads:
    """Backward of "mean" and "sum": forward's gradients times grad_output (and 1/divisor where
    forward did not apply it), each rounded once to its own dtype. A gradient already in its
    dtype is scaled in place (_cast_into): forward's buffers, private to the op, are consumed."""
    scale = grad_out if divisor is None else grad_out / divisor
    return tuple(
        None if g is None else _cast_into(g, grad_out if pre else scale, dt, backend)
        for g, pre, dt in zip(grads, prescaled, dtypes)
    )


def backward_none(
    grad_out, hidden, weight, bias, targets, lse, opts: Options, compute_dtype, need, shard=None
) -> Grads:
    """Backward of reduction "none": the chunk loop again, with each token's grad_output as its
    scale; the gradients come back in their own dtypes (None where not needed)."""
    x, w = hidden.to(compute_dtype), weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    scale = grad_out.reshape(-1).float().contiguous()
    plan, dtypes, _ = grad_layout(opts, hidden, weight, bias, compute_dtype, need)
    grads = empty_grads(x, w, need, dtypes)
    _run_plan(x, w, b, targets, opts, plan, grads, loss=None, lse=lse, grad_scale=scale, out_scale=None, shard=shard)
    own = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    return tuple(g if g is None or g.dtype == dt else _cast_into(g, one, dt, opts.backend) for g, dt in zip(grads, own))


def grad_layout(opts: Options, hidden, weight, bias, compute_dtype, need):
    """(plan, dtypes, prescaled) of the gradients the chunk loop writes: dtypes of dX, dW, db (fp32
    accumulators, except that the plan may round dX, or dX and dW, into their own dtypes), and
    which of them forward has already multiplied by 1/divisor (those it rounds)."""
    plan = _plan(opts, hidden, weight, bias, compute_dtype, need)
    f32 = torch.float32
    if plan is not None and plan.low_memory:
        return plan, (hidden.dtype, weight.dtype, f32), (True, True, True)
    if plan is not None and plan.round_dx:
        return plan, (hidden.dtype, f32, f32), (True, False, False)
    return plan, (f32, f32, f32), (False, False, False)


def empty_grads(x, w, need, dtypes) -> Grads:
    """Uninitialised dX [N, D], dW [V, D], db [V] in dtypes, where need asks for them."""
    shapes = (x.shape, w.shape, w.shape[:1])
    return tuple(torch.empty(s, dtype=dt, device=x.device) if n else None for n, s, dt in zip(need, shapes, dtypes))


def _run_plan(x, w, b, targets, opts, plan, grads: Grads, *, loss, lse, grad_scale, out_scale, shard) -> None:
    """The chunk loop of a plan, writing grads (and loss, lse if loss is given). The low-memory
    plan: a token pass (loss, dX), then a vocabulary pass (dW, db); each gradient is summed in
    fp32 and rounded once, times out_scale. Otherwise one run_chunks (out_scale for a rounded dX)."""
    dx, dw, db = grads
    opts = _with_plan(opts, plan)
    if plan is not None and plan.low_memory:
        _token_pass(x, w, b, targets, opts, plan, loss=loss, lse=lse, grad_scale=grad_scale, dx=dx, out_scale=out_scale)
        if dw is not None or db is not None:
            run_vocab_blocks(
                x, w, b, targets, opts, plan, lse=lse, grad_scale=grad_scale, dw=dw, db=db, out_scale=out_scale
            )
        return
    run_chunks(
        x,
        w,
        b,
        targets,
        opts,
        loss=loss,
        lse=lse,
        grad_scale=grad_scale,
        dx=dx,
        dw=dw,
        db=db,
        out_scale=out_scale,
        shard=shard,
        pad=_pad(plan),
    )
    parallel.reduce_hidden_grad(dx, shard)


def _plan(opts: Options, hidden, weight, bias, compute_dtype, need) -> budget.Plan | None:
    """The memory planner's choice under opts.memory_budget (None without a budget). Reads only
    shapes and dtypes, so the op's fake implementation gets the same plan."""
    if opts.memory_budget is None:
        return None
    (N, D), V = hidden.shape, weight.shape[0]
    dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    fp32 = [n and dt != torch.float32 for n, dt in zip(need, dtypes)]
    return budget.plan(
        N,
        V,
        D,
        compute_dtype.itemsize,
        auto_chunk=auto_chunk_size(N, V, D, hidden.device, opts.backend, need[1]),
        budget=opts.memory_budget,
        fp32_dx=fp32[0],
        fp32_dw=fp32[1],
        fp32_db=fp32[2],
        vocab_pass=need[1] or need[2],
        fold_temps=_ops(opts.backend)[1] is torch_impl.fold,
        token_sweep=not (need[0] and opts.softcap is not None and opts.label_smoothing > 0),
        fp32_dx_sum=need[0],
    )


def _with_plan(opts: Options, plan: budget.Plan | None) -> Options:
    return opts if plan is None else dataclasses.replace(opts, chunk_size=plan.chunk)


def _pad(plan: budget.Plan | None) -> bool:
    return plan is None or plan.pad


def _reduce(loss: torch.Tensor, reduction: str, divisor: torch.Tensor | None) -> torch.Tensor:
    """Per-token losses -> the result: as they are ("none"), their sum, or sum / divisor."""
    if reduction == "none":
        return loss
    return loss.sum() if divisor is None else loss.sum() / divisor
