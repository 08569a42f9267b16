"""The default plan: the chunk loop, three matmuls per chunk.

For each chunk of tokens:  logits = X_c @ W.T (+ b)   -> one preallocated [chunk, V] buffer
                           loss, lse, and d(loss)/d(logits) in place   (a backend's kernel)
                           dX_c  = dlogits @ W          (own rows of dX)
                           dW   += dlogits.T @ X_c      (summed over the chunks)
                           db   += dlogits.sum(0)
so the whole [N, V] logits tensor never exists. dlogits is split as dense + a * onehot(y): the
buffer holds every entry but the target's (written 0), and the target entry (one fp32 number a per
token) is folded in without rounding, as dX_c += a * W[y], dW[y] += a * X_c (the fold). dX and
dW are summed in fp32 (cuBLAS accumulates in fp32 and writes fp32) and rounded once, by the
caller (fused_cel.op), or here chunk by chunk where the plan says so.
"""

from __future__ import annotations

import dataclasses

import torch

from . import backends, parallel
from .options import Options
from .plan import Plan


@dataclasses.dataclass
class Work:
    """The tensors of one pass: its inputs, in the compute dtype, and what it writes."""

    x: torch.Tensor  # [N, D]
    w: torch.Tensor  # [V, D]
    b: torch.Tensor | None  # [V]
    targets: torch.Tensor  # [N] (shift applied)
    lse: torch.Tensor  # [N] fp32: written with the loss, else read (a gradient pass)
    loss: torch.Tensor | None = None  # [N] fp32: each token's loss, written if given
    scale: torch.Tensor | None = None  # fp32, one element or [N]: each token's gradient multiplier
    dx: torch.Tensor | None = None  # [N, D] out: fp32, or its own dtype where the plan rounds it here
    dw: torch.Tensor | None = None  # [V, D] out, fp32 (the low-memory plan: its own dtype)
    db: torch.Tensor | None = None  # [V] out, fp32
    out_scale: torch.Tensor | None = None  # what the gradients rounded here are multiplied by
    entropy: torch.Tensor | None = None  # [N] fp32: written with the loss (token statistics), or read
    extras: torch.Tensor | None = None  # [N, 3] fp32 out with the loss: top-1, mean logit, log sum p**2
    ent_scale: torch.Tensor | None = None  # [N] fp32: each token's multiplier of its entropy's gradient
    class_weight: torch.Tensor | None = None  # [V] fp32 (the whole vocabulary's): F.cross_entropy's weight=
    class_weight_sum: torch.Tensor | None = None  # [1] fp32
    # The pass's tokens as rows of x and dx (the counted ones, fused_cel.op): per-token tensors
    # above have one entry per pass token, x and dx all N rows. None: every row, in order.
    rows: torch.Tensor | None = None  # [n] int64

    @property
    def n_tokens(self) -> int:
        return self.targets.shape[0]

    def x_rows(self, start: int, end: int) -> torch.Tensor:
        """x of the pass's tokens start:end (a gathered copy when the pass has row indices)."""
        return self.x[start:end] if self.rows is None else self.x.index_select(0, self.rows[start:end])

    def write_dx(self, be, start: int, tile: torch.Tensor) -> None:
        """The fp32 dX of the pass's tokens start:start + len(tile), times out_scale, rounded once
        into dx's rows (scattered to their rows when the pass has row indices)."""
        end = start + tile.shape[0]
        if self.rows is None:
            be.round_into(self.dx[start:end], tile, self.out_scale)
            return
        if self.dx.dtype != tile.dtype or self.out_scale is not None:
            rounded = torch.empty(tile.shape, dtype=self.dx.dtype, device=tile.device)
            be.round_into(rounded, tile, self.out_scale)
            tile = rounded
        self.dx.index_copy_(0, self.rows[start:end], tile)

    def with_class_weight(self, class_weight: torch.Tensor | None) -> None:
        if class_weight is not None:
            self.class_weight, self.class_weight_sum = class_weight, class_weight.sum().reshape(1)

    @property
    def writes_grad(self) -> bool:
        return self.dx is not None or self.dw is not None or self.db is not None


def run(work: Work, opts: Options, plan: Plan, shard: parallel.Shard | None = None) -> None:
    """The chunk loop over work.x in chunks of plan.chunk_size tokens: per-token loss and lse
    (if work.loss is given), and the gradients work asks for, overwritten (not added to).
    ``shard``: w and b are this rank's rows of a vocabulary split over a process group; each
    chunk's statistics are combined over the group, and dX, this shard's part, is summed over
    it at the end unless the options leave that to the caller."""
    x, w, b, targets = work.x, work.w, work.b, work.targets
    N, D, V = work.n_tokens, x.shape[1], w.shape[0]
    dx, dw, db = work.dx, work.dw, work.db
    if N == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return
    chunk = min(plan.chunk_size, N)
    # A V that is not a multiple of 64 (GPT-2's 50257) pushes cuBLAS off its fast kernels, so W
    # is padded with zero rows (a copy of W, only for such V): their logits are exactly 0 and add
    # nothing to dX.
    v_pad = -(-V // 64) * 64 if plan.pad else V
    w_mm, b_mm = w, b
    if v_pad != V:
        w_mm = torch.nn.functional.pad(w, (0, 0, 0, v_pad - V))
        b_mm = None if b is None else torch.nn.functional.pad(b, (0, v_pad - V))
    be = backends.get(opts.backend, x, w_mm)
    f32 = dict(dtype=torch.float32, device=x.device)
    buf = torch.empty((chunk, v_pad), dtype=x.dtype, device=x.device)
    tile_buf, planes = None, 3 if opts.label_smoothing else 2
    weighted = work.class_weight is not None
    cw = dict(class_weight=work.class_weight, class_weight_sum=work.class_weight_sum) if weighted else {}
    if be.tile_stats and work.loss is not None and work.extras is None and not weighted:  # the matmul's statistics
        tile_buf = torch.empty(planes * chunk * be.n_tiles(V), **f32)
    shard_stats = None
    if shard is not None and work.loss is not None:  # with the token statistics' sums: 7 a token
        shard_stats = torch.empty((chunk, (4 if work.extras is None else 7) + weighted), **f32)
    target_grad = torch.empty(chunk, **f32) if work.writes_grad else None
    dx_tile = None
    if dx is not None and (dx.dtype != torch.float32 or work.out_scale is not None or work.rows is not None):
        dx_tile = torch.empty((chunk, D), **f32)  # each chunk's dX summed in fp32, then rounded (or scattered)
    per_token_scale = work.scale is not None and work.scale.numel() != 1
    at = {} if shard is None else dict(vocab_start=shard.start, vocab_total=shard.total)
    if db is not None:
        db.zero_()
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        rows = end - start
        xc = None  # (the last chunk's gathered rows freed before the next are gathered: one copy at a time)
        xc, tt, lse, logits_mm = work.x_rows(start, end), targets[start:end], work.lse[start:end], buf[:rows]
        logits = logits_mm[:, :V]
        loss = None if work.loss is None else work.loss[start:end]
        scale = work.scale[start:end] if per_token_scale else work.scale
        tg = None if target_grad is None else target_grad[:rows]
        stats = {}
        if work.extras is not None:  # the token statistics, written with the loss
            stats = dict(entropy=work.entropy[start:end], extras=work.extras[start:end])
        elif work.ent_scale is not None:  # the entropy's gradient
            stats = dict(ent_scale=work.ent_scale[start:end], entropy=work.entropy[start:end])
        tiles = None if tile_buf is None else tile_buf[: planes * rows * be.n_tiles(V)].view(planes, rows, -1)
        be.logits(xc, w_mm, b_mm, logits_mm, tiles, n_valid=V, opts=opts)
        if loss is None:  # the lse is known: the gradient alone
            be.gradient(logits, tt, lse, scale, tg, opts, **at, **stats, **cw)
        elif shard is None:  # loss, lse and the gradient (if wanted) in one pass
            be.cross_entropy(logits, tt, loss, lse, opts, scale=scale, target_grad=tg, tile_stats=tiles, **stats, **cw)
        else:  # this shard's statistics, combined over the group; then its part of the gradient
            be.shard_stats(logits, tt, shard_stats[:rows], opts, vocab_start=shard.start, tile_stats=tiles,
                           class_weight=work.class_weight)  # fmt: skip
            parallel.combine(shard_stats[:rows], tt, loss, lse, shard, opts, **stats, **cw)
            if tg is not None:
                be.gradient(logits, tt, lse, scale, tg, opts, **at, **cw)
        if tg is None:
            continue
        # The target entries: token t's gradient at its target y_t is tg_t (0 where ignored, or
        # where y_t is on another shard).
        y = (tt - (0 if shard is None else shard.start)).clamp(0, V - 1)
        if dx is not None:
            dxc = dx[start:end] if dx_tile is None else dx_tile[:rows]
            be.mm(logits_mm, w_mm, out=dxc)
            be.fold(dxc, None, w, y, tg)
            if dx_tile is not None:  # summed over the group in fp32, before its one rounding
                parallel.reduce_hidden_grad(dxc, shard)
                work.write_dx(be, start, dxc)
        if dw is not None:
            be.mm(logits.t(), xc, out=dw, accumulate=start > 0)
            be.fold(dw, y, xc, None, tg)
        if db is not None:
            db.add_(logits.sum(0, dtype=torch.float32))
            db.index_add_(0, y, tg)
    if dx_tile is None:
        parallel.reduce_hidden_grad(dx, shard)
