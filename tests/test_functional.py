"""fused_cel.linear_cross_entropy against the float64 reference, relative to plain PyTorch.

Every case runs three computations on the same fresh random inputs: ours, plain PyTorch in the
same dtype (F.linear, upcast, F.cross_entropy), and the reference in float64. Our error must be
at most plain PyTorch's plus small slack (helpers.assert_close_to_baseline), for the loss and for
every gradient.
"""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fused_cel
from fused_cel import linear_cross_entropy, linear_cross_entropy_reference
from helpers import BACKENDS, DEVICE, DTYPES, check_autocast, count_chunk_loops, leaves, make_inputs, rel_err, run_case

OPTION_SETS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"logit_scale": 0.6},
    {"shift": True},
    {"num_items": 23},
    {"ignore_index": 0},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "logit_scale": 1.5, "shift": True},
    {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 4.0, "logit_scale": 1.5, "reduction": "sum"},
    {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 4.0, "logit_scale": 0.5, "reduction": "none", "shift": True},
    {"label_smoothing": 0.05, "softcap": 30.0, "shift": True, "num_items": 41},
    {"temperature": 0.7},
    {"temperature": 1.3, "softcap": 4.0, "logit_scale": 1.5, "label_smoothing": 0.1, "z_loss": 1e-3},
]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_options(backend, dtype, opts):
    ignore_index = opts.get("ignore_index", -100)
    inputs = make_inputs((4, 32), 40, 300, ignore_index=ignore_index)
    run_case(inputs, dtype, backend, opts, chunk_size=16)


CLASS_WEIGHT_SETS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none", "shift": True},
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 4.0, "temperature": 0.8, "reduction": "sum"},
    {"num_items": 23, "ignore_index": 0},
]


@pytest.mark.parametrize("opts", CLASS_WEIGHT_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "mean")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weight(backend, dtype, opts):
    """class_weight as F.cross_entropy's weight= (the z-loss weighed by the label's too; "mean"
    over the counted tokens' weights), some classes weighing 0."""
    inputs = make_inputs((4, 32), 40, 300, ignore_index=opts.get("ignore_index", -100))
    class_weight = torch.rand(300, device=DEVICE) * 2
    class_weight[::7] = 0.0
    run_case(inputs, dtype, backend, {**opts, "class_weight": class_weight}, chunk_size=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weight_all_zero_is_zero(backend):
    """The counted tokens' weights summing to 0: loss 0 and zero gradients (not 0/0)."""
    hidden, weight, bias, labels = make_inputs((2, 9), 24, 50)
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(x, w, labels, class_weight=torch.zeros(50, device=DEVICE), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any() and not w.grad.any()


SHAPES = [((1,), 24, 300), ((37,), 40, 300), ((2, 19), 24, 5000), ((3, 5, 7), 40, 257), ((37,), 17, 4097)]


@pytest.mark.parametrize("lead,D,V", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes(backend, dtype, lead, D, V):
    run_case(make_inputs(lead, D, V), dtype, backend, {}, chunk_size=16)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 64, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_sizes(backend, chunk_size):
    inputs = make_inputs((45,), 32, 500)
    run_case(inputs, torch.bfloat16, backend, {"reduction": "sum", "shift": True}, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_vocab(backend):
    run_case(make_inputs((64,), 24, 50257), torch.bfloat16, backend, {"label_smoothing": 0.1}, chunk_size=24)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "trainable",
    [(False, True, True), (True, False, False), (False, False, True)],
    ids=["frozen_hidden", "frozen_weight", "bias_only"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen(backend, trainable, reduction, monkeypatch):
    """Only tensors that require grad get gradients, and no work is spent on the others."""
    calls = count_chunk_loops(monkeypatch)
    run_case(
        make_inputs((37,), 40, 300),
        torch.bfloat16,
        backend,
        {"reduction": reduction},
        chunk_size=8,
        trainable=trainable,
    )
    assert calls[-1] == tuple(trainable), calls


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend, reduction):
    """Every label ignored: loss 0 and zero gradients, not NaN."""
    hidden, weight, bias, labels = make_inputs((2, 9), 24, 300)
    labels.fill_(-100)
    x, w, b = leaves((hidden, weight, bias), torch.bfloat16, (True, True, True))
    loss = linear_cross_entropy(x, w, labels, b, reduction=reduction, z_loss=1e-3, label_smoothing=0.1, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    for t in (x, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(50, 16, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = linear_cross_entropy(x, w, labels, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_matches(backend, reduction):
    """Under no_grad only the loss is computed, and it is the loss of the grad path."""
    hidden, weight, bias, labels = make_inputs((2, 11), 24, 300)
    opts = dict(reduction=reduction, softcap=5.0, label_smoothing=0.1, shift=True, backend=backend, chunk_size=5)
    with torch.no_grad():
        fast = linear_cross_entropy(hidden, weight, labels, bias, **opts)
    slow = linear_cross_entropy(hidden, weight.requires_grad_(), labels, bias, **opts)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation(backend):
    """Micro-batches divided by the global token count add up to the whole batch's mean."""
    hidden, weight, bias, labels = make_inputs((4, 12), 32, 300)
    total = (labels[:, 1:] != -100).sum()
    w_acc = weight.clone().requires_grad_()
    for i in range(4):
        linear_cross_entropy(
            hidden[i : i + 1], w_acc, labels[i : i + 1], shift=True, num_items=total, backend=backend
        ).backward()
    w_full = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w_full, labels, shift=True, backend=backend).backward()
    torch.testing.assert_close(w_acc.grad, w_full.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_and_tensor_num_items(backend):
    hidden, weight, bias, labels = make_inputs((3, 10), 24, 300)
    n = torch.tensor(17, device=DEVICE)
    a = linear_cross_entropy(hidden, weight, labels.int(), num_items=n, backend=backend)
    b = linear_cross_entropy(hidden, weight, labels, num_items=17, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_hidden_gives_nan(backend):
    hidden, weight, bias, labels = make_inputs((8,), 16, 300, ignore_frac=0.0)
    for bad in (float("nan"), float("inf")):
        h = hidden.clone()
        h[3, 2] = bad
        loss = linear_cross_entropy(h, weight.requires_grad_(), labels, backend=backend)
        assert torch.isnan(loss)
        loss.backward()  # no crash


@pytest.mark.parametrize("backend", BACKENDS)
def test_unwritten_outputs_show(backend, monkeypatch):
    """Every buffer the op allocates starts as NaN: anything left unwritten poisons the result."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    for reduction in ("mean", "none"):
        run_case(make_inputs((2, 15), 24, 300), torch.bfloat16, backend, {"reduction": reduction}, chunk_size=7)


def test_backends_agree():
    """Both backends compute the same function (to rounding), on the same inputs."""
    if len(BACKENDS) < 2:
        pytest.skip("Triton cannot run here")
    hidden, weight, bias, labels = make_inputs((2, 21), 40, 1000)
    outs = []
    for backend in BACKENDS:
        w = weight.clone().requires_grad_()
        loss = linear_cross_entropy(
            hidden, w, labels, bias, backend=backend, softcap=3.0, z_loss=1e-3, label_smoothing=0.1
        )
        loss.backward()
        outs.append((loss.detach(), w.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_is_a_clear_error(backend):
    hidden, weight, bias, labels = make_inputs((5,), 16, 100)
    loss = linear_cross_entropy(hidden, weight.requires_grad_(), labels, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_with_reduction_none(backend):
    """reduction="none" keeps its inputs, not gradients: retain_graph=True works (eager mode)."""
    hidden, weight, bias, labels = make_inputs((5,), 16, 100)
    w = weight.requires_grad_()
    loss = linear_cross_entropy(hidden, w, labels, bias, reduction="none", backend=backend)
    loss.sum().backward(retain_graph=True)
    once = w.grad.clone()
    loss.sum().backward()
    torch.testing.assert_close(w.grad, 2 * once, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_fp32_params(backend):
    check_autocast(linear_cross_entropy, backend)


def test_module_matches_functional():
    hidden, weight, bias, labels = make_inputs((2, 8), 24, 300)
    mod = fused_cel.FusedLinearCrossEntropyLoss(label_smoothing=0.1, shift=True, reduction="sum")
    assert "label_smoothing=0.1" in repr(mod)
    got = mod(hidden, weight, labels, bias)
    want = linear_cross_entropy(hidden, weight, labels, bias, label_smoothing=0.1, shift=True, reduction="sum")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 33),
    v=st.integers(1, 700),
    chunk=st.one_of(st.none(), st.integers(1, 50)),
    opts=st.fixed_dictionaries(
        {
            "reduction": st.sampled_from(["mean", "sum", "none"]),
            "label_smoothing": st.sampled_from([0.0, 0.1, 1.0]),
            "z_loss": st.sampled_from([0.0, 1e-3]),
            "softcap": st.sampled_from([None, 2.0, 30.0]),
            "logit_scale": st.sampled_from([1.0, 0.5, -2.0]),
            "temperature": st.sampled_from([1.0, 0.6, 2.0]),
            "shift": st.booleans(),
        }
    ),
    use_bias=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**31 - 1),
)
# Found on an H100: a one-word vocabulary, so d_bias is a mean of 2 z u (1 - t**2) over tokens that
# cancels to 1e-5 of its terms; the softcap's tanh as 2 sigmoid(2x) - 1 (absolute error 1e-7)
# was 15x over the tolerance there.
@example(n=28, d=5, v=1, chunk=None, use_bias=True, backend=BACKENDS[-1], seed=0, opts=dict(
    reduction="mean", label_smoothing=0.0, z_loss=1e-3, softcap=30.0, logit_scale=1.0, shift=False))  # fmt: skip
def test_any_shape_and_options_fp32(n, d, v, chunk, opts, use_bias, backend, seed):
    """Property: for any shape and options, fp32 results are the reference's to fp32 rounding
    (or, where cancellation makes that loose, as close as plain PyTorch in fp32 gets)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(DEVICE)
    weight = (torch.randn(v, d, generator=g) * 2 / d**0.5).to(DEVICE)
    bias = torch.randn(v, generator=g).to(DEVICE) if use_bias else None
    labels = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    labels[torch.rand(n, generator=g).to(DEVICE) < 0.3] = -100
    results = []
    for fn, dtype, extra in (
        (linear_cross_entropy, torch.float32, dict(chunk_size=chunk, backend=backend)),
        (linear_cross_entropy_reference, torch.float32, {}),
        (linear_cross_entropy_reference, torch.float64, dict(compute_dtype=torch.float64)),
    ):
        x, w, b = leaves((hidden, weight, bias), dtype, (True, True, True))
        loss = fn(x, w, labels, b, **opts, **extra)
        grad = torch.linspace(0.5, 2.0, loss.numel(), dtype=dtype, device=DEVICE).reshape(loss.shape)
        (loss * grad).sum().backward()
        results.append([loss.detach()] + [t.grad for t in (x, w, b) if t is not None])
    for ours, base, ref in zip(*results):
        assert rel_err(ours, ref) <= max(2e-5, 1.5 * rel_err(base, ref)), (ours, base, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_tokens(backend, dtype):
    """Tokens the model already predicts (p_y near 1, the regime late in training): the target's
    gradient p_y - 1 is small, and must be as accurate as plain PyTorch's."""
    hidden, weight, bias, labels = make_inputs((4, 32), 40, 300, logit_std=8.0)
    logits = hidden @ weight.T + bias
    confident = torch.rand(labels.shape, device=DEVICE) < 0.8
    labels = torch.where(confident & (labels != -100), logits.argmax(-1), labels)
    p_y = torch.softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    assert (p_y[confident & (labels != -100)] > 0.5).float().mean() > 0.5  # the premise holds
    run_case((hidden, weight, bias, labels), dtype, backend, {"z_loss": 1e-4}, chunk_size=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inside_torch_compile(backend):
    """A compiled model that ends in the loss is one graph (the loss is one custom op,
    fused_cel.op), compiles with fullgraph=True and gives the eager gradients (more: test_compile)."""
    hidden, weight, bias, labels = make_inputs((2, 16), 24, 300)

    def model(h, w):
        return linear_cross_entropy(torch.tanh(h) * 2, w, labels, softcap=5.0, shift=True, backend=backend)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(hidden.requires_grad_(), weight.requires_grad_())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    results = []
    for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
