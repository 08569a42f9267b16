"""Vocabulary parallelism: each rank of a process group holds a shard of the LM head's rows.

Rank r holds W_r, rows vocab_start_r .. vocab_start_r + V_r - 1 of the whole [V, D] head (uneven
shards allowed), and the same tokens and global label ids as every other rank. Per chunk, each
rank computes its logits X_c @ W_r.T and, per token, four numbers over its own columns
(kernels/shard_stats.py): the max m_r, log s_r = log sum exp(u - m_r), the sum of u, and the target's logit
if the target is in the shard (else 0). Two all-reduces of these per-token scalars (a max, then
one sum of three) give every rank the same log-sum-exp and loss:

    m = max_r m_r,   s = sum_r exp(log s_r + m_r - m),   lse = m + log s,
    loss = (1 - eps) ((m - u_y) + log s) + eps ((m - sum u / V) + log s) + c lse**2.

Logits never cross ranks. The gradient pass then runs per shard with the global lse: dW_r and
db_r stay local, and dX_r = dlogits_r @ W_r is this shard's part of dX, summed over the group
(one all-reduce of N x D fp32 per call) unless the caller reduces it itself.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .backends.torch import store_loss, store_stats
from .options import Options


@dataclasses.dataclass(frozen=True)
class Shard:
    """Where this rank's rows sit in the vocabulary, and the group that holds the rest."""

    group: object  # a torch.distributed ProcessGroup
    start: int  # global id of this rank's first row
    total: int  # size of the whole vocabulary
    reduce_hidden_grad: bool  # sum dX over the group inside autograd

    @staticmethod
    def of(opts: Options) -> Shard | None:
        """The shard the options describe (a process group by its name); None for one process."""
        if opts.group_name is None:
            return None
        group = dist.distributed_c10d._resolve_process_group(opts.group_name)
        return Shard(group, opts.vocab_start, opts.vocab_size, opts.reduce_hidden_grad)


def layout(group, local_vocab: int, n_tokens: int, device: torch.device, vocab_start, vocab_size) -> tuple[int, int]:
    """(vocab_start, vocab_size): this rank's place in the vocabulary, derived when not given.

    The arguments' types are checked by fused_cel.options.
    Deriving them all-gathers each rank's (rows, tokens) once per call (a host sync), which also
    checks that every rank passes the same number of tokens. Pass both to skip it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group needs torch.distributed to be initialised (dist.init_process_group)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if vocab_start is None or vocab_size is None:
        mine = torch.tensor([local_vocab, n_tokens], dtype=torch.int64, device=device)
        table = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(table, mine, group=group)
        rows, tokens = zip(*(t.tolist() for t in table))
        if len(set(tokens)) > 1:
            raise ValueError(f"vocab-parallel: every rank must pass the same tokens; tokens per rank: {list(tokens)}")
        vocab_start = sum(rows[:rank]) if vocab_start is None else vocab_start
        vocab_size = sum(rows) if vocab_size is None else vocab_size
    if not (0 <= vocab_start and vocab_start + local_vocab <= vocab_size):
        raise ValueError(
            f"vocab-parallel: this rank's rows [{vocab_start}, {vocab_start + local_vocab}) must lie in the "
            f"vocabulary [0, {vocab_size})"
        )
    return int(vocab_start), int(vocab_size)


def combine(
    stats,
    targets,
    loss,
    lse,
    shard: Shard,
    opts: Options,
    entropy=None,
    extras=None,
    class_weight=None,
    class_weight_sum=None,
) -> None:
    """Per-shard statistics -> the loss and lse of every token (the same on all ranks), and with
    entropy and extras the token statistics.

    stats holds per token (m_r, log s_r, sum of u, target logit or 0), then with the token
    statistics (c_r, s2_r, mb_r), then with class weights the sum of w u: the merge of the
    kernels' running statistics (kernels/common.py), across ranks.
    """
    m_r, stats_too = stats[:, 0], entropy is not None
    maxima = stats[:, [0, 6] if stats_too else [0]].clone(memory_format=torch.contiguous_format)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=shard.group)
    m = maxima[:, 0]
    # s_r exp(m_r - m) is in [0, V_r]: its sum over ranks cannot overflow fp32.
    a, s_r = torch.exp(m_r - m), torch.exp(stats[:, 1])
    sums = stats[:, 1:].clone(memory_format=torch.contiguous_format)
    sums[:, 0] = s_r * a
    if stats_too:  # c and s2 from each rank's max to the common one (mb went with the maxima)
        sums[:, 3] = (stats[:, 4] + (m_r - m) * s_r) * a
        sums[:, 4] = stats[:, 5] * a * a
        sums[:, 5] = 0.0
    dist.all_reduce(sums, group=shard.group)
    s, u_sum, u_y = sums[:, 0], sums[:, 1], sums[:, 2]
    log_s = torch.log(s)
    if class_weight is None:
        store_loss(loss, lse, m, log_s, u_sum, u_y, targets, shard.total, opts)
    else:  # the last column is the sum of w u
        y = targets.long()
        w_y = class_weight[torch.where((y >= 0) & (y < shard.total), y, 0)]
        weights = (w_y, class_weight_sum.expand(len(y)))
        store_loss(loss, lse, m, log_s, sums[:, -1], u_y, targets, shard.total, opts, weights)
    if stats_too:
        store_stats(entropy, extras, m, s, log_s, u_sum, sums[:, 3], sums[:, 4], maxima[:, 1], u_y, targets,
                    shard.total, opts)  # fmt: skip


def reduce_hidden_grad(dx: torch.Tensor | None, shard: Shard | None) -> None:
    """Sum this shard's part of dX over the group, in place (fp32), unless the caller does."""
    if dx is not None and shard is not None and shard.reduce_hidden_grad:
        dist.all_reduce(dx, group=shard.group)
