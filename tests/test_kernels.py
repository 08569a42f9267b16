"""Every Triton kernel (fused_cel.kernels) against its torch twin (fused_cel.backends.torch), call
by call, and every shared @triton.jit helper of kernels/common.py against the twin of the same
name: the loss, the gradient at the target and elsewhere, the softcap's derivative, the
statistics merge.

Runs on CUDA, or on the CPU through Triton's interpreter. Outputs are poisoned with NaN first,
so anything a kernel leaves unwritten fails the comparison.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fused_cel.backends import torch as twin
from fused_cel.options import Options
from helpers import BACKENDS, DEVICE

if "triton" not in BACKENDS:
    pytest.skip("Triton cannot run here", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fused_cel import backends  # noqa: E402
from fused_cel.kernels import common, fold, scale  # noqa: E402

TRITON = backends.TRITON
OPTS = [
    Options(),
    Options(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, logit_scale=0.7),
    Options(ignore_index=3, label_smoothing=1.0, logit_scale=-1.3),
]
OPT_IDS = ["plain", "all-options", "ignore3-smooth1-negscale"]
NAN = dict(fill_value=float("nan"), dtype=torch.float32, device=DEVICE)


def nans(*shape):
    return torch.full(shape, **NAN)


def chunk(rows, V, dtype, ignore_index=-100):
    logits = (torch.randn(rows, V, device=DEVICE) * 3).to(dtype)
    targets = torch.randint(0, V, (rows,), device=DEVICE)
    targets[1 % rows] = ignore_index
    return logits, targets


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-5)


def cross_entropy(be, logits, targets, opts, scale=None):
    """(gradient as written, loss, lse, target grad, entropy, extras) of one call with the token
    statistics, from poisoned outputs."""
    rows = logits.shape[0]
    logits, loss, lse, tg, entropy, extras = logits.clone(), *(nans(rows) for _ in range(4)), nans(rows, 3)
    tg = None if scale is None else tg
    be.cross_entropy(logits, targets, loss, lse, opts, scale=scale, target_grad=tg, entropy=entropy, extras=extras)
    return logits, loss, lse, tg if tg is not None else torch.zeros(rows, device=DEVICE), entropy, extras


@pytest.mark.parametrize("V", [1, 300, 4096, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("opts", OPTS, ids=OPT_IDS)
def test_cross_entropy_matches_twin(opts, dtype, V):
    logits, targets = chunk(9, V, dtype, opts.ignore_index)
    for s in (torch.rand(1, device=DEVICE) + 0.5, torch.rand(9, device=DEVICE) + 0.5):  # one scale, one per token
        got, want = (cross_entropy(be, logits, targets, opts, s) for be in (TRITON, twin))
        for g, w in zip(got, want):
            assert not g.isnan().any()
            torch.testing.assert_close(g.float(), w.float(), **tolerance(dtype))
    # the loss alone (no_grad): the logits are left untouched
    got, want = (cross_entropy(be, logits, targets, opts) for be in (TRITON, twin))
    assert torch.equal(got[0], logits)
    torch.testing.assert_close(got[1:], want[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", OPTS, ids=OPT_IDS)
@pytest.mark.parametrize("where", ["whole", "block"])
def test_gradient_matches_twin(opts, dtype, where):
    """The gradient from a known lse: of the whole row (reduction "none"'s backward) and of a
    block of a larger vocabulary (the low-memory vocabulary pass, a shard's second pass), where
    some targets fall outside the block."""
    V, start, total = (300, 0, 300) if where == "whole" else (300, 100, 1000)
    logits, _ = chunk(9, V, dtype)
    targets = torch.randint(0, total, (9,), device=DEVICE)
    targets[:4] = start + torch.randint(0, V, (4,), device=DEVICE)
    targets[4] = opts.ignore_index
    lse = torch.randn(9, device=DEVICE) + 8
    scale = torch.rand(9, device=DEVICE) + 0.5
    ent = dict(ent_scale=torch.randn(9, device=DEVICE), entropy=torch.rand(9, device=DEVICE) * 3)
    for extra in ({}, ent):  # with the entropy's gradient too
        results = []
        for be in (TRITON, twin):
            out, tg = logits.clone(), nans(9)
            be.gradient(out, targets, lse, scale, tg, opts, vocab_start=start, vocab_total=total, **extra)
            results.append((out.float(), tg))
        assert not results[0][1].isnan().any()
        torch.testing.assert_close(results[0], results[1], **tolerance(dtype))


@pytest.mark.parametrize("tiles", [False, True], ids=["row", "tiles"])
@pytest.mark.parametrize("opts", OPTS[:2], ids=OPT_IDS[:2])
def test_shard_stats_matches_twin(opts, tiles):
    logits, _ = chunk(9, 700, torch.bfloat16)
    start = 1000
    targets = torch.randint(0, 3000, (9,), device=DEVICE)
    targets[:4] = start + torch.randint(0, 700, (4,), device=DEVICE)
    tile_stats = (
        twin.logits_tile_stats(logits, 700, 256, opts.logit_scale, opts.softcap).contiguous() if tiles else None
    )
    results = []
    for be in (TRITON, twin):
        stats = nans(9, 4)
        be.shard_stats(logits, targets, stats, opts, vocab_start=start, tile_stats=tile_stats)
        results.append(stats)
    assert not results[0].isnan().any()
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("write_p", [True, False], ids=["write-P", "stats-only"])
@pytest.mark.parametrize("first", [True, False], ids=["first-block", "later-block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_online_softmax_matches_twin(dtype, first, write_p):
    """One block of the low-memory token sweep: running statistics continued over it, the
    rescale factor, and (write_p) exp(u - m) du/dz written over the block."""
    rows, cols, v0, V = 9, 300, 100, 1000
    logits = (torch.randn(rows, cols, device=DEVICE) * 3).to(dtype)
    targets = torch.randint(0, V, (rows,), device=DEVICE)
    targets[:4] = v0 + torch.randint(0, cols, (4,), device=DEVICE)  # some targets in this block
    targets[4] = -100
    running = torch.stack([torch.randn(rows) * 3, torch.rand(rows) * 50 + 1, torch.randn(rows), torch.randn(rows)], 1)
    if first:
        running[:, 0], running[:, 1:] = float("-inf"), 0.0
    results = []
    for be in (TRITON, twin):
        out, st, alpha = logits.clone(), running.to(DEVICE).clone(), nans(rows)
        be.online_softmax(out, targets, st, alpha, OPTS[1], vocab_start=v0, vocab_total=V, write_p=write_p)
        results.append((out.float(), st, alpha))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(results[0][1:], results[1][1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    if not write_p:
        assert torch.equal(results[0][0], logits.float())
    if first:
        assert torch.equal(results[0][2], torch.zeros(rows, device=DEVICE))


def test_invalid_label_gives_nan_not_a_read():
    logits = torch.randn(3, 100, device=DEVICE)
    targets = torch.tensor([5, 100, -7], device=DEVICE)
    _, loss, _, tg, _, extras = cross_entropy(TRITON, logits, targets, OPTS[0], torch.ones(1, device=DEVICE))
    assert torch.isfinite(loss[0]) and loss[1:].isnan().all()
    assert torch.equal(tg[1:], torch.zeros(2, device=DEVICE))  # no gradient from a bad label
    assert torch.equal(extras[1:, 0], torch.zeros(2, device=DEVICE))  # and no top-1


# -- the shared helpers, elementwise, against their twins --------------------------------------


@triton.heuristics({"HAS_SOFTCAP": lambda a: a["softcap"] is not None})
@triton.jit
def _helpers_kernel(in_ptr, out_ptr, n, vocab_total, label_smoothing, z_loss, logit_scale, softcap,
                    HAS_SOFTCAP: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(in_ptr + offs, mask=mask)  # (no generator expressions: the GPU compiler has none)
    m = tl.load(in_ptr + n + offs, mask=mask)
    log_s = tl.load(in_ptr + 2 * n + offs, mask=mask)
    u_sum = tl.load(in_ptr + 3 * n + offs, mask=mask)
    u_y = tl.load(in_ptr + 4 * n + offs, mask=mask)
    w_y = tl.load(in_ptr + 5 * n + offs, mask=mask)
    w_total = tl.load(in_ptr + 6 * n + offs, mask=mask)
    w = tl.load(in_ptr + 7 * n + offs, mask=mask)
    u = common.transform(z, logit_scale, softcap, HAS_SOFTCAP)
    lse = m + log_s
    a = common.p_coef(lse, vocab_total, label_smoothing, z_loss, w_y, w_total, WEIGHTED)
    loss = common.token_loss(m, log_s, u_sum, u_y, vocab_total, label_smoothing, z_loss, w_y, w_total, WEIGHTED)
    g_y = common.grad_at_target(u_y, m, log_s, lse, vocab_total, label_smoothing, z_loss, w_y, w_total, WEIGHTED)
    tl.store(out_ptr + offs, u, mask=mask)
    tl.store(out_ptr + n + offs, loss, mask=mask)
    tl.store(out_ptr + 2 * n + offs, g_y, mask=mask)
    tl.store(out_ptr + 3 * n + offs, a + 0.0 * u, mask=mask)
    if WEIGHTED:
        d = common.softmax_grad(u, m, log_s, a, label_smoothing, vocab_total, w)
    else:
        d = common.softmax_grad(u, m, log_s, a, label_smoothing, vocab_total, 1.0)
    tl.store(out_ptr + 4 * n + offs, d, mask=mask)
    tl.store(out_ptr + 5 * n + offs, common.entropy_grad(u, m, log_s, u_y), mask=mask)
    # token_stats with u_sum standing in for E_p[u - m], exp(z) for sum p**2 and u_y for mb
    entropy, top1, mean_u, log_sum_sq = common.token_stats(m, log_s, u_sum, u_sum, tl.exp(z), u_y, u, vocab_total)
    tl.store(out_ptr + 6 * n + offs, entropy, mask=mask)
    tl.store(out_ptr + 7 * n + offs, tl.where(top1, 1.0, 0.0), mask=mask)
    tl.store(out_ptr + 8 * n + offs, mean_u, mask=mask)
    tl.store(out_ptr + 9 * n + offs, log_sum_sq, mask=mask)
    if HAS_SOFTCAP:
        tl.store(out_ptr + 10 * n + offs, common.softcap_grad(u, 1.0 / softcap), mask=mask)


@triton.jit
def _merge_kernel(in_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    block_m = tl.load(in_ptr + 2 + offs, mask=mask, other=float("-inf"))
    block_s = tl.load(in_ptr + 2 + n + offs, mask=mask, other=0.0)
    m, s = common.merge(tl.load(in_ptr), tl.load(in_ptr + 1), block_m, block_s)
    tl.store(out_ptr, m)
    tl.store(out_ptr + 1, s)


@pytest.mark.parametrize("weighted", [False, True], ids=["", "class-weights"])
@pytest.mark.parametrize("opts", OPTS, ids=OPT_IDS)
def test_helpers_match_twins(opts, weighted):
    n, V = 200, 5000
    z = torch.randn(n, device=DEVICE) * 8
    m = twin.transform(z, opts.logit_scale, opts.softcap) + torch.rand(n, device=DEVICE) * 3  # each "row's" max
    log_s = torch.rand(n, device=DEVICE) * 8
    u_sum = torch.randn(n, device=DEVICE) * 100
    u_y = m - torch.rand(n, device=DEVICE) * torch.logspace(-6, 1, n, device=DEVICE)  # confident ones too
    w_y, w_total, w = torch.rand(n, device=DEVICE) * 2, torch.rand(n, device=DEVICE) * V, torch.rand(n, device=DEVICE)
    out = nans(11 * n)
    inputs = torch.stack([z, m, log_s, u_sum, u_y, w_y, w_total, w])
    _helpers_kernel[(1,)](inputs, out, n, V, opts.label_smoothing, opts.z_loss, opts.logit_scale, opts.softcap,
                          WEIGHTED=weighted, BLOCK=256)  # fmt: skip
    u = twin.transform(z, opts.logit_scale, opts.softcap)
    lse = m + log_s
    weights = (w_y, w_total) if weighted else ()
    a = twin.p_coef(lse, V, opts.label_smoothing, opts.z_loss, *weights)
    want = {
        "transform": u,
        "token_loss": twin.token_loss(m, log_s, u_sum, u_y, V, opts.label_smoothing, opts.z_loss, *weights),
        "grad_at_target": twin.grad_at_target(u_y, m, log_s, lse, V, opts.label_smoothing, opts.z_loss, *weights),
        "p_coef": a * torch.ones_like(u),
        "softmax_grad": twin.softmax_grad(u, m, log_s, a, opts.label_smoothing, V, w if weighted else 1.0),
        "entropy_grad": twin.entropy_grad(u, m, log_s, u_y),
    }
    stats = twin.token_stats(m, log_s, u_sum, u_sum, z.exp(), u_y, u, V)
    want.update(entropy=stats[0], top1=stats[1].float(), mean_logit=stats[2], log_sum_sq=stats[3])
    if opts.softcap is not None:
        want["softcap_grad"] = twin.softcap_grad(u, 1.0 / opts.softcap)
    for (name, w_), got in zip(want.items(), out.view(11, n)):
        # GPUs' exp is approximate: a few ulp of its argument, as in the kernel-vs-twin tests above
        torch.testing.assert_close(got, w_, rtol=1e-5, atol=1e-6, msg=lambda s, name=name: f"{name}: {s}")


@pytest.mark.parametrize("start", ["empty", "running"])
def test_merge_matches_twin(start):
    n = 300
    block_m, block_s = torch.randn(n, device=DEVICE) * 5, torch.rand(n, device=DEVICE) * 100
    m, s = (float("-inf"), 0.0) if start == "empty" else (2.0, 40.0)
    out = nans(2)
    _merge_kernel[(1,)](torch.cat([torch.tensor([m, s], device=DEVICE), block_m, block_s]), out, n, BLOCK=512)
    want = twin.merge(torch.tensor(m, device=DEVICE), torch.tensor(s, device=DEVICE), block_m, block_s)
    torch.testing.assert_close(tuple(out), want, rtol=1e-6, atol=0)


# -- the fold and the casts --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scatter", [True, False], ids=["dW-scatter", "dX-gather"])
def test_fold_matches_twin(scatter, dtype):
    """kernels.fold (atomic scatter / gather, no temporaries) equals the twin's; tokens that share
    a row (repeated targets) sum, and a coefficient of 0 adds nothing (even NaN rows)."""
    n, rows, D = 37, 11, 1100  # D over one block of columns
    index = torch.randint(0, rows, (n,), device=DEVICE)
    coef = torch.randn(n, device=DEVICE)
    coef[::5] = 0.0
    dst = torch.randn(rows if scatter else n, D, device=DEVICE)
    src = torch.randn(n if scatter else rows, D, device=DEVICE).to(dtype)
    if scatter:
        src[coef == 0] = float("nan")
    got, want = dst.clone(), dst.clone()
    args = (index, None) if scatter else (None, index)
    fold.fold(got, args[0], src, args[1], coef)
    twin.fold(want, args[0], src.nan_to_num() if scatter else src, args[1], coef)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_scale_in_place(dtype):
    """kernels.scale.scale_ equals torch's in-place multiply (fp32 math, one rounding) over more
    than one block, and with a scale of 1 leaves every bit as it was, NaN included."""
    x = torch.randn(3 * 4096 + 77, device=DEVICE).to(dtype)
    x[5] = float("nan")
    for s in (0.37, 3.0, 1.0):
        factor = torch.tensor([s], device=DEVICE)
        got = scale.scale_(x.clone(), factor)
        want = twin.scale_(x.clone(), factor)
        if s == 1.0:  # bit for bit
            assert torch.equal(got.view(torch.uint8), x.view(torch.uint8))
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scale_into_casts_once(dtype):
    """kernels.scale.scale_into: an fp32 sum times the scale, rounded once (as torch.mul into an
    out of that dtype), every element written (the out is poisoned), a scale of 1 included."""
    x = torch.randn(2, 4096 + 300, device=DEVICE) * 5
    for s in (0.37, 1.0):
        factor = torch.tensor([s], device=DEVICE)
        out = torch.full(x.shape, float("nan"), dtype=dtype, device=DEVICE)
        scale.scale_into(out, x, factor)
        want = twin.scale_into(torch.empty_like(out), x, factor)
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_scale_rows():
    x = torch.randn(5, 5000, device=DEVICE)
    x[1, 7] = float("nan")
    alpha = torch.tensor([0.5, 1.0, 2.0, 1.0, 0.0], device=DEVICE)
    got = scale.scale_rows_(x.clone(), alpha)
    torch.testing.assert_close(got, twin.scale_rows_(x.clone(), alpha), rtol=0, atol=0, equal_nan=True)


def test_every_kernel_compiles_for_hopper():
    """The real Triton compiler, down to an sm_90 cubin, for each kernel's main specializations
    (tests/compile_kernels.py): the interpreter that runs the kernels here accepts Python it
    rejects. No GPU needed; in a process of its own, without TRITON_INTERPRET."""
    script = pathlib.Path(__file__).with_name("compile_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
