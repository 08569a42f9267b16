"""The torch backend: the pure-PyTorch twin of every Triton kernel, and the matmuls.

Each function here has the name, arguments and effects of its counterpart in fused_cel.kernels
(the helpers of kernels/common.py first, then one launcher per kernel file), written with torch
ops so that it runs anywhere and reads as the statement of what the kernel computes. It works
in fp32 temporaries the size of a chunk, never of the whole batch. TorchBackend binds them into
the object the loops call; TritonBackend (backends/triton.py) replaces the kernels' twins.
"""

from __future__ import annotations

import torch

from ..options import Options

# -- the helpers of kernels/common.py ---------------------------------------------------------


def transform(z, logit_scale, softcap):
    """Raw logits -> the logits the loss sees: scaled, then capped."""
    u = z * logit_scale
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    return u


def merge(m, s, block_m, block_s):
    """Running softmax statistics (max m, sum s of exp(u - m)) merged with a block's, given as
    per-element maxima and sums along the last dim (a row's values themselves: block_s = 1)."""
    m_new = torch.maximum(m, block_m.amax(-1))
    s = s * torch.exp(m - m_new) + (block_s * torch.exp(block_m - m_new[..., None])).sum(-1)
    return m_new, s


def row_stats(u, local, m, s, u_sum, c, s2, mb, stats: bool, w=None):
    """Running statistics continued over the rows of u [rows, V] (transformed): max m, the sum of
    exp(u - m), the sum of u, and with ``stats`` c = sum of exp(u - m) (u - m), s2 = sum of
    exp(2 (u - m)) and mb = the max of the columns before ``local``, each row's target column;
    and uw = sum of w u with class weights w of the columns (0 without)."""
    if stats:
        m_new = torch.maximum(m, u.amax(-1))
        a = torch.exp(m - m_new)
        e = torch.exp(u - m_new[:, None])
        shift = torch.where(m == float("-inf"), 0.0, m - m_new)
        c = (c + shift * s) * a + (e * (u - m_new[:, None])).sum(-1)
        s2 = s2 * a * a + (e * e).sum(-1)
        before = torch.arange(u.shape[1], device=u.device) < local[:, None]
        mb = torch.maximum(mb, torch.where(before, u, float("-inf")).amax(-1))
        s, m = s * a + e.sum(-1), m_new
    else:
        m, s = merge(m, s, u, 1.0)
    uw = 0.0 if w is None else (u * w).sum(-1)
    return m, s, u_sum + u.sum(-1), c, s2, mb, uw


def merge_tiles(tiles, m, s, u_sum):
    """The same statistics from the logits matmul's per-tile ones, [2 or 3, rows, n_tiles]."""
    m, s = merge(m, s, tiles[0], tiles[1])
    return m, s, (u_sum + tiles[2].sum(-1) if len(tiles) == 3 else u_sum)


def token_stats(m, log_s, u_sum, pu, p2, mb, u_y, vocab_total):
    """(entropy, whether the target is the first argmax, mean logit, log sum p**2); pu = E_p[u - m],
    p2 = sum of p**2."""
    return log_s - pu, (u_y >= m) & (u_y > mb), u_sum / vocab_total, torch.log(p2)


def token_loss(m, log_s, u_sum, u_y, vocab_total, label_smoothing, z_loss, w_y=None, w_total=None):
    """A token's loss from its row's statistics ((m - u_y) + log_s: no cancellation); with class
    weights (w_y, w_total given) u_sum is the weighted sum of u."""
    lse = m + log_s
    if w_y is not None:
        loss = w_y * (1.0 - label_smoothing) * ((m - u_y) + log_s)
        loss = loss + (label_smoothing / vocab_total) * (w_total * lse - u_sum)
        return loss + z_loss * w_y * lse * lse
    loss = (1.0 - label_smoothing) * ((m - u_y) + log_s)
    loss = loss + label_smoothing * ((m - u_sum / vocab_total) + log_s)
    return loss + z_loss * lse * lse


def grad_at_target(u_y, m, log_s, lse, vocab_total, label_smoothing, z_loss, w_y=None, w_total=None):
    """dloss/du at the target column (p_y - 1 formed first)."""
    p_y = torch.exp((u_y - m) - log_s)
    if w_y is not None:
        g_y = w_y * ((1.0 - label_smoothing) * (p_y - 1.0) + 2.0 * z_loss * lse * p_y)
        return g_y + (label_smoothing / vocab_total) * (w_total * p_y - w_y)
    g_y = (1.0 - label_smoothing) * (p_y - 1.0) + label_smoothing * (p_y - 1.0 / vocab_total)
    return g_y + 2.0 * z_loss * lse * p_y


def p_coef(lse, vocab_total, label_smoothing, z_loss, w_y=None, w_total=None):
    """The factor of p_j in dloss/du_j."""
    if w_y is not None:
        return w_y * (1.0 - label_smoothing) + label_smoothing / vocab_total * w_total + 2.0 * z_loss * w_y * lse
    return 1.0 + 2.0 * z_loss * lse


def softmax_grad(u, m, log_s, p_coef, label_smoothing, vocab_total, w=1.0):
    """dloss/du at the other columns (m, log_s, p_coef per row, [rows, 1]; w the columns' class
    weights)."""
    return torch.exp((u - m) - log_s) * p_coef - label_smoothing / vocab_total * w


def softcap_grad(u, inv_cap):
    """du/dz over logit_scale, from the capped u."""
    t = u * inv_cap
    return 1.0 - t * t


def entropy_grad(u, m, log_s, mean_u):
    """dH/du of the entropy H = lse - E_p[u]: -p (u - E_p[u])."""
    return -torch.exp((u - m) - log_s) * (u - mean_u)


def write_grad(
    logits, u, local, m, log_s, p_coef, coef, label_smoothing, vocab_total, softcap, ent_coef=None, mean_u=None, w=1.0
):
    """logits <- coef * dloss/du * du/dz (+ ent_coef * dH/du * du/dz), the target column (local)
    0; every argument but u per row, [rows]."""
    d = softmax_grad(u, m[:, None], log_s[:, None], p_coef[:, None], label_smoothing, vocab_total, w)
    target = torch.arange(u.shape[1], device=u.device) == local[:, None]
    d = torch.where(target, 0.0, d)
    g = 1.0 if softcap is None else softcap_grad(u, 1.0 / softcap)
    d = d * g * coef[:, None]
    if ent_coef is not None:
        h = torch.where(target, 0.0, ent_coef[:, None] * entropy_grad(u, m[:, None], log_s[:, None], mean_u[:, None]))
        d = d + h * g
    logits.copy_(d)


def store_loss(loss, lse, m, log_s, u_sum, u_y, targets, vocab_total, opts: Options, weights=None) -> None:
    """loss, lse <- each token's, as the kernels' pass 1 stores them: NaN for a label outside
    [0, vocab_total), 0 for ignore_index. ``weights``: (w_y, w_total) with class weights, u_sum
    then the weighted sum."""
    lse.copy_(m + log_s)
    per_token = token_loss(m, log_s, u_sum, u_y, vocab_total, opts.label_smoothing, opts.z_loss, *(weights or ()))
    y = targets.long()
    per_token = torch.where((y >= 0) & (y < vocab_total), per_token, float("nan"))
    loss.copy_(torch.where(y == opts.ignore_index, 0.0, per_token))


def store_stats(entropy, extras, m, s, log_s, u_sum, c, s2, mb, u_y, targets, vocab_total, opts: Options) -> None:
    """entropy, extras <- each token's statistics, as the kernels' pass 1 stores them: 0 (False)
    where the label is ignored, top-1 False for a label outside [0, vocab_total)."""
    ent, top1, mean_u, log_sum_sq = token_stats(m, log_s, u_sum, c / s, s2 / (s * s), mb, u_y, vocab_total)
    y = targets.long()
    ignored, valid = y == opts.ignore_index, (y >= 0) & (y < vocab_total)
    entropy.copy_(torch.where(ignored, 0.0, ent))
    top1 = (top1 & valid & ~ignored).float()
    extras.copy_(torch.where(ignored[:, None], 0.0, torch.stack([top1, mean_u, log_sum_sq], 1)))


def _weights(class_weight, class_weight_sum, targets, valid):
    """(w_y, w_total) of each row with class weights; None without."""
    if class_weight is None:
        return None
    y = torch.where(valid, targets.long(), 0)
    return class_weight[y], class_weight_sum.expand(len(y))


def _target(logits, targets, opts, vocab_start, vocab_total):
    """u (fp32), the target's column, whether it is here, whether it counts, and its u."""
    u = transform(logits.float(), opts.logit_scale, opts.softcap)
    y = targets.long()
    local = y - vocab_start
    here = (local >= 0) & (local < logits.shape[1])
    counts = (y >= 0) & (y < vocab_total) & (y != opts.ignore_index)
    u_y = u.gather(1, torch.where(here, local, 0)[:, None]).squeeze(1)
    return u, local, here, counts, u_y


def _start(rows, device):
    """Running statistics before the first column: (m, s, u_sum, c, s2, mb)."""
    f32 = dict(dtype=torch.float32, device=device)
    zeros = torch.zeros(rows, **f32)
    ninf = torch.full((rows,), float("-inf"), **f32)
    return ninf, zeros, zeros, zeros, zeros, ninf


# -- one twin per kernel ------------------------------------------------------------------------


def cross_entropy(
    logits,
    targets,
    loss,
    lse,
    opts: Options,
    *,
    scale=None,
    target_grad=None,
    tile_stats=None,
    entropy=None,
    extras=None,
    class_weight=None,
    class_weight_sum=None,
):
    """See kernels.cross_entropy.cross_entropy."""
    rows, V = logits.shape
    if rows == 0:
        return
    u, local, here, counts, u_y = _target(logits, targets, opts, 0, V)
    weights = _weights(class_weight, class_weight_sum, targets, here)
    m, s, u_sum, c, s2, mb = _start(rows, logits.device)
    uw = None
    if tile_stats is not None:
        m, s, u_sum = merge_tiles(tile_stats, m, s, u_sum)
    else:
        m, s, u_sum, c, s2, mb, uw = row_stats(u, local, m, s, u_sum, c, s2, mb, entropy is not None, class_weight)
    log_s = torch.log(s)
    store_loss(loss, lse, m, log_s, u_sum if weights is None else uw, u_y, targets, V, opts, weights)
    if entropy is not None:
        store_stats(entropy, extras, m, s, log_s, u_sum, c, s2, mb, u_y, targets, V, opts)
    if target_grad is None:
        return
    coef = torch.where(counts, scale.float().expand(rows) * opts.logit_scale, 0.0)
    lse_ = m + log_s
    g_y = grad_at_target(u_y, m, log_s, lse_, V, opts.label_smoothing, opts.z_loss, *(weights or ()))
    if opts.softcap is not None:
        g_y = g_y * softcap_grad(u_y, 1.0 / opts.softcap)
    target_grad.copy_(torch.where(here, g_y * coef, 0.0))
    a = p_coef(lse_, V, opts.label_smoothing, opts.z_loss, *(weights or ()))
    w = 1.0 if class_weight is None else class_weight
    write_grad(logits, u, local, m, log_s, a, coef, opts.label_smoothing, V, opts.softcap, w=w)


def gradient(
    logits,
    targets,
    lse,
    scale,
    target_grad,
    opts: Options,
    *,
    vocab_start=0,
    vocab_total=None,
    ent_scale=None,
    entropy=None,
    class_weight=None,
    class_weight_sum=None,
):
    """See kernels.gradient.gradient."""
    rows, V = logits.shape
    if rows == 0:
        return
    vocab_total = V if vocab_total is None else vocab_total
    u, local, here, counts, u_y = _target(logits, targets, opts, vocab_start, vocab_total)
    valid = (targets.long() >= 0) & (targets.long() < vocab_total)
    weights = _weights(class_weight, class_weight_sum, targets, valid)
    coef = torch.where(counts, scale.float().expand(rows) * opts.logit_scale, 0.0)
    zero = torch.zeros_like(lse)
    g_y = grad_at_target(u_y, lse, zero, lse, vocab_total, opts.label_smoothing, opts.z_loss, *(weights or ()))
    g_y = g_y * coef
    ent_coef = mean_u = None
    if ent_scale is not None:
        ent_coef = torch.where(counts, ent_scale.float() * opts.logit_scale, 0.0)
        mean_u = lse - entropy
        g_y = g_y + ent_coef * entropy_grad(u_y, lse, zero, mean_u)
    if opts.softcap is not None:
        g_y = g_y * softcap_grad(u_y, 1.0 / opts.softcap)
    target_grad.copy_(torch.where(here, g_y, 0.0))
    a = p_coef(lse, vocab_total, opts.label_smoothing, opts.z_loss, *(weights or ()))
    w = 1.0 if class_weight is None else class_weight[vocab_start : vocab_start + V]
    write_grad(
        logits, u, local, lse, zero, a, coef, opts.label_smoothing, vocab_total, opts.softcap, ent_coef, mean_u, w
    )


def shard_stats(logits, targets, stats, opts: Options, *, vocab_start, tile_stats=None, class_weight=None):
    """See kernels.shard_stats.shard_stats."""
    rows, V = logits.shape
    if rows == 0:
        return
    u, local, here, _, u_y = _target(logits, targets, opts, vocab_start, vocab_start + V)
    m, s, u_sum, c, s2, mb = _start(rows, logits.device)
    if tile_stats is not None:
        m, s, u_sum = merge_tiles(tile_stats, m, s, u_sum)
    else:
        w = None if class_weight is None else class_weight[vocab_start : vocab_start + V]
        m, s, u_sum, c, s2, mb, uw = row_stats(u, local, m, s, u_sum, c, s2, mb, stats.shape[1] >= 7, w)
    columns = [m, torch.log(s), u_sum, torch.where(here, u_y, 0.0)] + ([c, s2, mb] if stats.shape[1] >= 7 else [])
    columns += [] if class_weight is None else [uw]
    stats.copy_(torch.stack(columns, dim=1))


def online_softmax(logits, targets, running, alpha, opts: Options, *, vocab_start, vocab_total, write_p):
    """See kernels.online_softmax.online_softmax."""
    rows, V = logits.shape
    if rows == 0:
        return
    u, local, here, counts, u_y = _target(logits, targets, opts, vocab_start, vocab_total)
    m_old, s, u_sum, u_y_sum = running.clone().unbind(1)
    m, s, u_sum, *_ = row_stats(u, local, m_old, s, u_sum, None, None, None, False)  # (no class weights here)
    running.copy_(torch.stack([m, s, u_sum, u_y_sum + torch.where(here, u_y, 0.0)], dim=1))
    alpha.copy_(torch.exp(m_old - m))
    if write_p:
        coef = torch.where(counts, opts.logit_scale, 0.0)
        zero, one = torch.zeros_like(m), torch.ones_like(m)
        write_grad(logits, u, local, m, zero, one, coef, 0.0, vocab_total, opts.softcap)


def fold(dst, dst_index, src, src_index, coef):
    """See kernels.fold.fold (here with an [n, D] fp32 temporary)."""
    if dst_index is not None:
        dst.index_add_(0, dst_index, coef[:, None] * src)
    else:
        dst.addcmul_(coef[:, None], src[src_index])


def scale_into(out, x, scale):
    """See kernels.scale.scale_into."""
    return torch.mul(x, scale, out=out)


def scale_(x, scale):
    """See kernels.scale.scale_."""
    return x.mul_(scale)


def scale_rows_(x, scale):
    """See kernels.scale.scale_rows_."""
    return x.mul_(scale[:, None])


def logits_tile_stats(logits, n_valid: int, tile: int, logit_scale: float, softcap: float | None):
    """The statistics kernels.logits.logits_stats writes beside the logits: [3, rows, tiles]
    fp32, per row and tile of ``tile`` columns of the first n_valid, the max m of the transformed
    logits u, the sum of exp(u - m) and the sum of u."""
    u = transform(logits[:, :n_valid].float(), logit_scale, softcap)
    tiles = -(-n_valid // tile)
    u = torch.nn.functional.pad(u, (0, tiles * tile - n_valid), value=float("-inf")).view(len(u), tiles, tile)
    m = u.amax(-1)
    return torch.stack((m, (u - m[..., None]).exp().sum(-1), torch.where(u == float("-inf"), 0.0, u).sum(-1)))


# -- the backend object ---------------------------------------------------------------------------


class TorchBackend:
    """What the chunk loops call: the kernels (here their twins), the target fold, the casts of
    fp32 sums, and the matmuls (cuBLAS on a GPU)."""

    name = "torch"
    tile_stats = False  # whether logits() can write the softmax statistics per tile

    cross_entropy = staticmethod(cross_entropy)
    gradient = staticmethod(gradient)
    shard_stats = staticmethod(shard_stats)
    online_softmax = staticmethod(online_softmax)
    fold = staticmethod(fold)
    scale_rows_ = staticmethod(scale_rows_)

    def fold_makes_temporaries(self) -> bool:
        """Whether fold allocates [tokens, D] fp32 temporaries (the planner counts them)."""
        return True

    def logits(self, x, w, b, out, stats=None, *, n_valid=None, opts=None) -> None:
        """out = x @ w.T (+ b), rounded once to out's dtype (and, where tile_stats, the softmax
        statistics of its first n_valid columns into stats)."""
        if b is None:
            torch.mm(x, w.t(), out=out)
        else:
            torch.addmm(b, x, w.t(), out=out)

    def mm(self, a, b, out, accumulate: bool = False) -> None:
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

    def round_into(self, out, src, scale) -> None:
        """out = src * scale (if given), computed in fp32 and rounded once to out's dtype."""
        if scale is None:
            out.copy_(src)
        else:
            self.scale_into(out, src, scale)

    def cast(self, src, scale, dtype):
        """src * scale rounded once to dtype. When no cast is needed an eager call reuses src's
        storage; traced for a compiled graph (src a fake or functional tensor) it computes out of
        place, and the compiler reuses the buffer (AOTAutograd donates saved tensors to the
        backward graph)."""
        if src.dtype == dtype:
            return src * scale if type(src) is not torch.Tensor else self.scale_(src, scale)
        out = torch.empty(src.shape, dtype=dtype, device=src.device)
        self.round_into(out, src, scale)
        return out

    def scale_into(self, out, src, scale) -> None:
        scale_into(out, src, scale)

    def scale_(self, x, scale):
        return scale_(x, scale)
