"""Vocabulary-parallel fused_cel (process_group=) on 2 and 3 gloo ranks, uneven vocabulary shards.

Each rank holds a contiguous block of W's rows (and of the bias); every rank passes the same
hidden states and global labels. The loss and dX (the same on every rank) and the concatenated
dW and db shards must equal the single-process full-vocabulary result: in fp32 to rounding, and
in every dtype within the core tolerance (error vs float64 at most plain PyTorch's, plus slack).
Each world size is one spawned group that runs every case, backend and dtype (spawning costs
seconds); the tests then compare its results one case at a time. With CUDA, every rank runs on
the one GPU (gloo moves the per-token statistics), so the compiled kernel's shard paths run too.
"""

import pytest
import torch
import torch.distributed as dist

import fused_cel
from helpers import BACKENDS, DEVICE, assert_close_to_baseline, rel_err
from dist_util import run_group

V, D, B, T = 301, 16, 2, 20  # 301 = 100 + 101 + 100 = 150 + 151: uneven shards
BOUNDS = {2: [0, 150, 301], 3: [0, 100, 201, 301]}
DTYPES = [torch.float32, torch.bfloat16]
EVERYTHING = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0, logit_scale=0.7, temperature=0.8, shift=True)
CASES = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "smoothing_and_z_loss": {"label_smoothing": 0.1, "z_loss": 1e-3},
    "softcap_and_scale": {"softcap": 3.0, "logit_scale": 0.7},
    "ignore_index_7": {"ignore_index": 7},
    "shift": {"shift": True},
    "num_items": {"num_items": 50},
    "everything_none": {**EVERYTHING, "reduction": "none", "chunk_size": 8},
    "everything_sum": {**EVERYTHING, "reduction": "sum", "chunk_size": 16},
    # chunk 0 all ignored; every target of chunk 1 in the last shard (none on rank 0)
    "skewed_chunks": {"chunk_size": 8},
    "frozen_weight_no_bias": {},
    "explicit_layout": {},
    "partial_dx": {"reduce_hidden_grad": False},
    "no_grad": {},
    # class weights (every rank passes the whole vocabulary's), with label smoothing
    "class_weight": {"class_weight": torch.linspace(0.0, 2.0, V), "label_smoothing": 0.1, "z_loss": 1e-3},
    # a budget that cuts the 40 tokens into chunks of 11-37 (the same on every rank: the shared V)
    "budget": {"memory_budget_mib": 0.025, "reduction": "sum"},
    # tighter: on 2 ranks in bf16 the plan rounds dX chunk by chunk, after the group's fp32 sum
    "budget_round_dx": {"memory_budget_mib": 0.0195},
}
NO_BIAS = {"frozen_weight_no_bias"}
# The Triton interpreter costs ~0.3 s a call: the kernel's shard paths (statistics mode, columns
# offset by vocab_start, targets on other shards) run in these cases; the torch path runs all.
TRITON_CASES = {"none", "ignore_index_7", "everything_none", "everything_sum", "skewed_chunks", "class_weight"}
RUNS = [(c, b) for c in CASES for b in BACKENDS if b == "torch" or c in TRITON_CASES]


def parallel_inputs(seed):
    """Fresh fp32 inputs and, per case, labels and the gradient fed to backward."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * (2.0 / D**0.5)
    bias = torch.randn(V, generator=gen) * 0.5
    base = torch.randint(0, V, (B, T), generator=gen)
    base[torch.rand(B, T, generator=gen) < 0.2] = -100
    labels, grads = {}, {}
    for name, opts in CASES.items():
        y = base.clone()
        if name == "ignore_index_7":
            y[y == -100] = 7
        if name == "skewed_chunks":
            flat = y.view(-1)
            flat[:8] = -100
            flat[8:16] = torch.randint(BOUNDS[3][-2], V, (8,), generator=gen)
        labels[name] = y
        shape = (B, T - 1) if opts.get("shift") else (B, T)
        none = opts.get("reduction") == "none"
        grads[name] = torch.randn(shape, generator=gen) if none else torch.tensor(3.7)
    return hidden, weight, bias, labels, grads


def compute(hidden, weight, bias, labels, grad, dtype, backend, opts, trainable=(True, True, True), **kw):
    """Loss and gradients of one call (weight and bias: the rows this call holds). backend=None:
    the materialising reference, upcast to kw["compute_dtype"]."""
    leaves = [
        None if t is None else t.to(DEVICE, dtype, copy=True).requires_grad_(g)
        for t, g in zip((hidden, weight, bias), trainable)
    ]
    labels, grad = labels.to(DEVICE), grad.to(DEVICE)
    opts = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
    if backend is None:
        loss = fused_cel.linear_cross_entropy_reference(*leaves[:2], labels, leaves[2], **opts, **kw)
        grad = grad.to(loss.dtype)
    else:
        loss = fused_cel.linear_cross_entropy(*leaves[:2], labels, leaves[2], backend=backend, **opts, **kw)
    if any(trainable):
        (loss * grad).sum().backward()
    return [loss.detach().cpu()] + [None if t is None or t.grad is None else t.grad.cpu() for t in leaves]


def _rank_work(rank, world, inputs):
    """One rank: every case, backend and dtype, with this rank's rows of W and b."""
    hidden, weight, bias, labels, grads = inputs
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    group = dist.group.WORLD
    results = {}
    for dtype in DTYPES:
        for name, backend in RUNS:
            opts = CASES[name]
            kw = dict(process_group=group)
            if name == "explicit_layout":
                kw.update(vocab_start=lo, vocab_size=V)
            b = None if name in NO_BIAS else bias[lo:hi]
            trainable = (True, name not in NO_BIAS, True)
            args = (hidden, weight[lo:hi], b, labels[name], grads[name], dtype, backend, opts)
            combine, combined = fused_cel.parallel.combine, []
            if name.startswith("budget"):  # one combine a chunk: count the chunks this rank cut
                fused_cel.parallel.combine = lambda *a, c=combine, n=combined, **k: n.append(1) or c(*a, **k)
            try:
                if name == "no_grad":
                    with torch.no_grad():
                        out = compute(*args, trainable=(False, False, False), **kw)
                else:
                    out = compute(*args, trainable=trainable, **kw)
            finally:
                fused_cel.parallel.combine = combine
            results[name, backend, str(dtype)] = out
            if name.startswith("budget"):
                results["chunks", name, str(dtype)] = len(combined)
    # Bad input must fail on every rank with a clear error, never hang a collective.
    errors = []
    for bad in (dict(hidden=hidden[:, : T - rank]), dict(vocab_start=V - 1), dict(memory_budget_mib=1e-4)):
        h = bad.get("hidden", hidden)
        try:
            fused_cel.linear_cross_entropy(
                h,
                weight[lo:hi],
                labels["mean"][:, : h.shape[1]],
                process_group=group,
                vocab_start=bad.get("vocab_start"),
                memory_budget_mib=bad.get("memory_budget_mib"),
            )
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    results["errors"] = errors
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world_run(request, module_seed):
    inputs = parallel_inputs(module_seed)
    return request.param, inputs, run_group(_rank_work, request.param, inputs, timeout=120)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case, backend", RUNS)
def test_matches_single_process(world_run, case, backend, dtype):
    world, (hidden, weight, bias, labels, grads), ranks = world_run
    opts = {k: v for k, v in CASES[case].items() if k != "reduce_hidden_grad"}
    use_bias, trainable = case not in NO_BIAS, (True, case not in NO_BIAS, True)
    key = (case, backend, str(dtype))
    loss, dx = ranks[0][key][:2]
    for r, res in enumerate(ranks):
        assert torch.equal(res[key][0], loss), f"rank {r}'s loss differs from rank 0's"
    if case == "partial_dx":  # each rank keeps its shard's part: their sum is dX
        for res in ranks[1:]:
            dx = dx + res[key][1]
    elif dx is not None:
        for r, res in enumerate(ranks):
            assert torch.equal(res[key][1], dx), f"rank {r}'s d_hidden differs from rank 0's"
    ours = [loss, dx] + [
        None if ranks[0][key][i] is None else torch.cat([res[key][i] for res in ranks]) for i in (2, 3)
    ]

    b = bias if use_bias else None
    args = (hidden, weight, b, labels[case], grads[case])
    if case == "no_grad":
        trainable = (False, False, False)
    single = compute(*args, dtype, backend, opts, trainable=trainable)
    ref_opts = {k: v for k, v in opts.items() if k not in ("chunk_size", "memory_budget_mib")}
    plain = compute(*args, dtype, None, ref_opts, trainable=trainable, compute_dtype=torch.float32)
    ref = compute(*args, torch.float64, None, ref_opts, trainable=trainable, compute_dtype=torch.float64)
    n_tokens = labels[case].numel()
    for name, o, s, p, r in zip(("loss", "d_hidden", "d_weight", "d_bias"), ours, single, plain, ref):
        if s is None:
            assert o is None, f"{name}: a gradient that single-process fused_cel does not give"
            continue
        assert o.dtype == s.dtype and o.shape == s.shape, f"{name}: {o.dtype} {tuple(o.shape)}"
        if dtype == torch.float32:  # the same math; only summation order differs
            assert rel_err(o, s) < 2e-6, f"{name}: {rel_err(o, s):.2e} from single-process fused_cel"
        assert_close_to_baseline(name, o.float(), p.float(), r, dtype, n_tokens)


def test_bad_input_fails_on_every_rank(world_run):
    world, _, ranks = world_run
    for r, res in enumerate(ranks):
        tokens_msg, start_msg, budget_msg = res["errors"]
        assert tokens_msg is not None and "same tokens" in tokens_msg, f"rank {r}: {tokens_msg}"
        assert start_msg is not None and "must lie in the vocabulary" in start_msg, f"rank {r}: {start_msg}"
        assert budget_msg is not None and "a vocabulary shard has no low-memory plan" in budget_msg, budget_msg


@pytest.mark.parametrize("case", ["budget", "budget_round_dx"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_budget_cuts_the_same_chunks_on_every_rank(world_run, dtype, case):
    """memory_budget_mib with a process group: every rank plans from the shared vocabulary share
    and the same budget, so all cut the same chunks (a mismatch would hang a collective)."""
    _, _, ranks = world_run
    chunks = [res["chunks", case, str(dtype)] for res in ranks]
    assert len(set(chunks)) == 1 and chunks[0] > 1, chunks


def _compiled_rank_work(rank, world, inputs):
    """This rank's loss and gradients, eager and under torch.compile (aot_eager), for reduction
    "mean" and "none": with vocab_start and vocab_size given (fullgraph=True; the group reaches
    the custom op by its name), and derived (an all-gather and a host sync: a graph break)."""
    hidden, weight, bias, labels, grads = inputs
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    results = {}
    for layout, fullgraph, kw in (("explicit", True, dict(vocab_start=lo, vocab_size=V)), ("derived", False, {})):
        for case in ("mean", "everything_none"):
            torch._dynamo.reset()
            compiled = torch.compile(fused_cel.linear_cross_entropy, backend="aot_eager", fullgraph=fullgraph)
            for name, fn in (("eager", fused_cel.linear_cross_entropy), ("compiled", compiled)):
                x, w, b = (t.clone().requires_grad_() for t in (hidden, weight[lo:hi], bias[lo:hi]))
                loss = fn(x, w, labels[case], b, process_group=dist.group.WORLD, backend="torch", **CASES[case], **kw)
                (loss * grads[case]).sum().backward()
                results[layout, case, name] = [loss.detach(), x.grad, w.grad, b.grad]
    return results


def test_compiled_vocab_parallel(seed):
    inputs = parallel_inputs(seed)
    for rank in run_group(_compiled_rank_work, 2, inputs, timeout=120):
        for layout in ("explicit", "derived"):
            for case in ("mean", "everything_none"):
                eager, compiled = rank[layout, case, "eager"], rank[layout, case, "compiled"]
                torch.testing.assert_close(compiled, eager, rtol=0, atol=0, msg=f"{layout}, {case}")


def _stats_rank_work(rank, world, inputs, backends):
    """This rank's loss, token statistics and gradients (the loss's and the entropy's, for
    reduction "none") with its rows of W and b; the same in one process for rank 0."""
    hidden, weight, bias, labels, grads = inputs
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    results = {}
    for backend in backends:
        for reduction in ("mean", "none"):
            y, opts = labels["everything_none"], {**EVERYTHING, "chunk_size": 8, "reduction": reduction}
            for name, rows, group in (("parallel", slice(lo, hi), dist.group.WORLD), ("single", slice(None), None)):
                x, w, b = (t.to(DEVICE, copy=True).requires_grad_() for t in (hidden, weight[rows], bias[rows]))
                kw = {} if group is None else dict(process_group=group)
                loss, stats = fused_cel.linear_cross_entropy(
                    x, w, y.to(DEVICE), b, backend=backend, return_token_stats=True, **opts, **kw
                )
                g = torch.linspace(0.5, 2.0, loss.numel(), device=DEVICE).reshape(loss.shape)
                objective = (loss * g).sum()
                if reduction == "none":  # the entropy is differentiable there
                    objective = objective + (stats.entropy * g.flip(-1)).sum()
                objective.backward()
                out = [loss.detach(), *stats, x.grad, w.grad, b.grad]
                results[backend, reduction, name] = [t.cpu() for t in out]
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_token_stats_match_single_process(world, seed):
    """The token statistics (and the entropy's gradient) combine over the ranks: every rank has
    the single-process statistics, dX, and its rows of dW and db (fp32, to rounding)."""
    inputs = parallel_inputs(seed)
    backends = ["torch"] + (["triton"] if "triton" in BACKENDS else [])
    ranks = run_group(_stats_rank_work, world, inputs, backends, timeout=120)
    for backend in backends:
        for reduction in ("mean", "none"):
            single = ranks[0][backend, reduction, "single"]
            for r, res in enumerate(ranks):
                got = res[backend, reduction, "parallel"]
                lo, hi = BOUNDS[world][r], BOUNDS[world][r + 1]
                want = single[:6] + [single[6][lo:hi], single[7][lo:hi]]
                for i, (g, w) in enumerate(zip(got, want)):
                    what = f"{backend} {reduction} rank {r} output {i}"
                    if g.dtype == torch.bool:
                        assert torch.equal(g, w), what
                    else:
                        assert rel_err(g, w) < 2e-6, f"{what}: {rel_err(g, w):.2e}"
