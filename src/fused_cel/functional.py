"""Public functional API: argument checking, then the chunked op (fused_cel.autograd)."""

from __future__ import annotations

import math
import numbers
import os

import torch

from . import autograd, op, parallel

_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("auto", "triton", "torch")


# torch.compile traces this function (argument checks, shift, divisor: plain tensor ops) and sees
# the chunked computation as one opaque custom op, fused_cel::linear_cross_entropy (fused_cel.op):
# no graph break, fullgraph=True works. The one exception: with process_group but without
# vocab_start and vocab_size, deriving them (an all-gather read on the host) breaks the graph.
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    shift: bool = False,
    num_items: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget_mib: float | None = None,
    check_labels: bool = True,
    backend: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    reduce_hidden_grad: bool = True,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, without the logits.

    Args:
        hidden: [..., D] final hidden states (any leading dims).
        weight: [V, D] the LM head.
        labels: [...] int64 or int32 class ids, the leading shape of ``hidden``.
        bias: [V] or None.
        ignore_index: tokens with this label count for nothing.
        reduction: "mean" | "sum" | "none".
        label_smoothing: in [0, 1], as in torch.nn.functional.cross_entropy.
        z_loss: c >= 0; each counted token adds c * logsumexp(logits)**2.
        softcap: if set (> 0), logits = softcap * tanh(logits / softcap) (Gemma 2).
        logit_scale: logits *= logit_scale before the softcap (Cohere).
        shift: next-token loss, position t scored against labels[..., t + 1]; the last position of
            each sequence is not scored. reduction="none" then returns shape labels[..., 1:].
        num_items: divisor of reduction="mean" (a finite number > 0, or a one-element tensor, e.g.
            Hugging Face's num_items_in_batch, whose value is not checked when it is on the
            device: that would synchronise); default the number of tokens not ignored.
        chunk_size: tokens per chunk; None picks one from the vocabulary size.
        memory_budget_mib: the working memory the op may allocate, in MiB, beyond its inputs and
            the gradients it returns; the planner (fused_cel.budget) picks the fastest plan that
            fits: the default with a smaller chunk; then the default with dX rounded chunk by
            chunk (no fp32 N x D dX); then the low-memory plan, which recomputes the logits once
            more (4 matmuls instead of 3) and keeps only fp32 tiles. Every gradient is still
            summed in fp32 and rounded once; what is rounded in forward (dX, and in the
            low-memory plan dW) is multiplied by grad_output in backward, exact when that is a
            power of two (such as 1). Not with chunk_size or process_group.
        check_labels: reject labels outside [0, V) that are not ignore_index. This costs one
            host synchronisation per call; with False such a label gives a NaN loss instead.
        backend: "triton" (the fused kernel; CUDA, or CPU under TRITON_INTERPRET=1), "torch"
            (the pure-PyTorch path) or "auto" (Triton where it can run).
        process_group: vocabulary parallelism (tensor-parallel LM head). ``weight`` (and
            ``bias``) are then this rank's rows of the head, and every rank of the group passes
            the same hidden, the same global label ids and the same options. Per chunk, the
            ranks all-reduce per-token scalars only (max, sum of exp, target logit, sum of
            logits), never logits; the loss (the whole vocabulary's) is the same on every rank.
            Gradients of weight and bias stay local to the shard. See fused_cel.parallel.
        vocab_start: global id of this rank's first row; default: the rows of the lower ranks
            (shards in rank order, uneven sizes allowed).
        vocab_size: the whole vocabulary; default: the sum of all ranks' rows. Deriving either
            default costs one small all-gather (and a host sync) per call; pass both to skip it.
        reduce_hidden_grad: with process_group, hidden's gradient is by default the full one,
            summed over the group inside autograd (one all-reduce of N x D in fp32). False leaves
            each rank's partial gradient, for frameworks that all-reduce it themselves
            (Megatron's "copy to tensor-parallel region" does).

    Returns:
        The float32 loss: a scalar, or per token for reduction="none". Every label ignored gives
        0 (not NaN) and zero gradients. Gradients reach hidden, weight and bias (each only if it
        requires grad) in their own dtypes. Under torch.autocast the matmuls run in the autocast
        dtype. For "mean" and "sum" the gradients are computed during the forward call; calling
        backward twice through one loss (retain_graph=True) is not supported.
    """
    _check_tensors(hidden, weight, labels, bias)
    options = dict(
        **check_options(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            logit_scale=logit_scale,
            chunk_size=chunk_size,
            memory_budget_mib=memory_budget_mib,
            shift=shift,
            check_labels=check_labels,
            backend=backend,
        ),
        backend=_resolve_backend(backend, hidden.device),
    )
    if process_group is not None and memory_budget_mib is not None:
        raise ValueError("memory_budget_mib is not supported with process_group yet")
    if shift and hidden.dim() < 2:
        raise ValueError("shift=True needs a sequence dimension: hidden must be at least [T, D]")

    compute_dtype = _compute_dtype(hidden, weight, bias)
    V, D = weight.shape
    x = hidden.reshape(-1, D)
    check_parallel_options(process_group, vocab_start, vocab_size, reduce_hidden_grad)
    shard = None
    if process_group is not None:
        shard = parallel.make_shard(
            process_group, V, x.shape[0], hidden.device, vocab_start, vocab_size, reduce_hidden_grad
        )
    targets = labels
    if shift:  # a shifted copy of the int labels only: hidden and logits are never copied
        targets = torch.full_like(labels, ignore_index)
        targets[..., :-1] = labels[..., 1:]
    targets = targets.reshape(-1)
    divisor = _divisor(num_items, reduction, targets, ignore_index)
    loss = op.linear_cross_entropy(x, weight, bias, targets, divisor, options, compute_dtype, check_labels, shard)
    if reduction == "none":
        loss = loss.view(labels.shape)
        if shift:
            loss = loss[..., :-1]
    return loss


def _check_tensors(hidden, weight, labels, bias) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must be [..., D], got a 0-dim tensor")
    V, D = weight.shape
    if V == 0 or D == 0:
        raise ValueError(f"weight must have V >= 1 and D >= 1, got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != D:
        raise ValueError(
            f"hidden's last dim ({hidden.shape[-1]}) must equal weight's D ({D}); weight is {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias must be [V] = [{V}], got shape {tuple(bias.shape)}")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) > 1:
        names = ", ".join(
            f"{n}: {t.device}"
            for n, t in (("hidden", hidden), ("weight", weight), ("labels", labels), ("bias", bias))
            if t is not None
        )
        raise ValueError(f"all tensors must be on one device, got {names}")


def _real(name: str, value, *, lo=None, hi=None, lo_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not -math.inf < value < math.inf:  # not NaN or inf (math.isfinite cannot trace a symbolic float)
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def check_options(
    *,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    chunk_size,
    memory_budget_mib,
    shift,
    check_labels,
    backend,
) -> dict:
    """Validate the tensor-free options; return the loss options normalised for Options."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    label_smoothing = _real("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    z_loss = _real("z_loss", z_loss, lo=0.0)
    if softcap is not None:
        softcap = _real("softcap", softcap, lo=0.0, lo_open=True)
    logit_scale = _real("logit_scale", logit_scale)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        chunk_size = int(chunk_size)
    memory_budget = None
    if memory_budget_mib is not None:
        memory_budget = _real("memory_budget_mib", memory_budget_mib, lo=0.0, lo_open=True) * 2**20
        if chunk_size is not None:
            raise ValueError("give chunk_size or memory_budget_mib, not both")
    for name, flag in (("shift", shift), ("check_labels", check_labels)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return dict(
        ignore_index=int(ignore_index),
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
    )


def check_parallel_options(process_group, vocab_start, vocab_size, reduce_hidden_grad) -> None:
    """Types of the vocab-parallel options; they apply only with a process group."""
    if process_group is not None:
        if not torch.distributed.is_available():
            raise RuntimeError("process_group needs torch.distributed, which this PyTorch build does not have")
        if not isinstance(process_group, torch.distributed.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed ProcessGroup or None, got {type(process_group).__name__}"
            )
    for name, value in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}")
    if process_group is None and (vocab_start is not None or vocab_size is not None or not reduce_hidden_grad):
        raise ValueError("vocab_start, vocab_size and reduce_hidden_grad apply only with a process_group")


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on tensors of this device."""
    if autograd.kernels is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if triton_available(device) else "torch"
    if backend == "triton" and not triton_available(device):
        why = "Triton is not installed" if autograd.kernels is None else f"tensors are on {device}"
        raise RuntimeError(
            f"backend='triton' cannot run: {why} (it needs CUDA, or the CPU with TRITON_INTERPRET=1 "
            "set before Triton is imported); use backend='torch' or 'auto'"
        )
    return backend


def _compute_dtype(hidden, weight, bias) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(
                f"hidden ({hidden.dtype}) and {name} ({t.dtype}) must have the same dtype outside torch.autocast"
            )
    return hidden.dtype


def check_num_items(num_items, reduction: str):
    """num_items: None, a finite number > 0, or a one-element tensor (its value unchecked)."""
    if num_items is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items applies to reduction='mean' only, got reduction={reduction!r}")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a one-element tensor, got shape {tuple(num_items.shape)}")
        return num_items
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise TypeError(f"num_items must be a number, a one-element tensor or None, got {type(num_items).__name__}")
    if not 0 < num_items < math.inf:  # also rejects NaN; math.isfinite cannot trace a symbolic number
        raise ValueError(f"num_items must be finite and > 0, got {num_items}")
    return num_items


def _divisor(num_items, reduction: str, targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """The mean's divisor as an fp32 device tensor (no host sync); None for sum and none."""
    num_items = check_num_items(num_items, reduction)
    if reduction != "mean":
        return None
    if num_items is None:
        return (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
    if isinstance(num_items, torch.Tensor):
        if num_items.device == targets.device:  # its value is not checked: that would sync
            return num_items.detach().reshape(()).to(torch.float32)
        num_items = check_num_items(num_items.item(), reduction)  # a host tensor: no device sync
    # torch.full launches a fill; torch.tensor(..., device=cuda) would wait for the copy.
    return torch.full((), float(num_items), dtype=torch.float32, device=targets.device)
