"""fused_cel as torch.library custom ops: torch.compile sees one opaque op, no graph break.

``fused_cel::linear_cross_entropy`` runs the forward of fused_cel.autograd, the label check (the
one host synchronisation) included, and returns (loss, lse, dx, dw, db). For "mean" and "sum" the
gradients are computed there and backward only scales them (autograd.scale_grads, plain torch
ops, traced into the backward graph). For "none" backward runs a second op,
``fused_cel::linear_cross_entropy_backward``, the chunk loop again with per-token grad_output.
Every call, eager or compiled, with or without gradients, goes through these ops.

Arguments are tensors and primitives: the fields of autograd.Options (in its order), the compute
dtype (chosen by the caller, from autocast), the vocabulary shard (a process group by its name,
which torch.distributed resolves; None for a single process) and which gradients to compute. A
result the call has no use for is an empty placeholder (a custom op cannot return None).
Autocast is off inside the ops: the compute dtype is explicit, and a compiled graph runs custom
ops without autocast anyway, so eager and compiled calls compute alike.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import autograd, parallel


def linear_cross_entropy(x, weight, bias, targets, divisor, options: dict, compute_dtype, check_labels, shard):
    """The loss of flattened inputs (x [N, D], targets [N], shift applied) prepared by
    fused_cel.functional; options: the fields of autograd.Options. Gradients are computed for
    the tensors that require grad, when grad mode is on."""
    need = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (x, weight, bias)]
    if shard is None:
        group = dict(group_name=None, vocab_start=0, vocab_total=weight.shape[0], reduce_hidden_grad=True)
    else:
        group = dict(
            group_name=shard.group.group_name,
            vocab_start=shard.start,
            vocab_total=shard.total,
            reduce_hidden_grad=shard.reduce_hidden_grad,
        )
    loss, *_ = forward_op(
        x,
        weight,
        bias,
        targets,
        divisor,
        **options,
        compute_dtype=compute_dtype,
        **group,
        check_labels=check_labels,
        need_dx=need[0],
        need_dw=need[1],
        need_db=need[2],
    )
    return loss


@torch.library.custom_op("fused_cel::linear_cross_entropy", mutates_args=())
def forward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    divisor: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    chunk_size: Optional[int],
    memory_budget: Optional[float],
    backend: str,
    compute_dtype: torch.dtype,
    group_name: Optional[str],
    vocab_start: int,
    vocab_total: int,
    reduce_hidden_grad: bool,
    check_labels: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, dx, dw, db) of hidden [N, D], weight [V, D], bias [V], targets [N], the mean's
    divisor (or None): autograd.forward, with placeholders for gradients it does not return."""
    opts = autograd.Options(
        ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size, memory_budget, backend
    )
    shard = _shard(group_name, vocab_start, vocab_total, reduce_hidden_grad)
    need = (need_dx, need_dw, need_db)
    with torch.autocast(hidden.device.type, enabled=False):
        if check_labels:
            check_label_range(targets, vocab_total, ignore_index)
        loss, lse, grads = autograd.forward(hidden, weight, bias, targets, divisor, opts, compute_dtype, need, shard)
    return loss, lse, *_placeholders(grads, hidden.device)


# Both ops take, after their tensors, the 9 fields of autograd.Options in order, the compute
# dtype and the 4 of the shard (14 in all); the forward op then check_labels, and both need_dx,
# need_dw, need_db.
def _options(args) -> tuple[autograd.Options, torch.dtype]:
    return autograd.Options(*args[:9]), args[9]


@forward_op.register_fake
def _forward_fake(hidden, weight, bias, targets, divisor, *args):
    """Shapes and dtypes of forward_op's results; the gradients' dtypes depend on the plan."""
    (opts, compute_dtype), need = _options(args), args[-3:]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss = torch.empty(hidden.shape[:1] if opts.reduction == "none" else (), **f32)
    grads = (None, None, None)
    if opts.reduction != "none" and any(need):
        _, dtypes, _ = autograd.grad_layout(opts, hidden, weight, bias, compute_dtype, need)
        grads = autograd.empty_grads(hidden, weight, need, dtypes)
    return loss, torch.empty(hidden.shape[:1], **f32), *_placeholders(grads, hidden.device)


def _setup_context(ctx, inputs, output):
    """Save what backward needs: for "mean" and "sum" forward's gradients (consumed by the
    one backward), for "none" the inputs and the per-token log-sum-exp."""
    hidden, weight, bias, targets, divisor, *args = inputs
    _, lse, *grads = output
    ctx.mark_non_differentiable(lse, *grads)
    ctx.set_materialize_grads(False)
    (opts, compute_dtype), ctx.need = _options(args), tuple(args[-3:])
    ctx.config, ctx.n_inputs, ctx.reduction, ctx.backend = args[:14], len(inputs), opts.reduction, opts.backend
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    if opts.reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return
    _, _, ctx.prescaled = autograd.grad_layout(opts, hidden, weight, bias, compute_dtype, ctx.need)
    ctx.save_for_backward(*(g if n else None for g, n in zip(grads, ctx.need)), divisor)
    ctx.consumed = False


@torch.autograd.function.once_differentiable
def _backward(ctx, grad_loss, *_):
    """Gradients of hidden, weight and bias (None for the others)."""
    if ctx.reduction == "none":
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grads = backward_op(grad_loss, hidden, weight, bias, targets, lse, *ctx.config, *ctx.need)
        grads = tuple(g if n else None for g, n in zip(grads, ctx.need))
    else:
        if ctx.consumed:
            raise RuntimeError(
                "fused_cel: backward ran twice through the same loss; the gradients are "
                "consumed by the first backward (retain_graph=True is not supported)"
            )
        ctx.consumed = True
        *grads, divisor = ctx.saved_tensors
        grads = autograd.scale_grads(grads, ctx.prescaled, ctx.dtypes, grad_loss, divisor, ctx.backend)
    return *grads, *(None,) * (ctx.n_inputs - 3)


forward_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fused_cel::linear_cross_entropy_backward", mutates_args=())
def backward_op(
    grad: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    lse: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    chunk_size: Optional[int],
    memory_budget: Optional[float],
    backend: str,
    compute_dtype: torch.dtype,
    group_name: Optional[str],
    vocab_start: int,
    vocab_total: int,
    reduce_hidden_grad: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) of reduction "none" for the per-token grad [N], in their own dtypes:
    autograd.backward_none, with placeholders for gradients not needed."""
    opts = autograd.Options(
        ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size, memory_budget, backend
    )
    shard = _shard(group_name, vocab_start, vocab_total, reduce_hidden_grad)
    need = (need_dx, need_dw, need_db)
    with torch.autocast(hidden.device.type, enabled=False):
        grads = autograd.backward_none(grad, hidden, weight, bias, targets, lse, opts, compute_dtype, need, shard)
    return _placeholders(grads, hidden.device)


@backward_op.register_fake
def _backward_fake(grad, hidden, weight, bias, targets, lse, *args):
    """dx, dw, db in their tensors' shapes and dtypes, where needed."""
    need = args[-3:]
    grads = tuple(torch.empty_like(t) if n else None for t, n in zip((hidden, weight, bias), need))
    return _placeholders(grads, hidden.device)


def _placeholders(grads, device) -> tuple[Tensor, ...]:
    """Each None as an empty fp32 tensor (results of a custom op are tensors)."""
    return tuple(torch.empty(0, dtype=torch.float32, device=device) if g is None else g for g in grads)


def _shard(group_name, vocab_start, vocab_total, reduce_hidden_grad) -> Optional[parallel.Shard]:
    if group_name is None:
        return None
    group = dist.distributed_c10d._resolve_process_group(group_name)
    return parallel.Shard(group, dist.get_world_size(group), vocab_start, vocab_total, reduce_hidden_grad)


def check_label_range(targets: Tensor, vocab: int, ignore_index: int) -> None:
    """Raise on a label outside [0, vocab) that is not ignore_index (one host synchronisation)."""
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bad.any():
        value = int(targets[bad][0])
        raise ValueError(
            f"label {value} is out of range: labels must be in [0, V) = [0, {vocab}) or equal ignore_index "
            f"({ignore_index})"
        )
