"""The low-memory plan: loss and gradients with fp32 tiles instead of whole accumulators.

Chosen by fused_cel.plan when the default plan's fp32 dX and dW sums do not fit the memory
budget. Two passes, 4 matmuls instead of 3 (2 for a frozen head), every gradient still summed in
fp32 and rounded once (times work.out_scale), so its errors are the default plan's:

  token pass       loss, lse and dX, a few thousand tokens at a time: W in blocks of rows, an
                   online softmax over them (token_sweep), or chunks of whole rows (fused_cel.chunks)
                   where the sweep's per-row state does not suffice: softcap with label smoothing
                   (the smoothing term's derivative then differs per column), class weights, the
                   token statistics and the entropy's gradient;
  vocabulary pass  dW and db: W in blocks of rows, each block's logits recomputed for all tokens
                   with the known lse (vocab_pass).
"""

from __future__ import annotations

import dataclasses

import torch

from . import backends, chunks
from .backends.torch import grad_at_target, softcap_grad, store_loss
from .chunks import Work
from .options import Options
from .plan import Plan


def run(work: Work, opts: Options, plan: Plan) -> None:
    """The token pass (loss, lse, dX), then the vocabulary pass (dW, db) if they are wanted."""
    token = dataclasses.replace(work, dw=None, db=None)
    if plan.block_vocab:
        token_sweep(token, opts, plan)
    else:
        chunks.run(token, opts, plan)
    if work.dw is not None or work.db is not None:
        vocab_pass(work, opts, plan)


def token_sweep(work: Work, opts: Options, plan: Plan) -> None:
    """Loss, lse and dX with a chunk x block buffer, never a row of the whole vocabulary (whose
    chunk would be a few hundred tokens at 64 MiB, so that the matmuls re-read W for each).

    plan.chunk_size tokens at a time, W in blocks of plan.block_vocab rows. Per block: the
    logits, their statistics merged into running ones (kernels/online_softmax.py), and, if dX is
    wanted, the block overwritten with P = exp(u - m) du/dz (its target column 0) and
    A = A * exp(m_old - m) + P @ W_block: the online softmax of flash attention, with W as both
    keys and values. At the end lse = m + log s and, with e = scale * logit_scale * eps / V,
        dX_t = scale (1 + 2c lse) / s * A_t - e * sum_v W_v + (target gradient_t + e) * W_y
    summed in fp32 and rounded once into dx (times out_scale). The eps term needs du/dz to be the
    same for every column: not with softcap (the plan then takes chunks of whole rows).
    work.loss None: the loss and lse are recomputed but not written (backward knows them).
    """
    x, w, b, targets, dx = work.x, work.w, work.b, work.targets, work.dx
    N, D, V = work.n_tokens, x.shape[1], w.shape[0]
    be = backends.get(opts.backend)
    eps, z, cap, ls = opts.label_smoothing, opts.z_loss, opts.softcap, opts.logit_scale
    whole_rows = (dx is not None and eps and cap is not None) or work.class_weight is not None
    if whole_rows or work.extras is not None or work.ent_scale is not None:
        raise ValueError(
            "token_sweep: softcap with label smoothing, class weights, the token statistics and the entropy's "
            "gradient need chunks of whole rows"
        )
    tokens_max, cols_max = min(plan.chunk_size, N), min(plan.block_vocab, V)
    f32 = dict(dtype=torch.float32, device=x.device)
    buf = torch.empty(tokens_max * cols_max, dtype=x.dtype, device=x.device)
    stats = torch.empty((tokens_max, 4), **f32)
    alpha_buf = torch.empty(tokens_max, **f32)
    acc = torch.empty((tokens_max, D), **f32) if dx is not None else None
    scratch = torch.empty((2, tokens_max), **f32)  # loss and lse when not kept
    colsum = w.sum(0, dtype=torch.float32) if dx is not None and eps else None
    for t0 in range(0, N, tokens_max):
        n = min(t0 + tokens_max, N) - t0
        xc = None  # (the last step's gathered rows freed before the next are gathered)
        xc, tt, a = work.x_rows(t0, t0 + n), targets[t0 : t0 + n], None if acc is None else acc[:n]
        running, alpha = stats[:n], alpha_buf[:n]
        running[:, 0], running[:, 1:] = float("-inf"), 0.0  # m, then s, sum of u, target logit
        for v0, cols in vocab_blocks(V, cols_max):
            logits, w_blk = buf[: n * cols].view(n, cols), w[v0 : v0 + cols]
            be.logits(xc, w_blk, None if b is None else b[v0 : v0 + cols], logits)
            be.online_softmax(logits, tt, running, alpha, opts, vocab_start=v0, vocab_total=V, write_p=a is not None)
            if a is None:
                continue
            if v0 > 0:
                be.scale_rows_(a, alpha)
            be.mm(logits, w_blk, out=a, accumulate=v0 > 0)
        m, s, u_sum, u_y = running.unbind(1)
        log_s = torch.log(s)
        keep = work.loss is not None
        loss, lse = (work.loss[t0 : t0 + n], work.lse[t0 : t0 + n]) if keep else (scratch[0, :n], scratch[1, :n])
        store_loss(loss, lse, m, log_s, u_sum, u_y, tt, V, opts)
        if a is None:
            continue
        y = tt.long()
        counts = (y >= 0) & (y < V) & (y != opts.ignore_index)
        scale = work.scale[t0 : t0 + n] if work.scale.numel() != 1 else work.scale.reshape(1).expand(n)
        scale = torch.where(counts, scale.float(), 0.0)
        g_y = grad_at_target(u_y, m, log_s, lse, V, eps, z)
        if cap is not None:
            g_y = g_y * softcap_grad(u_y, 1.0 / cap)
        g_y = g_y * scale * ls
        a.mul_((scale * (1.0 + 2.0 * z * lse) / s)[:, None])
        if colsum is not None:
            e = scale * (ls * eps / V)
            a.addr_(e, colsum, alpha=-1.0)
            g_y = g_y + e
        be.fold(a, None, w, y.clamp(0, V - 1), g_y)
        work.write_dx(be, t0, a)


def vocab_pass(work: Work, opts: Options, plan: Plan) -> None:
    """dW and db without a V x D fp32 accumulator.

    W in blocks of plan.block_rows rows; per block, the logits of every token (plan.block_tokens
    at a time) are recomputed and turned into the gradient with the known lse, and the block's
    dW (db) is summed in an fp32 tile and rounded once into dw (db), times out_scale.
    """
    x, w, b, targets, dw, db = work.x, work.w, work.b, work.targets, work.dw, work.db
    N, D, V = work.n_tokens, x.shape[1], w.shape[0]
    be = backends.get(opts.backend)
    per_token_scale = work.scale.numel() != 1
    rows_max, tokens_max = min(plan.block_rows, V), min(plan.block_tokens, N)
    f32 = dict(dtype=torch.float32, device=x.device)
    buf = torch.empty(rows_max * tokens_max, dtype=x.dtype, device=x.device)
    target_grad = torch.empty(tokens_max, **f32)
    acc = torch.empty((rows_max, D), **f32) if dw is not None else None
    acc_b = torch.empty(rows_max, **f32) if db is not None else None
    whole = work.x_rows(0, N) if N <= tokens_max else None  # one step: its rows gathered once, not per block
    for v0, rows in vocab_blocks(V, rows_max):
        for t0 in range(0, N, tokens_max):
            n = min(t0 + tokens_max, N) - t0
            xc = None  # (the last step's gathered rows freed before the next are gathered)
            xc, tt, tg = whole if whole is not None else work.x_rows(t0, t0 + n), targets[t0 : t0 + n], target_grad[:n]
            logits = buf[: n * rows].view(n, rows)
            be.logits(xc, w[v0 : v0 + rows], None if b is None else b[v0 : v0 + rows], logits)
            scale = work.scale[t0 : t0 + n] if per_token_scale else work.scale
            ent = {}
            if work.ent_scale is not None:
                ent = dict(ent_scale=work.ent_scale[t0 : t0 + n], entropy=work.entropy[t0 : t0 + n])
            if work.class_weight is not None:
                ent.update(class_weight=work.class_weight, class_weight_sum=work.class_weight_sum)
            be.gradient(logits, tt, work.lse[t0 : t0 + n], scale, tg, opts, vocab_start=v0, vocab_total=V, **ent)
            y = (tt - v0).clamp(0, rows - 1)  # tg is 0 where y is not in the block
            if acc is not None:
                be.mm(logits.t(), xc, out=acc[:rows], accumulate=t0 > 0)
                be.fold(acc[:rows], y, xc, None, tg)
            if acc_b is not None:
                if t0 == 0:
                    acc_b.zero_()
                acc_b[:rows].add_(logits.sum(0, dtype=torch.float32))
                acc_b[:rows].index_add_(0, y, tg)
        if acc is not None:
            be.round_into(dw[v0 : v0 + rows], acc[:rows], work.out_scale)
        if acc_b is not None:
            be.round_into(db[v0 : v0 + rows], acc_b[:rows], work.out_scale)


def vocab_blocks(vocab: int, width: int):
    """(first row, rows) of the blocks the passes walk W in, ``width`` rows each. This plan has
    no padded W, and cuBLAS is several times slower for an odd matrix size: so a large last block
    of an odd vocabulary (GPT-2 at 256 MiB: 20177 rows) is cut into a multiple of 64 rows and the
    vocab % 64 rows after them; a small one stays whole (one more launch cost more there)."""
    for v0 in range(0, vocab, width):
        rows = min(v0 + width, vocab) - v0
        if rows > 1024 and rows % 64:
            yield v0, rows // 64 * 64
            yield v0 + rows // 64 * 64, rows % 64
        else:
            yield v0, rows
