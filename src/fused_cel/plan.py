"""The plan of a call: chunk sizes, and under a memory budget the algorithm.

"Working memory" is what the op allocates beyond its inputs and the gradients it returns: the
chunk's logits buffer, fp32 accumulators, a padded copy of W for an odd V, per-token vectors.

Two algorithms:
  accumulate  (the default, fused_cel.chunks) one pass over the tokens in chunks; dX and dW are summed in fp32
              buffers of N x D and V x D (4 bytes each, beyond the gradients themselves when
              those are bf16/fp16) and rounded once. 3 matmuls: logits, dX, dW.
              When the fp32 dX does not fit, each chunk's dX is rounded in forward from an fp32
              chunk x D tile instead (memory then does not grow with N).
  low-memory  (fused_cel.low_memory) when those accumulators do not fit. A token pass (chunks of the whole vocabulary:
              loss, lse and dX, each chunk's dX summed in an fp32 tile and rounded once), then a
              vocabulary pass: W in blocks of rows, the block's logits recomputed for all tokens
              with the known lse, and the block's dW summed in an fp32 tile and rounded once.
              4 matmuls: the logits twice, dX, dW. Every gradient is still summed in fp32 and
              rounded once, so it is as exact as in the accumulate plan.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import backends, parallel
from .options import Options

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Plan:
    chunk_size: int  # tokens per chunk of the token pass
    round_dx: bool = False  # each chunk's dX rounded in forward from an fp32 tile (no fp32 N x D dX)
    low_memory: bool = False  # dW and db from a separate vocabulary pass
    block_rows: int = 0  # low memory: vocabulary rows per block of that pass
    block_tokens: int = 0  # low memory: tokens per step of that pass
    block_vocab: int = 0  # low memory: the token pass walks W in blocks of this many rows (0: whole rows)
    pad: bool = True  # pad W to a multiple of 64 rows for an odd V (a copy of W)

    def grad_dtypes(self, hidden_dtype, weight_dtype) -> tuple:
        """dtypes of the dX, dW, db buffers the loops write: fp32 sums, except what the plan
        rounds into the gradient's own dtype as it goes (dX, or dX and dW)."""
        f32 = torch.float32
        if self.low_memory:
            return hidden_dtype, weight_dtype, f32
        return (hidden_dtype if self.round_dx else f32), f32, f32

    @property
    def prescaled(self) -> tuple[bool, bool, bool]:
        """Which of dX, dW, db the loops round, and so multiply by the mean's 1/divisor first."""
        return (self.round_dx or self.low_memory, self.low_memory, self.low_memory)


def auto_chunk_size(n_tokens: int, vocab: int, dim: int, device: torch.device, backend: str, weight_grad: bool) -> int:
    """Tokens per chunk when the caller gives none.

    The Triton path keeps one [chunk, V] buffer in the compute dtype. The dW accumulation reads
    and writes V x D in fp32 once per chunk, about 8 / (2 * chunk) bytes per flop of its matmul
    whatever V and D are: so when dW is computed chunks have at least 4096 tokens. The buffer
    may be as large as W (chunk = D tokens) at no cost in peak memory, because backward holds
    the fp32 dW and dX accumulators together with the dW and dX they are rounded into, which is
    larger; a chunk of 4096 with D < 4096 costs V x (4096 - D) x 2 bytes more. Without dW,
    2**28 elements (512 MiB in bf16). The torch path holds a few fp32 temporaries of the chunk:
    2**22 elements.
    """
    if backend == "triton" and device.type == "cuda":
        budget = max(2**28, vocab * max(dim, 4096)) if weight_grad else 2**28
        chunk = max(128, budget // max(vocab, 1) // 128 * 128)  # a multiple of 128 for the matmuls
    else:
        chunk = max(16, 2**22 // max(vocab, 1))
    return max(1, min(chunk, n_tokens))


def choose(opts: Options, hidden, weight, bias, need, tokens: int | None = None) -> Plan:
    """The plan of one pass over hidden [N, D] and weight [V, D] (their own dtypes), writing the
    gradients ``need`` asks for. Reads only shapes and dtypes, so that the op's fake
    implementation gets the same plan. tokens: the pass runs over that many of the N rows
    (the counted tokens, fused_cel.op), each step's rows gathered into a copy; dX still has N."""
    (N, D), V = hidden.shape, weight.shape[0]
    rows_dx, gather = N, tokens is not None
    N = N if tokens is None else tokens
    grouped = opts.group_name is not None
    if grouped:  # every rank must cut the same chunks: plan from what all ranks share
        V = -(-opts.vocab_size // torch.distributed.get_world_size(parallel.Shard.of(opts).group))
    auto = auto_chunk_size(N, V, D, hidden.device, opts.backend, need[1] and not grouped)
    if opts.memory_budget_mib is None:
        return Plan(chunk_size=opts.chunk_size or auto)
    dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    if grouped:  # (as if dW and db were wanted on every rank: a frozen shard plans like the others)
        need = (need[0], True, bias is not None)
    fp32 = [n and dt != torch.float32 for n, dt in zip(need, dtypes)]
    return fit(
        N,
        V,
        D,
        opts.compute_dtype.itemsize,
        auto_chunk=auto,
        budget_mib=opts.memory_budget_mib,
        fp32_dx=fp32[0],
        fp32_dw=fp32[1],
        fp32_db=fp32[2],
        vocab_pass=need[1] or need[2],
        fold_temps=backends.get(opts.backend).fold_makes_temporaries(),
        # The sweep has no per-column softcap with smoothing, class weights, token statistics or
        # entropy gradient.
        token_sweep=not (need[0] and opts.softcap is not None and opts.label_smoothing > 0)
        and not (opts.token_stats or opts.class_weighted),
        fp32_dx_sum=need[0],
        chunks_only=grouped,
        rows_dx=rows_dx,
        gather=gather,
    )


_LEAST_CHUNK = 1024  # tokens: the smallest chunk of the accumulate plan

# The token sweep's (tokens per step, least block width) rungs, most tokens first.
_SWEEP = ((4096, 4096), (2048, 4096), (1024, 4096), (512, 2048), (256, 1024), (128, 256), (64, 64), (16, 16), (1, 1))


def _floor(n: float, multiple: int) -> int:
    n = math.trunc(n)  # int(n), but with symbolic sizes (torch.compile) no guard on its value
    return n // multiple * multiple if n >= multiple else n


def fit(
    n: int,
    vocab: int,
    dim: int,
    itemsize: int,
    *,
    auto_chunk: int,
    budget_mib: float,
    fp32_dx: bool,
    fp32_dw: bool,
    fp32_db: bool,
    vocab_pass: bool,
    fold_temps: bool = True,
    token_sweep: bool = True,
    fp32_dx_sum: bool | None = None,
    chunks_only: bool = False,
    rows_dx: int | None = None,
    gather: bool = False,
) -> Plan:
    """The fastest plan whose working memory fits ``budget_mib`` (3% of it is kept in reserve for
    what is not modelled: allocator rounding, library workspaces).

    fp32_dx / fp32_dw / fp32_db: the accumulate plan would hold that fp32 accumulator beyond the
    gradient (it is needed and its gradient is not fp32). vocab_pass: dW or db is needed.
    fold_temps: the target fold makes [tokens, D] temporaries (the torch path; the Triton fold
    kernel makes none). token_sweep: the low-memory token pass may walk the vocabulary in blocks
    (not with softcap and label smoothing together when dX is needed). fp32_dx_sum: that pass
    sums dX (default: fp32_dx, i.e. dX is needed and not fp32). chunks_only: a vocabulary shard
    (fused_cel.parallel) has no low-memory plan, so the chunks may be as small as it takes, each
    with its per-token statistics for the group (8 fp32). n: the tokens the passes run over;
    rows_dx: dX's rows (default n); gather: each step's rows of X are gathered into a copy (the
    counted tokens of a longer X), and its dX rows go through an fp32 tile and a rounded copy.
    """
    fp32_dx_sum = fp32_dx if fp32_dx_sum is None else fp32_dx_sum
    rows_dx = n if rows_dx is None else rows_dx
    budget = budget_mib * MIB * 0.97
    per_token = 16 * n  # loss, lse, target gradient and labels
    v_pad = -(-vocab // 64) * 64
    pad_copy = 0 if v_pad == vocab else v_pad * dim * itemsize
    # (no bool * int: with symbolic sizes under torch.compile that product does not trace)
    fixed = per_token + pad_copy + 4 * ((rows_dx * dim if fp32_dx else 0) + (vocab * dim if fp32_dw else 0))
    fixed += 4 * vocab if fp32_db else 0
    # per token of a step: X's gathered row, and dX's fp32 row and its rounded copy
    gathered = dim * (itemsize + (4 + itemsize if fp32_dx_sum else 0)) if gather else 0
    # per token of a chunk: its logits, the target fold's temporaries (a*X_c in fp32, W[y]),
    fold = dim * (4 + itemsize) if fold_temps else 0
    # and the logits matmul's per-tile softmax statistics (kernels/logits.py: 3 fp32 per 256 columns)
    per_row = v_pad * itemsize + fold + gathered + 12 * -(-vocab // 256) + (32 if chunks_only else 0)
    # Below ~1024 tokens a chunk costs more than it saves: each re-reads W twice, and (dW
    # wanted) reads and writes the fp32 dW; the low-memory plan's steps stay large instead
    # (experiments/lowmem-tune).
    least = 1 if chunks_only else min(_LEAST_CHUNK, n)
    chunk = _floor(min(auto_chunk, (budget - fixed) / per_row), 128)
    if chunk >= least:
        return Plan(chunk_size=max(1, chunk))
    if fp32_dx:
        # The same 3 matmuls with dX rounded chunk by chunk (an fp32 chunk x D tile instead of an
        # fp32 N x D dX): memory no longer grows with N.
        fixed -= 4 * rows_dx * dim
        chunk = _floor(min(auto_chunk, (budget - fixed) / (per_row + 4 * dim)), 128)
        if chunk >= least:
            return Plan(chunk_size=max(1, chunk), round_dx=True)
    if chunks_only:
        least_row = per_row + (4 * dim if fp32_dx else 0)
        raise ValueError(_too_small(budget, fixed + least_row) + " (one token a chunk; a vocabulary shard has "
                         "no low-memory plan)")  # fmt: skip

    # Low memory: no padded copy of W (an odd V only slows the matmuls), fp32 tiles instead of
    # whole accumulators.
    room = budget - per_token
    if token_sweep:
        # Token pass as a sweep (low_memory.token_sweep): per step, a chunk x block_vocab
        # buffer, the chunk's fp32 dX sum, the target fold, a few fp32 numbers per token, and
        # W's column sums. The most tokens per step whose blocks stay wide: fewer re-reads of W.
        per_token_sweep = (4 * dim + fold if fp32_dx_sum else 0) + 64 + dim * itemsize * (2 if gather else 0)
        for chunk, least in _SWEEP:
            chunk = min(chunk, n)
            cols = _floor((room - 4 * dim - chunk * per_token_sweep) / (chunk * itemsize), 128)
            if cols >= min(least, vocab):
                break
        if cols < 1:
            raise ValueError(_too_small(budget, itemsize + per_token_sweep + 4 * dim + per_token))
        sweep = dict(chunk_size=chunk, low_memory=True, block_vocab=min(cols, vocab), pad=False)
    else:
        # Chunks of whole rows: chunk x V buffer, a chunk x D fp32 dX tile, W[y].
        per_row = vocab * itemsize + dim * 4 + fold + gathered
        chunk = min(n, _floor(room / per_row, 16))
        if chunk < 1:
            raise ValueError(_too_small(budget, per_row + per_token))
        sweep = dict(chunk_size=chunk, low_memory=True, pad=False)
    if not vocab_pass:
        return Plan(**sweep)
    # Vocabulary pass: a block_tokens x block_rows buffer, a block_rows x D fp32 tile, and the
    # target fold's block_tokens x D fp32 temporary.
    # All tokens in one step if the blocks stay large (one matmul per block, no fp32 re-reads).
    ladder = ((n, 1024), (4096, 256), (2048, 256), (1024, 256), (512, 256), (256, 256), (64, 64), (16, 1))
    for block_tokens, least in ladder:
        block_tokens = min(block_tokens, n)
        step = block_tokens * (fold + (dim * itemsize if gather else 0))  # the fold's temporaries, X's gathered rows
        block_rows = _floor((room - step) / (block_tokens * itemsize + 4 * dim + 4), 64)
        if block_rows >= min(least, vocab):
            break
    if block_rows < 1:
        raise ValueError(_too_small(budget, block_tokens * (itemsize + fold) + 4 * dim + 4 + per_token))
    return Plan(**sweep, block_rows=min(block_rows, vocab), block_tokens=block_tokens)


def _too_small(budget: float, least: float) -> str:
    given, least = budget / 0.97 / MIB, least / 0.97 / MIB
    return f"memory_budget_mib={given:g} is too small for this shape: it needs at least {least:.3g} MiB"
