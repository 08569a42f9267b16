"""fused_cel as torch.library custom ops: torch.compile sees one opaque op, no graph break.

``fused_cel::linear_cross_entropy`` runs the forward, the label check (the one host
synchronisation) included, and returns (loss, lse, entropy, extras, dx, dw, db, count): entropy and
extras ([N, 3]: top-1, mean logit, log sum p**2) are the token statistics, when asked for; count
(a CPU int64 [1]) is the number of counted tokens the label check read, -1 without the check. For "mean" and "sum" the
gradients are computed there, in the same pass as the loss, and backward only scales them by
grad_output (plain torch ops, traced into the backward graph). For "none" the per-token
grad_output is needed inside the loop, so backward runs a second op,
``fused_cel::linear_cross_entropy_backward``: the loop again, one more logits matmul; the
entropy is differentiable there too (its gradient joins the same pass).

Ignored tokens cost nothing: a token whose label is ignore_index has loss, statistics and
gradient 0, so the passes run over the counted tokens only (Work.rows: their indices, from the
count the label check reads in its one synchronisation, so no other is needed), the per-token
outputs are 0 elsewhere and dX's other rows are zeros. The plan (chunk sizes, gradient dtypes) is
still that of all N tokens, as the fake implementation, which cannot know the count, chooses it.
backward of "none" takes the count from the CPU tensor forward returned: no synchronisation
either. Without the label check (check_labels=False) there is no count: every token is computed.

The ops take tensors, then fused_cel.options.Options and which gradients to compute: its numbers
as arguments, the rest as one string (this file is the one place that knows the layout). The
schema is kept short because torch's handling of a custom op's arguments takes, on every call,
time that grows with the square of their number (docs/design.md). A result the call has no use
for is an empty placeholder (a custom op cannot return None). Autocast is off inside the ops:
the compute dtype is an option, and a compiled graph runs custom ops without autocast anyway, so
eager and compiled calls compute alike.

Precision: the gradient sums are fp32 until backward scales them by grad_output and rounds them
once to their own dtype; the mean's 1/divisor joins grad_output there, in fp32 (the chunk holds
the unscaled gradient, entries in [-1, 1]: no fp16 underflow). Gradients a plan rounds as it
goes (fused_cel.plan: Plan.prescaled) are multiplied by 1/divisor before their rounding instead.
"""

from __future__ import annotations

import ast
import dataclasses
import functools

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import backends, chunks, low_memory, parallel, plan
from .options import Options

_FIELDS = dataclasses.fields(Options)
# Numbers are schema arguments of their own (under torch.compile they may be symbolic); the flags,
# names and dtype, with ``need``, travel as one string: the repr of their values.
_NUMBERS = {"int": "int", "float": "float", "int | None": "int?", "float | None": "float?"}
_NUMERIC = tuple(f.name for f in _FIELDS if f.type in _NUMBERS)
_PACKED = tuple(f for f in _FIELDS if f.type not in _NUMBERS)
_DTYPE = "torch.dtype"  # the one packed type that is no Python literal: written as its name, e.g. "bfloat16"
_OPTIONS = ", ".join(f"{_NUMBERS[f.type]} {f.name}" for f in _FIELDS if f.name in _NUMERIC) + ", str options"


def flatten(opts: Options, need) -> tuple:
    """The ops' arguments after their tensors: the numeric options, then the string of the
    others and ``need`` (plain string work, which torch.compile traces)."""
    packed = tuple(_literal(f, getattr(opts, f.name)) for f in _PACKED)
    return (*(getattr(opts, name) for name in _NUMERIC), repr((*packed, *(bool(n) for n in need))))


def _literal(field, value):
    return str(value).removeprefix("torch.") if field.type == _DTYPE else value


def _unflatten(args) -> tuple[Options, tuple[bool, bool, bool]]:
    packed, need = _decode(args[len(_NUMERIC)])
    return Options(**dict(zip(_NUMERIC, args)), **packed), need


@functools.lru_cache(maxsize=256)
def _decode(text: str) -> tuple[dict, tuple[bool, bool, bool]]:
    *values, dx, dw, db = ast.literal_eval(text)
    packed = {f.name: getattr(torch, v) if f.type == _DTYPE else v for f, v in zip(_PACKED, values)}
    return packed, (dx, dw, db)


def linear_cross_entropy(
    x, weight, bias, targets, divisor, class_weight, opts: Options
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, entropy, extras) of flattened inputs (x [N, D], targets [N], shift applied;
    divisor: the mean's, or None; class_weight: fp32 [V] or None) prepared by fused_cel.api.
    Gradients are computed for the tensors that require grad, when grad mode is on."""
    need = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (x, weight, bias)]
    loss, _, entropy, extras, *_ = forward_op(x, weight, bias, targets, divisor, class_weight, *flatten(opts, need))
    return loss, entropy, extras


@torch.library.custom_op(
    "fused_cel::linear_cross_entropy",
    mutates_args=(),
    schema=f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? divisor, Tensor? class_weight, "
    f"{_OPTIONS}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def forward_op(hidden, weight, bias, targets, divisor, class_weight, *args):
    """(loss, lse, entropy, extras, dx, dw, db, count) of hidden [N, D], weight [V, D], bias [V],
    targets [N]."""
    opts, need = _unflatten(args)
    count = -1
    with torch.autocast(hidden.device.type, enabled=False):
        if opts.check_labels:
            count = check_inputs(targets, opts.vocab_total(weight.shape[0]), opts.ignore_index, class_weight)
        work, grads = _forward(hidden, weight, bias, targets, divisor, class_weight, opts, need, count)
    stats = _placeholders((work.entropy, work.extras), hidden.device)
    return work.loss, work.lse, *stats, *_placeholders(grads, hidden.device), torch.tensor([count])


@forward_op.register_fake
def _forward_fake(hidden, weight, bias, targets, divisor, class_weight, *args):
    """Shapes and dtypes of forward_op's results; the gradients' dtypes depend on the plan."""
    opts, need = _unflatten(args)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    N = hidden.shape[0]
    loss = torch.empty((N,) if opts.reduction == "none" else (), **f32)
    stats = (torch.empty(N, **f32), torch.empty((N, 3), **f32)) if opts.token_stats else (None, None)
    grads = (None, None, None)
    if _grads_in_forward(opts) and any(need):
        p = plan.choose(opts, hidden, weight, bias, need)
        grads = _empty_grads(hidden, weight, need, p.grad_dtypes(hidden.dtype, weight.dtype))
    count = torch.empty(1, dtype=torch.int64, device="cpu")
    lse = torch.empty(N, **f32)
    return loss, lse, *_placeholders(stats, hidden.device), *_placeholders(grads, hidden.device), count


def _setup_context(ctx, inputs, output):
    """Save what backward needs: for "mean" and "sum" forward's gradients (consumed by the one
    backward), for "none" the inputs, the per-token log-sum-exp and entropy."""
    hidden, weight, bias, targets, divisor, class_weight, *args = inputs
    _, lse, entropy, extras, *grads, count = output
    ctx.set_materialize_grads(False)
    ctx.opts, ctx.need = _unflatten(args)
    ctx.n_inputs = len(inputs)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    if not _grads_in_forward(ctx.opts):  # the entropy (when computed) is differentiable
        stats = ctx.opts.token_stats
        ctx.mark_non_differentiable(lse, extras, *grads, count, *(() if stats else (entropy,)))
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if stats else None, class_weight, count)
        return
    ctx.mark_non_differentiable(lse, entropy, extras, *grads, count)
    ctx.prescaled = plan.choose(ctx.opts, hidden, weight, bias, ctx.need).prescaled
    counted = targets if ctx.opts.uniform_grad else None  # where the one grad_output value is read
    ctx.save_for_backward(*(g if n else None for g, n in zip(grads, ctx.need)), divisor, counted)
    ctx.consumed = False


@torch.autograd.function.once_differentiable
def _backward(ctx, grad_loss, _, grad_entropy, *__):
    """Gradients of hidden, weight and bias (None for the other inputs)."""
    if not _grads_in_forward(ctx.opts):
        hidden, weight, bias, targets, lse, entropy, class_weight, count = ctx.saved_tensors
        if entropy is None:  # the placeholder's
            grad_entropy = None
        if grad_loss is None and grad_entropy is None:
            return (None,) * ctx.n_inputs
        if grad_loss is None:  # only the entropy is differentiated
            grad_loss = torch.zeros_like(lse)
        args = flatten(ctx.opts, ctx.need)
        grads = backward_op(grad_loss, grad_entropy, hidden, weight, bias, targets, lse, entropy, class_weight, count,
                            *args)  # fmt: skip
        grads = tuple(g if n else None for g, n in zip(grads, ctx.need))
    else:
        if ctx.consumed:
            raise RuntimeError(
                "fused_cel: backward ran twice through the same loss; the gradients are "
                "consumed by the first backward (retain_graph=True is not supported)"
            )
        ctx.consumed = True
        *grads, divisor, targets = ctx.saved_tensors
        if ctx.opts.uniform_grad:  # per-token grad_output, one value at every counted token
            grad_loss = _uniform_value(grad_loss, targets, ctx.opts.ignore_index)
        # Each gradient times grad_output (and 1/divisor unless applied in forward), rounded once
        # to its own dtype; one already in its dtype is scaled in place (forward's buffers,
        # private to the op, are consumed).
        be = backends.get(ctx.opts.backend)
        scale = grad_loss if divisor is None else grad_loss / divisor
        grads = tuple(
            None if g is None else be.cast(g, grad_loss if pre else scale, dt)
            for g, pre, dt in zip(grads, ctx.prescaled, ctx.dtypes)
        )
    return *grads, *(None,) * (ctx.n_inputs - 3)


forward_op.register_autograd(_backward, setup_context=_setup_context)


def _grads_in_forward(opts: Options) -> bool:
    """Whether the forward pass computes the gradients (then backward scales them): "mean" and
    "sum", and "none" with uniform_grad."""
    return opts.reduction != "none" or opts.uniform_grad


# uniform_grad's promise, checked on the GPU without a host sync: each backward's flag (its
# grad_output differed between counted tokens) waits here for the next label check's sync.
_broken_promises: list[Tensor] = []


def _uniform_value(grad: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """The one value of a per-token grad_output at the counted tokens (0 if none), and its check:
    on the CPU at once, on a GPU at the next call's label check, in a compiled graph an assertion."""
    counted = targets != ignore_index
    grad = grad.reshape(-1).float()
    value = (grad * counted).sum() / counted.sum().clamp(min=1)
    broken = (((grad - value).abs() > 1e-6 * value.abs()) & counted).any()
    if torch.compiler.is_compiling() or is_fake(grad):  # traced: an assertion in the graph (a GPU's: device-side)
        torch._assert_async(~broken, _BROKEN)
    elif grad.device.type == "cpu":
        if broken:
            raise RuntimeError(_BROKEN)
    else:
        _broken_promises.append(broken[None])
    return value


_BROKEN = (
    "fused_cel: uniform_grad=True, but the log-probabilities' grad_output was not the same at every counted "
    "token (e.g. a weighted loss): the gradients scaled from one value are wrong; call without uniform_grad"
)


@torch.library.custom_op(
    "fused_cel::linear_cross_entropy_backward",
    mutates_args=(),
    schema=f"(Tensor grad, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
    f"Tensor lse, Tensor? entropy, Tensor? class_weight, Tensor? count, {_OPTIONS}) "
    "-> (Tensor, Tensor, Tensor)",
)
def backward_op(grad, grad_entropy, hidden, weight, bias, targets, lse, entropy, class_weight, count, *args):
    """(dx, dw, db) of reduction "none" for the per-token grad [N] (and grad_entropy, the
    entropy's), in their own dtypes: the loop again, with each token's grad_output as its scale,
    over the counted tokens if count (forward's, on the CPU) says how many there are."""
    opts, need = _unflatten(args)
    with torch.autocast(hidden.device.type, enabled=False):
        x, w, b = _compute(hidden, weight, bias, opts)
        p, rows = _plan(opts, hidden, weight, bias, need, targets, -1 if count is None else int(count[0]))
        dx, dw, db = _empty_grads(x, w, need, p.grad_dtypes(hidden.dtype, weight.dtype), rows)
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
        scale = pick(grad.reshape(-1).float()).contiguous()
        work = chunks.Work(x, w, b, pick(targets), pick(lse), scale=scale, dx=dx, dw=dw, db=db, rows=rows)
        work.with_class_weight(class_weight)
        if grad_entropy is not None:
            work.ent_scale, work.entropy = pick(grad_entropy.reshape(-1).float()).contiguous(), pick(entropy)
        _run(work, opts, p)
        be, one = backends.get(opts.backend), torch.ones((), dtype=torch.float32, device=x.device)
        own = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        grads = tuple(g if g is None or g.dtype == dt else be.cast(g, one, dt) for g, dt in zip((dx, dw, db), own))
    return _placeholders(grads, hidden.device)


@backward_op.register_fake
def _backward_fake(grad, grad_entropy, hidden, weight, bias, targets, lse, entropy, class_weight, count, *args):
    """dx, dw, db in their tensors' shapes and dtypes, where needed."""
    _, need = _unflatten(args)
    grads = tuple(torch.empty_like(t) if n else None for t, n in zip((hidden, weight, bias), need))
    return _placeholders(grads, hidden.device)


def _forward(hidden, weight, bias, targets, divisor, class_weight, opts: Options, need, count=-1):
    """(work, grads): the pass's Work, whose loss is reduced, and the gradients. For "mean" and
    "sum" the pass also writes dX, dW, db where ``need`` asks for them, as the plan lays them out;
    for "none", or when no gradient is needed, only the loss (and the token statistics) runs:
    one pass per chunk, no gradient buffers. count: the number of counted tokens (-1: unknown);
    the pass may run over those only (_plan), the per-token results 0 at the others."""
    if not _grads_in_forward(opts) or not any(need):
        need = (False, False, False)
    p, rows = _plan(opts, hidden, weight, bias, need, targets, count)
    x, w, b = _compute(hidden, weight, bias, opts)
    f32 = dict(dtype=torch.float32, device=x.device)
    N = x.shape[0] if rows is None else rows.shape[0]
    work = chunks.Work(x, w, b, targets if rows is None else targets[rows], torch.empty(N, **f32), rows=rows)
    work.loss = torch.empty(N, **f32)
    work.with_class_weight(class_weight)
    if opts.token_stats:
        work.entropy, work.extras = torch.empty(N, **f32), torch.empty((N, 3), **f32)
    grads = _empty_grads(x, w, need, p.grad_dtypes(hidden.dtype, weight.dtype), rows)
    if any(need):
        work.scale = torch.ones((), **f32)
        work.dx, work.dw, work.db = grads
        work.out_scale = None if divisor is None or not p.prescaled[0] else 1.0 / divisor
    _run(work, opts, p)
    if opts.reduction != "none":
        work.loss = work.loss.sum() if divisor is None else work.loss.sum() / divisor
    if rows is not None:  # each per-token result back in its token's place, 0 at the ignored ones
        M = x.shape[0]
        for name in ("loss", "lse", "entropy", "extras") if opts.reduction == "none" else ("lse", "entropy", "extras"):
            t = getattr(work, name)
            if t is not None:
                setattr(work, name, t.new_zeros((M, *t.shape[1:])).index_copy_(0, rows, t))
    return work, grads


def _plan(opts: Options, hidden, weight, bias, need, targets, count: int) -> tuple[plan.Plan, Tensor | None]:
    """(plan, rows): rows, the indices of the counted tokens (labels not ignore_index; None: every
    token) the pass runs over, and its plan. count (read by the label check; -1: unknown) sizes
    them without a synchronisation. The fake implementation plans for all N tokens and so fixes
    the gradients' dtypes and scaling: a plan for the counted tokens that would differ in those
    (a budget the gathered rows do not fit) leaves every token computed."""
    p = plan.choose(opts, hidden, weight, bias, need)
    if count < 0 or count == targets.shape[0]:
        return p, None
    try:
        counted = plan.choose(opts, hidden, weight, bias, need, tokens=count)
    except ValueError:  # the budget has no room for the gathered rows
        return p, None
    if counted.prescaled != p.prescaled:
        return p, None
    return counted, torch.nonzero_static(targets != opts.ignore_index, size=count).squeeze(1)


def _run(work: chunks.Work, opts: Options, p: plan.Plan) -> None:
    if work.targets.shape[0] == 0:  # every token ignored (dX is zeros already)
        for t in (work.dw, work.db):
            if t is not None:
                t.zero_()
    elif p.low_memory:
        low_memory.run(work, opts, p)
    else:
        chunks.run(work, opts, p, parallel.Shard.of(opts))


def _compute(hidden, weight, bias, opts: Options):
    """The inputs in the compute dtype (autocast's, chosen by the caller)."""
    dt = opts.compute_dtype
    return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)


def _empty_grads(x, w, need, dtypes, rows=None):
    """Uninitialised dX [N, D], dW [V, D], db [V] in dtypes, where need asks for them; dX zeros
    when the pass writes only the rows of the counted tokens."""
    shapes = (x.shape, w.shape, w.shape[:1])
    grads = [torch.empty(s, dtype=dt, device=x.device) if n else None for n, s, dt in zip(need, shapes, dtypes)]
    if rows is not None and grads[0] is not None:
        grads[0].zero_()
    return tuple(grads)


def _placeholders(grads, device) -> tuple[Tensor, ...]:
    """Each None as an empty fp32 tensor (results of a custom op are tensors)."""
    return tuple(torch.empty(0, dtype=torch.float32, device=device) if g is None else g for g in grads)


def check_inputs(targets: Tensor, vocab: int, ignore_index: int, class_weight: Tensor | None) -> int:
    """The number of counted labels (not ignore_index). Raise on a label outside [0, vocab) that
    is not ignore_index, or a class weight that is negative or not finite (one host
    synchronisation for all)."""
    counted = targets != ignore_index
    bad_label = counted & ((targets < 0) | (targets >= vocab))
    flags = [counted.sum(), bad_label.any()]
    if class_weight is not None:
        bad_weight = ~(torch.isfinite(class_weight) & (class_weight >= 0))
        flags.append(bad_weight.any())
    promises = [f for f in _broken_promises if f.device == targets.device]
    if promises:
        _broken_promises[:] = [f for f in _broken_promises if f.device != targets.device]
        broken = torch.cat(promises).any()
        flags.append(broken)
    count, *flags = torch.stack([f.to(torch.int64) for f in flags]).tolist()
    if not any(flags):
        return count
    if promises and flags[-1]:
        raise RuntimeError(_BROKEN + " (an earlier backward on this device)")
    if flags[0]:
        value = int(targets[bad_label][0])
        raise ValueError(
            f"label {value} is out of range: labels must be in [0, V) = [0, {vocab}) or equal ignore_index "
            f"({ignore_index})"
        )
    index = int(bad_weight.nonzero()[0])
    raise ValueError(f"class_weight must be finite and >= 0, got {class_weight[index].item()} at index {index}")
