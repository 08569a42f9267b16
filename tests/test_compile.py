"""torch.compile(fullgraph=True) of fused_cel.linear_cross_entropy.

Dynamo must capture one graph in which the chunked computation is one opaque custom op
(fused_cel::linear_cross_entropy, fused_cel/op.py); fullgraph=True makes any graph break an error.
The compiled loss and gradients must equal eager's and be as close to float64 as plain PyTorch's
(helpers.run_case), on both backends, compiled by Dynamo's aot_eager backend and by
Inductor (which on the CPU needs a C++ compiler: skipped with the reason when it cannot run).
torch.library.opcheck checks the ops' schemas, fake implementations and autograd registration.
"""

import functools

import pytest
import torch

from fused_cel import linear_cross_entropy, linear_log_probs, low_memory, op
from fused_cel.options import Options
from helpers import BACKENDS, DEVICE, LOW, check_autocast, count_chunk_loops, leaves, make_inputs, run_case, spy_calls

COMPILERS = ["aot_eager", "inductor"]
DTYPES = [torch.bfloat16, torch.float32]
OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, logit_scale=1.5, shift=True)
CASES = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "options": OPTIONS,
    "none_options": {**OPTIONS, "reduction": "none"},
    "num_items_tensor": {"num_items": torch.tensor(41, device=DEVICE), "shift": True},
    "class_weight": {"class_weight": torch.linspace(0.0, 2.0, 300, device=DEVICE), "label_smoothing": 0.1},
    "low_memory": {"memory_budget_mib": LOW},
    "low_memory_none": {"memory_budget_mib": LOW, "reduction": "none", "shift": True},
}
# Inductor compiles C++ for every graph (seconds each, cold): it runs the cases whose backward
# graphs differ (gradients cast from fp32, scaled in their own dtype, reduction "none"'s backward
# op). The Triton interpreter costs ~0.3 s a kernel call on the CPU: it runs a few cases.
INDUCTOR_CASES = {("mean", torch.bfloat16), ("mean", torch.float32), ("none_options", torch.bfloat16)}
INDUCTOR_CASES |= {("low_memory", torch.bfloat16), ("num_items_tensor", torch.float32)}
TRITON_CASES = {("mean", torch.bfloat16), ("none_options", torch.bfloat16), ("low_memory", torch.bfloat16)}
RUNS = [
    (backend, compiler, dtype, case)
    for backend in BACKENDS
    for compiler in COMPILERS
    for dtype in DTYPES
    for case in CASES
    if (compiler == "aot_eager" or (case, dtype) in INDUCTOR_CASES)
    and (backend == "torch" or (case, dtype) in TRITON_CASES)
]
# The other tests: every backend with aot_eager, the torch path with Inductor.
PAIRS = [(b, c) for b in BACKENDS for c in COMPILERS if c == "aot_eager" or b == "torch"]
FORWARD_OP = torch.ops.fused_cel.linear_cross_entropy.default
# Compiled equals eager bit for bit on the CPU; on CUDA the target fold's atomic adds (and
# index_add_) sum the rows that several tokens share in no fixed order.
SAME = dict(rtol=0, atol=0) if DEVICE.type == "cpu" else dict(rtol=1e-5, atol=1e-6)
SHAPE = (2, 24), 40, 300  # 48 tokens, D, V: LOW selects the low-memory plan in bf16 and fp32


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles anew (no recompile limit reached across tests, no stale graphs)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@functools.cache
def _inductor_failure() -> str | None:
    try:
        torch.compile(lambda t: t.sin() + 1, backend="inductor", fullgraph=True)(torch.randn(8, device=DEVICE))
    except Exception as e:  # noqa: BLE001 - any failure means Inductor cannot run here
        return f"{type(e).__name__}: {e}"[:300]
    return None


class Recorder:
    """A torch.compile backend that keeps each graph Dynamo captures, then compiles it with
    ``compiler``; ops() lists the fused_cel ops in them."""

    def __init__(self, compiler: str):
        if compiler == "inductor" and _inductor_failure():
            pytest.skip(f"Inductor cannot compile on this machine: {_inductor_failure()}")
        self.compiler, self.graphs = compiler, []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend(self.compiler)(gm, example_inputs)

    def ops(self) -> list:
        nodes = (n for gm in self.graphs for n in gm.graph.nodes)
        return [
            n.target for n in nodes if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fused_cel"
        ]


def compiled(compiler: str):
    """linear_cross_entropy compiled with fullgraph=True, and the Recorder of its graphs."""
    recorder = Recorder(compiler)
    return torch.compile(linear_cross_entropy, backend=recorder, fullgraph=True), recorder


def eager_and_compiled(fn, inputs, dtype, backend, opts, trainable=(True, True, True)):
    """Loss and gradients of eager linear_cross_entropy and of fn on the same inputs and grad_output."""
    hidden, weight, bias, labels = inputs
    results = []
    for f in (linear_cross_entropy, fn):
        x, w, b = leaves((hidden, weight, bias), dtype, trainable)
        loss = f(x, w, labels, b, backend=backend, **opts)
        if any(trainable):
            (loss * torch.linspace(0.5, 2.0, loss.numel(), device=DEVICE).reshape(loss.shape)).sum().backward()
        results.append([loss.detach()] + [t.grad for t in (x, w, b)])
    return results


@pytest.mark.parametrize("backend, compiler, dtype, case", RUNS, ids=lambda v: str(v).replace("torch.", ""))
def test_compiled_matches_eager_and_float64(backend, compiler, dtype, case, monkeypatch):
    vocab_passes = spy_calls(monkeypatch, low_memory, "vocab_pass", lambda args, kwargs: 1)
    opts = CASES[case]
    inputs = make_inputs(*SHAPE)
    fn, recorder = compiled(compiler)
    run_case(inputs, dtype, backend, opts, fn=fn, grad_scale=4.0)
    eager, ours = eager_and_compiled(fn, inputs, dtype, backend, opts)
    torch.testing.assert_close(ours, eager, **SAME)
    assert len(recorder.graphs) == 1 and recorder.ops() == [FORWARD_OP], recorder.graphs
    assert bool(vocab_passes) == ("memory_budget_mib" in opts), "the low-memory plan did not run (or ran unasked)"


@pytest.mark.parametrize("backend, compiler", PAIRS)
def test_compiled_log_probs_and_token_stats(backend, compiler):
    """linear_log_probs with the entropy's gradient, and the loss with its token statistics, are
    one graph with the one op, fullgraph, and give eager's results."""
    hidden, weight, bias, labels = make_inputs(*SHAPE)
    recorder = Recorder(compiler)

    def log_probs(x, w, b):
        out = linear_log_probs(x, w, labels, b, entropy=True, top1=True, temperature=0.8, shift=True, backend=backend)
        return (out.log_probs * 1.5 + 0.3 * out.entropy).sum(), out.top1

    def with_stats(x, w, b):
        loss, stats = linear_cross_entropy(x, w, labels, b, softcap=4.0, return_token_stats=True, backend=backend)
        return loss, stats.entropy, stats.top1

    for fn in (log_probs, with_stats):
        torch._dynamo.reset()
        recorder.graphs.clear()
        results = []
        for f in (fn, torch.compile(fn, backend=recorder, fullgraph=True)):
            x, w, b = leaves((hidden, weight, bias), torch.float32, (True, True, True))
            out = f(x, w, b)
            out[0].backward()
            results.append([*out, x.grad, w.grad, b.grad])
        # Inductor sums the per-token outputs in its own order: the scalar to rounding
        torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-6)
        assert len(recorder.graphs) == 1 and recorder.ops() == [FORWARD_OP], fn.__name__


@pytest.mark.parametrize("trainable", [(True, False, False), (False, True, False)], ids=["frozen_weight", "weight"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend, compiler", PAIRS)
def test_compiled_partial_grads(backend, compiler, reduction, trainable, monkeypatch):
    """Only the tensors that require grad get gradients, and only theirs are computed."""
    calls = count_chunk_loops(monkeypatch)
    inputs = make_inputs(*SHAPE)
    fn, _ = compiled(compiler)
    opts = {"reduction": reduction, "shift": True}
    run_case(inputs, torch.bfloat16, backend, opts, fn=fn, trainable=trainable, grad_scale=4.0)
    assert calls[-1] == tuple(trainable), calls
    eager, ours = eager_and_compiled(fn, inputs, torch.bfloat16, backend, opts, trainable)
    torch.testing.assert_close(ours, eager, **SAME)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend, compiler", PAIRS)
def test_compiled_no_grad(backend, compiler, reduction, monkeypatch):
    """Under no_grad the compiled op is the one-pass loss: no gradient is written."""
    calls = count_chunk_loops(monkeypatch)
    hidden, weight, bias, labels = make_inputs((2, 11), 24, 300)
    opts = dict(reduction=reduction, softcap=5.0, label_smoothing=0.1, shift=True, backend=backend, chunk_size=5)
    fn, recorder = compiled(compiler)
    with torch.no_grad():
        ours = fn(hidden, weight.requires_grad_(), labels, bias, **opts)
        eager = linear_cross_entropy(hidden, weight, labels, bias, **opts)
    torch.testing.assert_close(ours, eager, **SAME)
    assert calls == [(False, False, False)] * 2 and recorder.ops() == [FORWARD_OP]


@pytest.mark.parametrize("backend, compiler", PAIRS)
def test_compiled_under_autocast(backend, compiler):
    """fp32 parameters under bf16 autocast: the compiled call equals the eager one."""
    fn, recorder = compiled(compiler)
    inputs, ours = check_autocast(fn, backend)
    hidden, weight, bias, labels = inputs
    x, w, b = leaves((hidden, weight, bias), torch.float32, (True, True, True))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, labels, b, backend=backend, chunk_size=8)
    loss.backward()
    torch.testing.assert_close(ours, [loss.detach(), x.grad, w.grad, b.grad], **SAME)
    assert recorder.ops() == [FORWARD_OP]


@pytest.mark.parametrize("backend, compiler", PAIRS)
def test_compiled_label_check(backend, compiler):
    """The label check (a host sync) runs inside the op: no graph break, the same clear error."""
    hidden, weight, _, labels = make_inputs((2, 8), 16, 50)
    fn, recorder = compiled(compiler)
    fn(hidden.requires_grad_(), weight, labels, backend=backend).backward()
    labels[1, 3] = 50
    with pytest.raises(ValueError, match=r"label 50 is out of range: labels must be in \[0, V\) = \[0, 50\)"):
        fn(hidden, weight, labels, backend=backend)
    assert len(recorder.graphs) == 1


def test_compiled_model_with_dynamic_shapes():
    """A model compiled once runs batches of other lengths and other num_items (Dynamo makes them
    symbolic after the first change) without a graph break or a recompile per step."""
    weight = torch.randn(300, 24, device=DEVICE) / 5
    proj = torch.nn.Linear(24, 24).to(DEVICE)

    def model(x, labels, n):
        return linear_cross_entropy(proj(x), weight, labels, shift=True, num_items=n, memory_budget_mib=LOW)

    recorder = Recorder("aot_eager")
    fn = torch.compile(model, backend=recorder, fullgraph=True)
    for step, length in enumerate((20, 24, 28, 31)):
        x = torch.randn(2, length, 24, device=DEVICE)
        labels = torch.randint(0, 300, (2, length), device=DEVICE)
        losses = []
        for f in (model, fn):
            proj.zero_grad()
            loss = f(x, labels, 20 + step)
            loss.backward()
            losses.append((loss.detach(), proj.weight.grad.clone()))
        torch.testing.assert_close(losses[1], losses[0], **SAME)
    assert len(recorder.graphs) <= 2, f"{len(recorder.graphs)} graphs for 4 batch lengths"


def op_args(reduction="mean", dtype=torch.float32, need=(True, True, True), budget=None, backend="torch", stats=False):
    """Arguments of fused_cel::linear_cross_entropy for a small problem (12 tokens, V=50)."""
    n, d, v = 12, 8, 50
    hidden = torch.randn(n, d, device=DEVICE, dtype=dtype, requires_grad=need[0])
    weight = (torch.randn(v, d, device=DEVICE) / 3).to(dtype).requires_grad_(need[1])
    bias = torch.randn(v, device=DEVICE, dtype=dtype, requires_grad=need[2])
    targets = torch.randint(0, v, (n,), device=DEVICE)
    targets[:3] = -100
    divisor = torch.tensor(9.0, device=DEVICE) if reduction == "mean" else None
    opts = Options(
        reduction=reduction,
        label_smoothing=0.1,
        z_loss=1e-3,
        softcap=5.0,
        chunk_size=4 if budget is None else None,
        memory_budget_mib=budget,
        backend=backend,
        compute_dtype=dtype,
        token_stats=stats,
    )
    return (hidden, weight, bias, targets, divisor, None, *op.flatten(opts, need))


# Where the op returns gradients already in their parameters' dtype (fp32 parameters, the
# low-memory plan) eager backward scales them in place: those buffers are the op's results, which
# opcheck's eager-vs-AOTAutograd comparison holds on to. fused_cel.linear_cross_entropy never
# exposes them; test_compiled_matches_eager_and_float64 compares compiled with eager instead.
ALL_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
NO_AOT = ALL_TESTS[:3]
OPCHECKS = {
    "mean_bf16": (dict(dtype=torch.bfloat16), ALL_TESTS),
    "sum_bf16_frozen_weight": (dict(reduction="sum", dtype=torch.bfloat16, need=(True, False, False)), ALL_TESTS),
    "none": (dict(reduction="none"), ALL_TESTS),
    "no_grad": (dict(need=(False, False, False)), ALL_TESTS),
    "mean_fp32": (dict(), NO_AOT),
    "low_memory_bf16": (dict(dtype=torch.bfloat16, budget=LOW), NO_AOT),
    "triton_mean_bf16": (dict(dtype=torch.bfloat16, backend="triton"), ALL_TESTS),
    "none_token_stats": (dict(reduction="none", stats=True), ALL_TESTS),
    "mean_token_stats_bf16": (dict(dtype=torch.bfloat16, stats=True), ALL_TESTS),
}


@pytest.mark.parametrize("case", OPCHECKS)
def test_opcheck_forward(case):
    kwargs, tests = OPCHECKS[case]
    if kwargs.get("backend") == "triton" and "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    torch.library.opcheck(op.forward_op, op_args(**kwargs), test_utils=tests)


@pytest.mark.parametrize("compact", [False, True], ids=["all_tokens", "counted_tokens"])
@pytest.mark.parametrize("entropy", [False, True], ids=["loss", "loss+entropy"])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, True)], ids=str)
def test_opcheck_backward(need, entropy, compact):
    hidden, weight, bias, targets, _, _, *options = op_args("none", need=need, stats=entropy)
    logits = hidden.detach() @ weight.detach().T + bias.detach()
    lse = torch.logsumexp(logits, dim=-1)
    grad = torch.randn(hidden.shape[0], device=DEVICE)
    ent = (grad, -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)) if entropy else (None, None)
    # forward's count of the counted tokens (a CPU tensor): the pass runs over those rows only
    count = torch.tensor([int((targets != -100).sum())]) if compact else None
    args = (grad, ent[0], hidden.detach(), weight.detach(), bias.detach(), targets, lse, ent[1], None, count, *options)
    torch.library.opcheck(op.backward_op, args)


@pytest.mark.parametrize(
    "opts",
    [
        Options(),
        Options(reduction="none", softcap=30.0, logit_scale=1 / 3, chunk_size=7, compute_dtype=torch.bfloat16),
        Options(memory_budget_mib=0.05, group_name="tp;'\"", vocab_start=0, vocab_size=7, check_labels=False),
        Options(token_stats=True, class_weighted=True, uniform_grad=True, compute_dtype=torch.float16),
    ],
    ids=["defaults", "numbers", "group", "flags"],
)
@pytest.mark.parametrize("need", [(True, True, False), (False, False, True)], ids=str)
def test_options_travel_through_the_op_arguments(opts, need):
    """The op's arguments (numbers one each, the rest as one string) give back the same options."""
    args = op.flatten(opts, need)
    assert op._unflatten(args) == (opts, need)
    assert len(op.forward_op._opoverload._schema.arguments) == 6 + len(args)


def test_compiled_with_changing_options():
    """Numbers and labels that change between calls (Dynamo may pass them on as symbolic) reach the
    op without a graph break, and each call computes with its own values."""
    weight = torch.randn(50, 8, device=DEVICE) / 3

    def model(x, labels, chunk, ignore, eps, cap):
        kw = dict(chunk_size=chunk, ignore_index=ignore, label_smoothing=eps, softcap=cap, backend="torch")
        return linear_cross_entropy(x, weight, labels, **kw)

    fn = torch.compile(model, backend="aot_eager", fullgraph=True)
    for i in range(4):
        x = torch.randn(12, 8, device=DEVICE)
        labels = torch.randint(0, 50, (12,), device=DEVICE)
        labels[: 2 + i] = -5 - i
        args = (labels, 3 + i, -5 - i, 0.1 * i, 4.0 + i)
        got, want = fn(x.requires_grad_(), *args), model(x, *args)
        torch.testing.assert_close(got, want, **SAME)
