"""The options of one call, as one frozen object, and every check of what a user passes.

``Options`` travels unchanged from the public call (fused_cel.api) through the custom op
(fused_cel.op, the one place that lays it out as the op's arguments) to the chunk loops and the
kernels' launchers. Adding an option: a field here, its check in ``make``, and its use.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")


@dataclasses.dataclass(frozen=True)
class Options:
    """Validated options of one call (fields are numbers, or Python literals and a dtype, so that the
    custom op can take them: the numbers as arguments, the rest as one string)."""

    # The loss.
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None  # of the logits the loss sees: the user's over the temperature
    logit_scale: float = 1.0  # likewise, the user's over the temperature
    # How it runs.
    chunk_size: int | None = None  # tokens per chunk; None: fused_cel.plan chooses
    memory_budget_mib: float | None = None  # working memory bound (fused_cel.plan)
    check_labels: bool = True  # reject out-of-range labels (one host sync)
    backend: str = "torch"  # "triton" or "torch" ("auto" until fused_cel.api resolves it)
    compute_dtype: torch.dtype = torch.float32  # the matmuls' dtype (autocast's, or the inputs')
    # Vocabulary parallelism (fused_cel.parallel): this rank's rows of the head.
    group_name: str | None = None  # the process group, by name; None: one process
    vocab_start: int | None = None  # global id of this weight's first row (None: from the ranks' rows)
    vocab_size: int | None = None  # the whole vocabulary; None: this weight's rows
    reduce_hidden_grad: bool = True  # sum dX over the group inside autograd
    # Outputs.
    token_stats: bool = False  # per-token entropy, top-1, mean logit and log sum p**2
    class_weighted: bool = False  # a class_weight tensor comes with the call
    uniform_grad: bool = False  # "none" whose grad_output is one value at every counted token (an NLL mean)

    def vocab_total(self, rows: int) -> int:
        """The whole vocabulary, for a weight of ``rows`` rows (this rank's, if sharded)."""
        return rows if self.vocab_size is None else self.vocab_size


def make(
    *,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    chunk_size,
    memory_budget_mib,
    check_labels,
    backend,
    temperature=1.0,
    shift=False,
    num_items=None,
    process_group=None,
    vocab_start=None,
    vocab_size=None,
    reduce_hidden_grad=True,
    return_token_stats=False,
    class_weight=None,
    uniform_grad=False,
) -> Options:
    """Check every tensor-free option; return them as Options. What depends on the tensors (the
    backend "auto", compute_dtype, a process group's layout) the caller resolves after this.

    The temperature T divides the logits after the softcap, and is folded into the transform:
    softcap * tanh(logit_scale * z / softcap) / T = c' tanh(s' z / c') with c' = softcap / T,
    s' = logit_scale / T, so the kernels know nothing of it."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    label_smoothing = _real("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    z_loss = _real("z_loss", z_loss, lo=0.0)
    if softcap is not None:
        softcap = _real("softcap", softcap, lo=0.0, lo_open=True)
    logit_scale = _real("logit_scale", logit_scale)
    temperature = _real("temperature", temperature, lo=0.0, lo_open=True)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        chunk_size = int(chunk_size)
    if memory_budget_mib is not None:
        memory_budget_mib = _real("memory_budget_mib", memory_budget_mib, lo=0.0, lo_open=True)
        if chunk_size is not None:
            raise ValueError("give chunk_size or memory_budget_mib, not both")
    flags = dict(
        shift=shift, check_labels=check_labels, return_token_stats=return_token_stats, uniform_grad=uniform_grad
    )
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if class_weight is not None and not isinstance(class_weight, torch.Tensor):
        raise TypeError(f"class_weight must be a torch.Tensor or None, got {type(class_weight).__name__}")
    check_num_items(num_items, reduction)
    _check_parallel(process_group, vocab_start, vocab_size, reduce_hidden_grad)
    return Options(
        ignore_index=int(ignore_index),
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=None if softcap is None else softcap / temperature,
        logit_scale=logit_scale / temperature,
        chunk_size=chunk_size,
        memory_budget_mib=memory_budget_mib,
        check_labels=check_labels,
        backend=backend,
        vocab_start=None if vocab_start is None else int(vocab_start),
        vocab_size=None if vocab_size is None else int(vocab_size),
        reduce_hidden_grad=reduce_hidden_grad,
        token_stats=return_token_stats,
        class_weighted=class_weight is not None,
        uniform_grad=uniform_grad,
    )


def check_class_weight(class_weight, vocab: int, device) -> None:
    """class_weight (None, or a tensor: make checked its type) is a floating-point [vocab] tensor
    on the inputs' device (its values are checked with the labels, in the op: a host sync)."""
    if class_weight is None:
        return
    if not class_weight.is_floating_point():
        raise TypeError(f"class_weight must be a floating-point tensor, got {class_weight.dtype}")
    if class_weight.shape != (vocab,):
        raise ValueError(f"class_weight must be [V] = [{vocab}], got shape {tuple(class_weight.shape)}")
    if class_weight.device != device:
        raise ValueError(
            f"all tensors must be on one device, got class_weight: {class_weight.device}, hidden: {device}"
        )


def check_tensors(hidden, weight, labels, bias) -> None:
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


def _check_parallel(process_group, vocab_start, vocab_size, reduce_hidden_grad) -> None:
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
