"""The memory planner: chunk sizes (and the algorithm) from a budget of working memory.

"Working memory" is what the op allocates beyond its inputs and the gradients it returns: the
chunk's logits buffer, fp32 accumulators, a padded copy of W for an odd V, per-token vectors.

Two algorithms (autograd.py runs both):
  accumulate  (the default) one pass over the tokens in chunks; dX and dW are summed in fp32
              buffers of N x D and V x D (4 bytes each, beyond the gradients themselves when
              those are bf16/fp16) and rounded once. 3 matmuls: logits, dX, dW.
              When the fp32 dX does not fit, each chunk's dX is rounded in forward from an fp32
              chunk x D tile instead (memory then does not grow with N).
  low-memory  when those accumulators do not fit. A token pass (chunks of the whole vocabulary:
              loss, lse and dX, each chunk's dX summed in an fp32 tile and rounded once), then a
              vocabulary pass: W in blocks of rows, the block's logits recomputed for all tokens
              with the known lse, and the block's dW summed in an fp32 tile and rounded once.
              4 matmuls: the logits twice, dX, dW. Every gradient is still summed in fp32 and
              rounded once, so it is as exact as in the accumulate plan.
"""

from __future__ import annotations

import dataclasses
import math

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Plan:
    chunk: int  # tokens per chunk of the token pass
    round_dx: bool = False  # each chunk's dX rounded in forward from an fp32 tile (no fp32 N x D dX)
    low_memory: bool = False  # dW and db from a separate vocabulary pass
    block_rows: int = 0  # low memory: vocabulary rows per block of that pass
    block_tokens: int = 0  # low memory: tokens per step of that pass
    block_vocab: int = 0  # low memory: the token pass walks W in blocks of this many rows (0: whole rows)
    pad: bool = True  # pad W to a multiple of 64 rows for an odd V (a copy of W)


_LEAST_CHUNK = 1024  # tokens: the smallest chunk of the accumulate plan

# The token sweep's (tokens per step, least block width) rungs, most tokens first.
_SWEEP = ((4096, 4096), (2048, 4096), (1024, 4096), (512, 2048), (256, 1024), (128, 256), (64, 64), (16, 16), (1, 1))


def _floor(n: float, multiple: int) -> int:
    n = math.trunc(n)  # int(n), but with symbolic sizes (torch.compile) no guard on its value
    return n // multiple * multiple if n >= multiple else n


def plan(
    n: int,
    vocab: int,
    dim: int,
    itemsize: int,
    *,
    auto_chunk: int,
    budget: float,
    fp32_dx: bool,
    fp32_dw: bool,
    fp32_db: bool,
    vocab_pass: bool,
    fold_temps: bool = True,
    token_sweep: bool = True,
    fp32_dx_sum: bool | None = None,
) -> Plan:
    """The fastest plan whose working memory fits ``budget`` bytes (3% of it is kept in reserve
    for what is not modelled: allocator rounding, library workspaces).

    fp32_dx / fp32_dw / fp32_db: the accumulate plan would hold that fp32 accumulator beyond the
    gradient (it is needed and its gradient is not fp32). vocab_pass: dW or db is needed.
    fold_temps: the target fold makes [tokens, D] temporaries (the torch path; the Triton fold
    kernel makes none). token_sweep: the low-memory token pass may walk the vocabulary in blocks
    (not with softcap and label smoothing together when dX is needed). fp32_dx_sum: that pass
    sums dX (default: fp32_dx, i.e. dX is needed and not fp32).
    """
    fp32_dx_sum = fp32_dx if fp32_dx_sum is None else fp32_dx_sum
    budget *= 0.97
    per_token = 16 * n  # loss, lse, target gradient and labels
    v_pad = -(-vocab // 64) * 64
    pad_copy = 0 if v_pad == vocab else v_pad * dim * itemsize
    # (no bool * int: with symbolic sizes under torch.compile that product does not trace)
    fixed = per_token + pad_copy + 4 * ((n * dim if fp32_dx else 0) + (vocab * dim if fp32_dw else 0))
    fixed += 4 * vocab if fp32_db else 0
    # per token of a chunk: its logits, the target fold's temporaries (a*X_c in fp32, W[y]),
    fold = dim * (4 + itemsize) if fold_temps else 0
    # and the logits matmul's per-tile softmax statistics (fused_cel.matmul: 3 fp32 per 256 columns)
    per_row = v_pad * itemsize + fold + 12 * -(-vocab // 256)
    # Below ~1024 tokens a chunk costs more than it saves: each re-reads W twice, and (dW
    # wanted) reads and writes the fp32 dW; the low-memory plan's steps stay large instead
    # (H100, Llama 3 frozen head at 64 MiB: 128-token chunks 56.9 ms, the token sweep ~29 ms).
    least = min(_LEAST_CHUNK, n)
    chunk = _floor(min(auto_chunk, (budget - fixed) / per_row), 128)
    if chunk >= least:
        return Plan(chunk=max(1, chunk))
    if fp32_dx:
        # The same 3 matmuls with dX rounded chunk by chunk (an fp32 chunk x D tile instead of an
        # fp32 N x D dX): memory no longer grows with N.
        fixed -= 4 * n * dim
        chunk = _floor(min(auto_chunk, (budget - fixed) / (per_row + 4 * dim)), 128)
        if chunk >= least:
            return Plan(chunk=max(1, chunk), round_dx=True)

    # Low memory: no padded copy of W (an odd V only slows the matmuls), fp32 tiles instead of
    # whole accumulators.
    room = budget - per_token
    if token_sweep:
        # Token pass as a sweep (autograd.run_token_blocks): per step, a chunk x block_vocab
        # buffer, the chunk's fp32 dX sum, the target fold, a few fp32 numbers per token, and
        # W's column sums. The most tokens per step whose blocks stay wide: fewer re-reads of W.
        per_token_sweep = (4 * dim + fold if fp32_dx_sum else 0) + 64
        for chunk, least in _SWEEP:
            chunk = min(chunk, n)
            cols = _floor((room - 4 * dim - chunk * per_token_sweep) / (chunk * itemsize), 128)
            if cols >= min(least, vocab):
                break
        if cols < 1:
            raise ValueError(_too_small(budget, itemsize + per_token_sweep + 4 * dim + per_token))
        sweep = dict(chunk=chunk, low_memory=True, block_vocab=min(cols, vocab), pad=False)
    else:
        # Chunks of whole rows: chunk x V buffer, a chunk x D fp32 dX tile, W[y].
        per_row = vocab * itemsize + dim * 4 + fold
        chunk = min(n, _floor(room / per_row, 16))
        if chunk < 1:
            raise ValueError(_too_small(budget, per_row + per_token))
        sweep = dict(chunk=chunk, low_memory=True, pad=False)
    if not vocab_pass:
        return Plan(**sweep)
    # Vocabulary pass: a block_tokens x block_rows buffer, a block_rows x D fp32 tile, and the
    # target fold's block_tokens x D fp32 temporary.
    # All tokens in one step if the blocks stay large (one matmul per block, no fp32 re-reads).
    ladder = ((n, 1024), (4096, 256), (2048, 256), (1024, 256), (512, 256), (256, 256), (64, 64), (16, 1))
    for block_tokens, least in ladder:
        block_tokens = min(block_tokens, n)
        block_rows = _floor((room - block_tokens * fold) / (block_tokens * itemsize + 4 * dim + 4), 64)
        if block_rows >= min(least, vocab):
            break
    if block_rows < 1:
        raise ValueError(_too_small(budget, block_tokens * (itemsize + fold) + 4 * dim + 4 + per_token))
    return Plan(**sweep, block_rows=min(block_rows, vocab), block_tokens=block_tokens)


def _too_small(budget: float, least: float) -> str:
    given, least = budget / 0.97 / MIB, least / 0.97 / MIB
    return f"memory_budget_mib={given:g} is too small for this shape: it needs at least {least:.3g} MiB"
