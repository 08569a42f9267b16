"""linear_log_probs and the token statistics (return_token_stats) against float64, relative to
plain PyTorch in the same dtype: log-probabilities, entropy and their gradients for random
per-token grad_outputs; top-1 exactly the float64 argmax except where the two largest logits tie
within the dtype's rounding (counted and bounded); mean logit and log sum p**2."""

import pytest
import torch

from fused_cel import linear_cross_entropy, linear_log_probs, linear_log_probs_reference, low_memory, op
from helpers import (
    BACKENDS,
    LOW,
    assert_close_to_baseline,
    count_chunk_loops,
    leaves,
    make_inputs,
    rel_err,
    spy_calls,
)

NAMES = ("log_probs", "entropy", "top1", "mean_logit", "log_sum_sq_probs")
TRANSFORM = ("ignore_index", "softcap", "logit_scale", "temperature", "shift")
ALL = dict(entropy=True, top1=True, mean_logit=True, log_sum_sq_probs=True)


def reference(inputs, dtype, trainable, opts):
    """Leaves in ``dtype`` and the reference's statistics on them (float64 compute for fp64)."""
    hidden, weight, bias, labels = inputs
    ins = leaves((hidden, weight, bias), dtype, trainable)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    kw = {k: v for k, v in opts.items() if k in TRANSFORM}
    return ins, linear_log_probs_reference(*ins[:2], labels, ins[2], compute_dtype=compute, **kw)


def top1_mismatches(got, ref_inputs, opts, dtype):
    """Positions where our top-1 differs from float64's: each must be a near-tie (the gap between
    the two largest logits within a few roundings of the dtype). Returns their number."""
    hidden, weight, bias, labels = ref_inputs
    _, ref = reference(ref_inputs, torch.float64, (False, False, False), opts)
    logits = (hidden.double() @ weight.double().T + bias.double()) * opts.get("logit_scale", 1.0)
    if opts.get("shift"):
        logits = logits[..., :-1, :]
    top2 = logits.topk(2, dim=-1).values
    gap, scale = top2[..., 0] - top2[..., 1], top2[..., 0].abs() + 1.0
    wrong = got != ref[2]
    tie = gap <= 8 * torch.finfo(dtype).eps * scale
    assert (tie | ~wrong).all(), f"top-1 differs from float64 away from a tie at {wrong.nonzero().tolist()}"
    return int(wrong.sum())


def check(inputs, dtype, backend, opts, *, trainable=(True, True, True), **kw):
    """linear_log_probs with every statistic, its log-probs and entropy back-propagated with
    random per-token grads, against the reference in dtype (plain PyTorch) and in float64."""
    ours_in = leaves(inputs[:3], dtype, trainable)
    ours = linear_log_probs(*ours_in[:2], inputs[3], ours_in[2], backend=backend, **ALL, **opts, **kw)
    base_in, base = reference(inputs, dtype, trainable, opts)
    ref_in, ref = reference(inputs, torch.float64, trainable, opts)
    g_lp, g_h = torch.randn_like(ours.log_probs), torch.randn_like(ours.log_probs)
    if any(trainable):
        for stats in (ours, base, ref):  # log-probs and entropy, each with its own per-token grad
            (stats[0] * g_lp.to(stats[0].dtype) + stats[1] * g_h.to(stats[1].dtype)).sum().backward()
    ours_g, base_g, ref_g = ([None if t is None else t.grad for t in ins] for ins in (ours_in, base_in, ref_in))
    n = inputs[3].numel()
    for i in (0, 1, 3, 4):
        assert ours[i].dtype == torch.float32 and ours[i].shape == ref[i].shape, NAMES[i]
        assert_close_to_baseline(NAMES[i], ours[i].detach(), base[i].detach(), ref[i].detach(), dtype, n)
    assert ours.top1.dtype == torch.bool
    mismatches = top1_mismatches(ours.top1, inputs, opts, dtype)
    assert mismatches <= max(1, n // 50), f"{mismatches} of {n} top-1 flags differ (all at near-ties)"
    for name, o, b, r in zip(("d_hidden", "d_weight", "d_bias"), ours_g, base_g, ref_g):
        if o is not None:
            assert_close_to_baseline(name, o, b, r, dtype, n)
    return ours


OPTIONS = [
    {},
    {"shift": True},
    {"softcap": 4.0, "logit_scale": 1.5},
    {"temperature": 0.7, "softcap": 30.0, "shift": True},
    {"ignore_index": 0, "temperature": 1.3},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_and_entropy(backend, dtype, opts):
    inputs = make_inputs((4, 32), 40, 300, ignore_index=opts.get("ignore_index", -100))
    check(inputs, dtype, backend, opts, chunk_size=16)


@pytest.mark.parametrize("trainable", [(True, False, False), (False, True, True)], ids=["frozen_weight", "no_dx"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_partial_grads(backend, trainable):
    check(make_inputs((2, 40), 24, 500), torch.bfloat16, backend, {"softcap": 5.0}, trainable=trainable)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_low_memory_plan(backend, monkeypatch):
    """Under a memory budget the plan takes whole rows for the statistics and the entropy's
    gradient (the sweep has neither) and sums dW in a vocabulary pass."""
    passes = spy_calls(monkeypatch, low_memory, "vocab_pass", lambda args, kwargs: args[0].ent_scale is not None)
    sweeps = spy_calls(monkeypatch, low_memory, "token_sweep", lambda args, kwargs: 1)
    check(make_inputs((4, 32), 40, 300), torch.bfloat16, backend, {"temperature": 0.9}, memory_budget_mib=LOW)
    assert passes == [True] and not sweeps, (passes, sweeps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_what_is_asked_for(backend):
    hidden, weight, bias, labels = make_inputs((3, 10), 16, 200)
    out = linear_log_probs(hidden, weight, labels, bias, backend=backend)
    assert out.entropy is None and out.top1 is None and out.mean_logit is None and out.log_sum_sq_probs is None
    want = -linear_cross_entropy(hidden, weight, labels, bias, reduction="none", backend=backend)
    torch.testing.assert_close(out.log_probs, want, rtol=0, atol=0)
    out = linear_log_probs(hidden, weight, labels, bias, backend=backend, top1=True)
    assert out.top1 is not None and out.entropy is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_alone_is_differentiable(backend):
    """A loss of the entropy only (GRPO's bonus without the log-probs' own gradient)."""
    hidden, weight, bias, labels = make_inputs((2, 12), 16, 200)
    x = hidden.clone().requires_grad_()
    linear_log_probs(x, weight, labels, bias, entropy=True, backend=backend).entropy.sum().backward()
    ins, ref = reference((hidden, weight, bias, labels), torch.float64, (True, False, False), {})
    ref[1].sum().backward()
    assert rel_err(x.grad, ins[0].grad) < 1e-5


UNIFORM = [{}, {"shift": True, "softcap": 5.0}, {"temperature": 0.7, "logit_scale": 1.5}]


@pytest.mark.parametrize("opts", UNIFORM, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_grad_for_an_nll_mean(backend, dtype, opts, monkeypatch):
    """uniform_grad=True (SFT's loss: minus the mean log-prob over the counted tokens): the
    gradients come from the forward pass (one loop over the chunks, writing dX, dW, db; no
    backward op), as close to float64 as plain PyTorch's; log-probs and statistics as without."""
    loops = count_chunk_loops(monkeypatch)
    backward_ops = spy_calls(monkeypatch, op, "backward_op", lambda args, kwargs: 1)
    inputs = make_inputs((4, 32), 40, 300)
    ours_in = leaves(inputs[:3], dtype, (True, True, True))
    ours = linear_log_probs(*ours_in[:2], inputs[3], ours_in[2], backend=backend, chunk_size=48, **ALL,
                            uniform_grad=True, **opts)  # fmt: skip
    assert loops == [(True, True, True)] and not ours.entropy.requires_grad
    base_in, base = reference(inputs, dtype, (True, True, True), opts)
    ref_in, ref = reference(inputs, torch.float64, (True, True, True), opts)
    counted = (base[0] != 0).sum()
    for lp in (ours.log_probs, base[0], ref[0]):
        (-lp.sum() / counted).backward()
    assert not backward_ops
    n = inputs[3].numel()
    for i in (0, 1, 3, 4):
        assert_close_to_baseline(NAMES[i], ours[i].detach(), base[i].detach(), ref[i].detach(), dtype, n)
    for name, o, b, r in zip(("d_hidden", "d_weight", "d_bias"), ours_in, base_in, ref_in):
        assert_close_to_baseline(name, o.grad, b.grad, r.grad, dtype, n)


def test_uniform_grad_under_compile():
    """One op in a fullgraph compile; the same gradients as eager."""
    hidden, weight, bias, labels = make_inputs((2, 12), 16, 200)

    def loss(x):
        return -linear_log_probs(x, weight, labels, bias, uniform_grad=True, backend="torch").log_probs.sum()

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        x = hidden.clone().requires_grad_()
        fn(x).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_uniform_grad_refuses_a_weighted_loss():
    """A broken promise (per-token weights, as DFT's) raises (on the CPU in backward, on a GPU at
    the next call, without a host sync of its own); so does a non-bool."""
    hidden, weight, bias, labels = make_inputs((2, 12), 16, 200)
    x = hidden.clone().requires_grad_()
    out = linear_log_probs(x, weight, labels, bias, uniform_grad=True, backend="torch")
    with pytest.raises(RuntimeError, match=r"uniform_grad=True, but the log-probabilities' grad_output was not"):
        (out.log_probs * torch.rand_like(out.log_probs)).sum().backward()
        linear_log_probs(hidden, weight, labels, bias, backend="torch")  # a GPU's check: the next label check
    with pytest.raises(TypeError, match=r"uniform_grad must be a bool, got int"):
        linear_log_probs(hidden, weight, labels, uniform_grad=1)


REDUCTIONS = [
    {"reduction": "mean"},
    {"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3},
    {"reduction": "none", "shift": True, "softcap": 4.0, "temperature": 0.8},
]


@pytest.mark.parametrize("opts", REDUCTIONS, ids=lambda o: o["reduction"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_from_the_loss(backend, opts):
    """return_token_stats: the loss and gradients are those without it, and the statistics are
    the float64 reference's (as close as plain PyTorch's in bf16)."""
    hidden, weight, bias, labels = make_inputs((4, 32), 40, 300)
    results = []
    for stats in (False, True):
        x, w, b = leaves((hidden, weight, bias), torch.bfloat16, (True, True, True))
        out = linear_cross_entropy(x, w, labels, b, backend=backend, chunk_size=16, return_token_stats=stats, **opts)
        loss, token = out if stats else (out, None)
        loss.sum().backward()
        results.append((loss.detach(), x.grad, w.grad, b.grad, token))
    # Equal but for rounding: the statistics need the row, so the opt-in matmul's per-tile
    # statistics (the CPU tests' route) are not used with them, and the lse may differ in its last bit.
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for got, want in zip(results[1][1:4], results[0][1:4]):
        assert rel_err(got, want) < 1e-3
    token = results[1][4]
    assert not token.entropy.requires_grad
    n = labels.numel()
    kw = {k: opts[k] for k in TRANSFORM if k in opts}
    _, base = reference((hidden, weight, bias, labels), torch.bfloat16, (False, False, False), kw)
    _, ref = reference((hidden, weight, bias, labels), torch.float64, (False, False, False), kw)
    for name, i in (("entropy", 1), ("mean_logit", 3), ("log_sum_sq_probs", 4)):
        assert_close_to_baseline(name, getattr(token, name), base[i], ref[i], torch.bfloat16, n)
    top1_mismatches(token.top1, (hidden, weight, bias, labels), kw, torch.bfloat16)


def test_bad_requests():
    hidden, weight, bias, labels = make_inputs((2, 5), 16, 50)
    with pytest.raises(TypeError, match=r"entropy must be a bool, got int"):
        linear_log_probs(hidden, weight, labels, entropy=1)
    with pytest.raises(TypeError, match=r"return_token_stats must be a bool, got str"):
        linear_cross_entropy(hidden, weight, labels, return_token_stats="yes")
    with pytest.raises(ValueError, match=r"temperature must be > 0\.0, got 0\.0"):
        linear_log_probs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match=r"label 50 is out of range"):
        linear_log_probs(hidden, weight, torch.full_like(labels, 50))
