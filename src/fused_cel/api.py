"""The public calls: linear_cross_entropy and FusedLinearCrossEntropyLoss.

A call checks its arguments (fused_cel.options), applies the shift, flattens the tokens and
hands one Options to the custom op (fused_cel.op). torch.compile traces this file (plain tensor
ops) and sees the chunked computation as one opaque op: no graph break, fullgraph=True works.
The one exception: with process_group but without vocab_start and vocab_size, deriving them
(an all-gather read on the host) breaks the graph.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import NamedTuple

import torch

from . import backends, op, options, parallel


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
    temperature: float = 1.0,
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
    return_token_stats: bool = False,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
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
        temperature: T > 0; logits /= T after the softcap (TRL's order).
        shift: next-token loss, position t scored against labels[..., t + 1]; the last position of
            each sequence is not scored. reduction="none" then returns shape labels[..., 1:].
        num_items: divisor of reduction="mean" (a finite number > 0, or a one-element tensor, e.g.
            Hugging Face's num_items_in_batch, whose value is not checked when it is on the
            device: that would synchronise); default the number of tokens not ignored.
        chunk_size: tokens per chunk; None picks one from the vocabulary size.
        memory_budget_mib: the working memory the op may allocate, in MiB, beyond its inputs and
            the gradients it returns; the planner (fused_cel.plan) picks the fastest plan that
            fits: the default with a smaller chunk; then the default with dX rounded chunk by
            chunk (no fp32 N x D dX); then the low-memory plan, which recomputes the logits once
            more (4 matmuls instead of 3) and keeps only fp32 tiles. Every gradient is still
            summed in fp32 and rounded once; what is rounded in forward (dX, and in the
            low-memory plan dW) is multiplied by grad_output in backward, exact when that is a
            power of two (such as 1). Not with chunk_size or process_group.
        check_labels: reject labels outside [0, V) that are not ignore_index. This costs one
            host synchronisation per call; with False such a label gives a NaN loss instead.
        backend: "triton" (the fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), "torch"
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
        return_token_stats: also return TokenStats (entropy, top1, mean_logit, log_sum_sq_probs
            per token, without gradient), from the same pass: no extra matmul.
        class_weight: [V] float, as torch.nn.functional.cross_entropy's weight= (the whole
            vocabulary's, with process_group): each counted token's term is scaled by
            class_weight[label] (the z-loss too), label smoothing weighs each class as
            F.cross_entropy does, and "mean" divides by the sum of the counted tokens' weights
            (unless num_items is given; 1 if that sum is 0). Values must be finite and >= 0
            (checked with the labels, when check_labels). No gradient flows to it.

    Returns:
        The float32 loss: a scalar, or per token for reduction="none". Every label ignored gives
        0 (not NaN) and zero gradients. Gradients reach hidden, weight and bias (each only if it
        requires grad) in their own dtypes. Under torch.autocast the matmuls run in the autocast
        dtype. For "mean" and "sum" the gradients are computed during the forward call; calling
        backward twice through one loss (retain_graph=True) is not supported. With
        return_token_stats, (loss, TokenStats).
    """
    opts = options.make(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        temperature=temperature,
        chunk_size=chunk_size,
        memory_budget_mib=memory_budget_mib,
        check_labels=check_labels,
        backend=backend,
        shift=shift,
        num_items=num_items,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        reduce_hidden_grad=reduce_hidden_grad,
        return_token_stats=return_token_stats,
        class_weight=class_weight,
    )
    loss, entropy, extras = _run(hidden, weight, labels, bias, opts, shift, num_items, process_group, class_weight)
    if not return_token_stats:
        return loss
    return loss, TokenStats(entropy.detach(), *extras)


class TokenStats(NamedTuple):
    """Per-token statistics from the loss's own pass, shaped like the per-token loss, without
    gradient; every one 0 (False) where the label is ignored."""

    entropy: torch.Tensor  # float32: -sum_v p_v log p_v of the logits the loss sees
    top1: torch.Tensor  # bool: the target is the argmax (ties go to the lowest index)
    mean_logit: torch.Tensor  # float32: the mean of those logits over the vocabulary
    log_sum_sq_probs: torch.Tensor  # float32: log sum_v p_v**2


class LogProbs(NamedTuple):
    """fused_cel.linear_log_probs's result; a statistic not asked for is None."""

    log_probs: torch.Tensor  # float32 log p(label); 0 where ignored; differentiable
    entropy: torch.Tensor | None  # float32; 0 where ignored; differentiable
    top1: torch.Tensor | None  # bool; False where ignored
    mean_logit: torch.Tensor | None  # float32 (no gradient)
    log_sum_sq_probs: torch.Tensor | None  # float32 (no gradient)


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    shift: bool = False,
    entropy: bool = False,
    top1: bool = False,
    mean_logit: bool = False,
    log_sum_sq_probs: bool = False,
    uniform_grad: bool = False,
    chunk_size: int | None = None,
    memory_budget_mib: float | None = None,
    check_labels: bool = True,
    backend: str = "auto",
) -> LogProbs:
    """Per-token log-probabilities of ``labels`` under ``hidden @ weight.T (+ bias)`` (scaled,
    capped and divided by the temperature as in linear_cross_entropy), without the logits: what
    RL losses (GRPO, RLOO, DPO) need, with gradient for any per-token grad_output.

    log_probs is -linear_cross_entropy(..., reduction="none"); entropy (with gradient, e.g. for an
    entropy bonus), top1 (the target is the argmax, ties to the lowest index), mean_logit and
    log_sum_sq_probs (log sum_v p_v**2, as TRL's DPO and KTO log them; no gradient) come from the
    same pass when asked for. Ignored positions give 0 (False). With shift=True the outputs have
    the shape labels[..., 1:]. The other arguments are linear_cross_entropy's.

    uniform_grad=True promises that log_probs' grad_output is one value at every counted token
    (an NLL sum or mean, as SFT's): the gradients are then computed in the forward pass with the
    loss's 3 matmuls instead of 4, and scaled by that value in backward; the entropy has no
    gradient then. A broken promise raises: on the CPU in backward, on a GPU (no host sync) at the
    next call's label check.
    """
    flags = dict(entropy=entropy, top1=top1, mean_logit=mean_logit, log_sum_sq_probs=log_sum_sq_probs)
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    opts = options.make(
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=0.0,
        z_loss=0.0,
        softcap=softcap,
        logit_scale=logit_scale,
        temperature=temperature,
        chunk_size=chunk_size,
        memory_budget_mib=memory_budget_mib,
        check_labels=check_labels,
        backend=backend,
        shift=shift,
        return_token_stats=any(flags.values()),
        uniform_grad=uniform_grad,
    )
    loss, ent, extras = _run(hidden, weight, labels, bias, opts, shift, None, None)
    top, mean, lss = extras if extras is not None else (None, None, None)
    return LogProbs(
        -loss,
        ent if entropy else None,
        top if top1 else None,
        mean if mean_logit else None,
        lss if log_sum_sq_probs else None,
    )


def _run(hidden, weight, labels, bias, opts, shift, num_items, process_group, class_weight=None):
    """(loss, entropy, (top1, mean logit, log sum p**2)): the op on the flattened, shifted
    tokens; per-token results in the shape of labels (labels[..., 1:] with shift)."""
    options.check_tensors(hidden, weight, labels, bias)
    if shift and hidden.dim() < 2:
        raise ValueError("shift=True needs a sequence dimension: hidden must be at least [T, D]")
    V, D = weight.shape
    x = hidden.reshape(-1, D)
    resolved = dict(
        backend=_resolve_backend(opts.backend, hidden.device), compute_dtype=_compute_dtype(hidden, weight, bias)
    )
    if process_group is not None:
        start, total = parallel.layout(process_group, V, x.shape[0], hidden.device, opts.vocab_start, opts.vocab_size)
        resolved.update(group_name=process_group.group_name, vocab_start=start, vocab_size=total)
    opts = dataclasses.replace(opts, **resolved)
    options.check_class_weight(class_weight, opts.vocab_total(V), hidden.device)
    if class_weight is not None:  # no gradient flows to it
        class_weight = class_weight.detach().float().contiguous()
    targets = labels
    if shift:  # a shifted copy of the int labels only: hidden and logits are never copied
        targets = torch.full_like(labels, opts.ignore_index)
        targets[..., :-1] = labels[..., 1:]
    targets = targets.reshape(-1)
    divisor = _divisor(num_items, opts.reduction, targets, opts.ignore_index, class_weight)
    loss, entropy, extras = op.linear_cross_entropy(x, weight, bias, targets, divisor, class_weight, opts)

    def per_token(t):
        t = t.view(labels.shape)
        return t[..., :-1] if shift else t

    if opts.reduction == "none":
        loss = per_token(loss)
    if not opts.token_stats:
        return loss, None, None
    top1, mean_logit, log_sum_sq = (per_token(t) for t in extras.unbind(1))
    return loss, per_token(entropy), (top1.bool(), mean_logit, log_sum_sq)


# The keyword options of linear_cross_entropy and their defaults.
KEYWORDS = {
    name: p.default
    for name, p in inspect.signature(linear_cross_entropy).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}


def check_keywords(kwargs: dict) -> None:
    """Every keyword option of linear_cross_entropy in ``kwargs`` is known and valid (for the
    module and the Hugging Face patch, which take them ahead of the call)."""
    unknown = sorted(set(kwargs) - set(KEYWORDS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid: {sorted(KEYWORDS)}")
    options.make(**{**KEYWORDS, **kwargs})


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """``FusedLinearCrossEntropyLoss(**options)(hidden, weight, labels, bias=None)``.

    Takes the keyword options of fused_cel.linear_cross_entropy; hidden states come first.
    Options are checked here, so a bad one fails at construction, not at the first step.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__()
        check_keywords(kwargs)
        self.options = dict(kwargs)

    def forward(self, hidden, weight, labels, bias=None, *, num_items=None) -> torch.Tensor:
        """``num_items`` given here (e.g. each batch's num_items_in_batch) overrides the option."""
        kwargs = self.options if num_items is None else {**self.options, "num_items": num_items}
        return linear_cross_entropy(hidden, weight, labels, bias, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of this device."""
    if backends.TRITON is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if triton_available(device) else "torch"
    if backend == "triton" and not triton_available(device):
        why = "Triton is not installed" if backends.TRITON is None else f"tensors are on {device}"
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


def _divisor(num_items, reduction: str, targets: torch.Tensor, ignore_index: int, class_weight=None):
    """The mean's divisor as an fp32 device tensor (no host sync); None for sum and none."""
    if reduction != "mean":
        return None
    if num_items is None and class_weight is not None:  # the counted tokens' weights (1 if they sum to 0)
        counted = targets != ignore_index
        y = torch.where(counted, targets, 0).long().clamp(0, class_weight.shape[0] - 1)
        total = torch.where(counted, class_weight[y], 0.0).sum()
        return torch.where(total == 0, 1.0, total)
    if num_items is None:
        return (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
    if isinstance(num_items, torch.Tensor):
        if num_items.device == targets.device:  # its value is not checked: that would sync
            return num_items.detach().reshape(()).to(torch.float32)
        num_items = options.check_num_items(num_items.item(), reduction)  # a host tensor: no device sync
    # torch.full launches a fill; torch.tensor(..., device=cuda) would wait for the copy.
    return torch.full((), float(num_items), dtype=torch.float32, device=targets.device)
