"""@triton.jit helpers shared by the cross-entropy kernels; fused_cel.backends.torch has a twin
of each, of the same name, and tests/test_kernels.py holds every pair against each other.

With u the transformed logits of a row, p = softmax(u), y its target, eps the label smoothing
and c the z-loss coefficient:
    loss      = (1 - eps) (lse - u_y) + eps (lse - mean u) + c lse**2
    dloss/du_j = p_j (1 + 2 c lse) - eps / V - (1 - eps) [j == y]
    du/dz     = logit_scale (1 - (u / softcap)**2)       (logit_scale alone without softcap)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def transform(z, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw logits (fp32) -> the logits the loss sees: scaled, then capped."""
    u = z * logit_scale
    if HAS_SOFTCAP:
        # tanh(x) = 2 sigmoid(2x) - 1 has an absolute error ~1e-7: for |x| < 1/4 an odd
        # polynomial instead (Taylor to x**9, truncation < 1e-8), so that small capped logits
        # keep a relative accuracy (a mean of them may cancel to far less than the logits).
        x = u * (1.0 / softcap)
        x2 = x * x
        poly = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
        u = softcap * tl.where(tl.abs(x) < 0.25, poly, 2.0 * tl.fdiv(1.0, 1.0 + tl.exp(-2.0 * x)) - 1.0)
    return u


@triton.jit
def target_logit(row_ptr, target, vocab_start, V, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """The target's column in a row of V columns (global ids vocab_start ..), whether the row
    holds it, and its transformed logit (read before a gradient pass overwrites the row)."""
    local = target - vocab_start
    here = (local >= 0) & (local < V)
    u_y = transform(tl.load(row_ptr + tl.where(here, local, 0)).to(tl.float32), logit_scale, softcap, HAS_SOFTCAP)
    return local, here, u_y


@triton.jit
def merge(m, s, block_m, block_s):
    """Running softmax statistics (max m, sum s of exp(u - m)) merged with a block's, given as
    per-element maxima and sums (a row's values themselves: block_s = 1)."""
    m_new = tl.maximum(m, tl.max(block_m, axis=0))
    s = s * tl.exp(m - m_new) + tl.sum(block_s * tl.exp(block_m - m_new), axis=0)
    return m_new, s


@triton.jit
def row_stats(row_ptr, V, local, m, s, u_sum, c, s2, mb, uw, w_ptr, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr,
              STATS: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """Running statistics of a row's transformed logits u continued over its V columns, BLOCK_V at
    a time: max m, s = sum of exp(u - m), the sum of u, with STATS the token statistics' sums
    (c = sum of exp(u - m) (u - m), s2 = sum of exp(2 (u - m)), mb = the max of the columns
    before the target's; ``local``: the target's column, which may lie outside), and with
    WEIGHTED uw = sum of w u, w the class weights of these columns (``w_ptr``)."""
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.where(mask, transform(z, logit_scale, softcap, HAS_SOFTCAP), float("-inf"))
        if STATS:
            m_new = tl.maximum(m, tl.max(u, axis=0))
            a = tl.exp(m - m_new)
            e = tl.exp(u - m_new)
            shift = tl.where(m == float("-inf"), 0.0, m - m_new)  # -inf * 0 would be NaN
            c = (c + shift * s) * a + tl.sum(e * tl.where(mask, u - m_new, 0.0), axis=0)
            s2 = s2 * a * a + tl.sum(e * e, axis=0)
            mb = tl.maximum(mb, tl.max(tl.where(cols < local, u, float("-inf")), axis=0))
            s = s * a + tl.sum(e, axis=0)
            m = m_new
        else:
            m, s = merge(m, s, u, 1.0)
        u_sum += tl.sum(tl.where(mask, u, 0.0), axis=0)
        if WEIGHTED:
            uw += tl.sum(tl.load(w_ptr + cols, mask=mask, other=0.0) * tl.where(mask, u, 0.0), axis=0)
    return m, s, u_sum, c, s2, mb, uw


@triton.jit
def merge_tiles(at, n_tiles, plane, m, s, u_sum, TILE_SUM: tl.constexpr, BLOCK_T: tl.constexpr):
    """The same statistics from the per-tile ones the logits matmul wrote (kernels/logits.py):
    ``at`` points at the row's first tile; planes of max, sum of exp and (TILE_SUM) sum of u."""
    for t0 in range(0, n_tiles, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        ok = offs < n_tiles
        tile_m = tl.load(at + offs, mask=ok, other=float("-inf"))
        tile_s = tl.load(at + plane + offs, mask=ok, other=0.0)
        m, s = merge(m, s, tile_m, tile_s)
        if TILE_SUM:
            u_sum += tl.sum(tl.load(at + 2 * plane + offs, mask=ok, other=0.0), axis=0)
    return m, s, u_sum


@triton.jit
def stats_of_row(row_ptr, V, local, tile_ptr, row, n_tiles, plane, w_ptr, logit_scale, softcap,
                 HAS_SOFTCAP: tl.constexpr, TILE_STATS: tl.constexpr, TILE_SUM: tl.constexpr, BLOCK_T: tl.constexpr,
                 STATS: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """row_stats from scratch: the row read, or (not with STATS or WEIGHTED) merged from the
    tiles."""
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    u_sum = tl.zeros((), tl.float32)
    c = tl.zeros((), tl.float32)
    s2 = tl.zeros((), tl.float32)
    mb = tl.full((), float("-inf"), tl.float32)
    uw = tl.zeros((), tl.float32)
    if TILE_STATS:
        m, s, u_sum = merge_tiles(tile_ptr + row * n_tiles, n_tiles, plane, m, s, u_sum, TILE_SUM, BLOCK_T)
    else:
        m, s, u_sum, c, s2, mb, uw = row_stats(row_ptr, V, local, m, s, u_sum, c, s2, mb, uw, w_ptr, logit_scale,
                                               softcap, HAS_SOFTCAP, STATS, WEIGHTED, BLOCK_V)  # fmt: skip
    return m, s, u_sum, c, s2, mb, uw


@triton.jit
def token_stats(m, log_s, u_sum, pu, p2, mb, u_y, vocab_total):
    """(entropy, whether the target is the first argmax, mean logit, log sum p**2) of a token
    from its row's statistics: pu = E_p[u - m], p2 = sum of p**2, mb = the max of the columns
    before the target's. The entropy is lse - E_p[u] = log s - E_p[u - m]: no cancellation when
    one class takes nearly all the mass."""
    return log_s - pu, (u_y >= m) & (u_y > mb), u_sum / vocab_total, tl.log(p2)


@triton.jit
def token_loss(m, log_s, u_sum, u_y, vocab_total, label_smoothing, z_loss, w_y, w_total, WEIGHTED: tl.constexpr):
    """A token's loss from its row's statistics; lse = m + log_s is kept apart so that
    (m - u_y) + log_s loses nothing when u_y is the max. WEIGHTED (class weights w): u_sum is
    sum_c w_c u_c, w_y the target's weight, w_total = sum_c w_c; each term as F.cross_entropy's
    weight= makes it, the z-loss times w_y."""
    lse = m + log_s
    if WEIGHTED:
        loss = w_y * (1.0 - label_smoothing) * ((m - u_y) + log_s)
        loss += (label_smoothing / vocab_total) * (w_total * lse - u_sum)
        loss += z_loss * w_y * lse * lse
    else:
        loss = (1.0 - label_smoothing) * ((m - u_y) + log_s)
        loss += label_smoothing * ((m - u_sum / vocab_total) + log_s)
        loss += z_loss * lse * lse
    return loss


@triton.jit
def grad_at_target(u_y, m, log_s, lse, vocab_total, label_smoothing, z_loss, w_y, w_total, WEIGHTED: tl.constexpr):
    """dloss/du at the target column. p_y - 1 is formed first, in fp32 (exactly, for p_y >= 1/2),
    so a confident token loses nothing to cancellation."""
    p_y = tl.exp((u_y - m) - log_s)
    if WEIGHTED:
        g_y = w_y * ((1.0 - label_smoothing) * (p_y - 1.0) + 2.0 * z_loss * lse * p_y)
        g_y += (label_smoothing / vocab_total) * (w_total * p_y - w_y)
    else:
        g_y = (1.0 - label_smoothing) * (p_y - 1.0) + label_smoothing * (p_y - 1.0 / vocab_total)
        g_y += 2.0 * z_loss * lse * p_y
    return g_y


@triton.jit
def p_coef(lse, vocab_total, label_smoothing, z_loss, w_y, w_total, WEIGHTED: tl.constexpr):
    """The factor of p_j in dloss/du_j: 1 + 2 c lse, or with class weights
    w_y (1 - eps) + eps w_total / V + 2 c w_y lse."""
    if WEIGHTED:
        return w_y * (1.0 - label_smoothing) + label_smoothing / vocab_total * w_total + 2.0 * z_loss * w_y * lse
    return 1.0 + 2.0 * z_loss * lse


@triton.jit
def softmax_grad(u, m, log_s, p_coef, label_smoothing, vocab_total, w):
    """dloss/du at the columns other than the target; w: their class weights (1 without)."""
    return tl.exp((u - m) - log_s) * p_coef - label_smoothing / vocab_total * w


@triton.jit
def softcap_grad(u, inv_cap):
    """du/dz over logit_scale, from the capped u: 1 - tanh**2."""
    t = u * inv_cap
    return 1.0 - t * t


@triton.jit
def write_grad(row_ptr, V, local, m, log_s, p_coef, coef, label_smoothing, vocab_total, logit_scale, softcap,
               ent_coef, mean_u, w_ptr, HAS_SOFTCAP: tl.constexpr, ENT_GRAD: tl.constexpr, WEIGHTED: tl.constexpr,
               STATS: tl.constexpr, BLOCK_V: tl.constexpr, ROUND_BF16: tl.constexpr):  # fmt: skip
    """Overwrite a row, in place and in its own dtype, with coef * dloss/du * du/dz (plus, with
    ENT_GRAD, ent_coef * dH/du * du/dz, H the entropy); the target column (``local``, if in the
    row) is written 0: its gradient leaves as one fp32 number. WEIGHTED: w_ptr holds the
    columns' class weights. Returns, with STATS, the token statistics' sums (E_p[u - m], sum of
    p**2, the max of the columns before the target's), else zeros."""
    if HAS_SOFTCAP:
        inv_cap = 1.0 / softcap  # one division per row, not per element
    # Per lane, reduced once after the loop: the p the gradient needs anyway makes them cheap.
    pu_v = tl.zeros((BLOCK_V,), tl.float32)
    p2_v = tl.zeros((BLOCK_V,), tl.float32)
    mb_v = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        u = transform(z, logit_scale, softcap, HAS_SOFTCAP)
        if WEIGHTED:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        else:
            w = 1.0
        if STATS:
            p = tl.where(mask, tl.exp((u - m) - log_s), 0.0)
            pu_v += p * (u - m)
            p2_v += p * p
            mb_v = tl.maximum(mb_v, tl.where(cols < local, u, float("-inf")))
        d = softmax_grad(u, m, log_s, p_coef, label_smoothing, vocab_total, w)
        d = tl.where(cols == local, 0.0, d)
        if HAS_SOFTCAP:
            g = softcap_grad(u, inv_cap)
            d = d * g
        d = d * coef
        if ENT_GRAD:
            h = tl.where(cols == local, 0.0, ent_coef * entropy_grad(u, m, log_s, mean_u))
            if HAS_SOFTCAP:
                h = h * g
            d = d + h
        if ROUND_BF16:
            d = round_bf16(d)
        tl.store(row_ptr + cols, d.to(row_ptr.dtype.element_ty), mask=mask)
    pu = tl.zeros((), tl.float32)
    p2 = tl.zeros((), tl.float32)
    mb = tl.full((), float("-inf"), tl.float32)
    if STATS:
        pu = tl.sum(pu_v, axis=0)
        p2 = tl.sum(p2_v, axis=0)
        mb = tl.max(mb_v, axis=0)
    return pu, p2, mb


@triton.jit
def entropy_grad(u, m, log_s, mean_u):
    """dH/du of the entropy H = lse - E_p[u]: -p (u - E_p[u])."""
    return -tl.exp((u - m) - log_s) * (u - mean_u)


@triton.jit
def round_bf16(x):
    """fp32 -> bf16, round to nearest even, by bits: Triton's CPU interpreter truncates in
    .to(tl.bfloat16), which would double the gradient's rounding error there; GPUs round."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


def launch_rows(kernel, logits, *args, block_max=4096, warps=None, **meta) -> None:
    """Launch a row kernel: one program per row of ``logits`` (unit column stride), whose first
    arguments are the logits and their row stride, then ``args``; BLOCK_V columns a step (at most
    block_max), with ``warps`` warps (by default 8 from 2048 columns a step, else 4)."""
    rows, V = logits.shape
    if rows == 0:
        return
    block = min(triton.next_power_of_2(V), block_max)
    warps = warps or (8 if block >= 2048 else 4)
    kernel[(rows,)](logits, logits.stride(0), *args, BLOCK_V=block, num_warps=warps, **meta)


def tile_args(tile_stats) -> tuple:
    """(tile_ptr, n_tiles, tile_plane) of the logits matmul's statistics [2 or 3, rows, tiles]."""
    _, rows, tiles = (0, 1, 1) if tile_stats is None else tile_stats.shape
    return tile_stats, tiles, rows * tiles


# The kernels' flags, derived from their arguments (triton.heuristics): absent inputs are None.
HAS_SOFTCAP = {"HAS_SOFTCAP": lambda a: a["softcap"] is not None}
WEIGHTED = {  # class weights (w_ptr: the whole vocabulary's); each column's is read only with label smoothing
    "WEIGHTED": lambda a: a["w_ptr"] is not None,
    "COLUMN_WEIGHTS": lambda a: a["w_ptr"] is not None and a["label_smoothing"] > 0,
}
TILES = {  # tile_ptr: the logits matmul's per-tile statistics, merged instead of reading the row
    "TILE_STATS": lambda a: a["tile_ptr"] is not None,
    "TILE_SUM": lambda a: a["tile_ptr"] is not None and a["tile_ptr"].shape[0] == 3,  # the sums' plane
    "BLOCK_T": lambda a: min(triton.next_power_of_2(a["n_tiles"]), 1024),  # tiles merged per step
}
# The CPU interpreter truncates in .to(tl.bfloat16): a bf16 row written there is rounded by bits.
ROUND_BF16 = {"ROUND_BF16": lambda a: a["logits_ptr"].device.type == "cpu" and a["logits_ptr"].dtype == torch.bfloat16}
