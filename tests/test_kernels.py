"""The chunk kernel (fused_cel.kernels.ce_chunk) against its pure-PyTorch twin, call by call.

Runs on CUDA, or on the CPU through Triton's interpreter. Outputs are poisoned with NaN first,
so anything the kernel leaves unwritten fails the comparison.
"""

import pytest
import torch

from fused_cel import torch_impl
from conftest import BACKENDS, DEVICE

if "triton" not in BACKENDS:
    pytest.skip("Triton cannot run here", allow_module_level=True)

from fused_cel import kernels  # noqa: E402

OPTS = [
    dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0),
    dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, logit_scale=0.7),
    dict(ignore_index=3, label_smoothing=1.0, z_loss=0.0, softcap=None, logit_scale=-1.3),
]


def run(impl, logits, targets, opts, compute_lse, write_grad, lse=None, scale=None):
    rows = logits.shape[0]
    nan = dict(fill_value=float("nan"), dtype=torch.float32, device=DEVICE)
    logits = logits.clone()
    loss = torch.full((rows,), **nan)
    lse = torch.full((rows,), **nan) if lse is None else lse.clone()
    tg = torch.full((rows,), **nan)
    impl.ce_chunk(logits, targets, loss, lse, scale, tg, compute_lse=compute_lse, write_grad=write_grad, **opts)
    return logits, loss, lse, tg


@pytest.mark.parametrize("V", [1, 300, 4096, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("opts", OPTS, ids=["plain", "all-options", "ignore3-smooth1-negscale"])
def test_kernel_matches_torch(opts, dtype, V):
    rows = 9
    logits = (torch.randn(rows, V, device=DEVICE) * 3).to(dtype)
    targets = torch.randint(0, V, (rows,), device=DEVICE)
    targets[1] = opts["ignore_index"]
    scale = torch.rand(rows, device=DEVICE) + 0.5

    # pass 1 and 2 in one call (forward of mean/sum), then pass 2 alone from the lse (backward of none)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-5)
    for per_token in (False, True):
        s = scale if per_token else scale[:1]
        got = run(kernels, logits, targets, opts, True, True, scale=s)
        want = run(torch_impl, logits, targets, opts, True, True, scale=s)
        for g, w in zip(got, want):
            assert not g.isnan().any()
            torch.testing.assert_close(g.float(), w.float(), **tol)
    lse = got[2]
    got = run(kernels, logits, targets, opts, False, True, lse=lse, scale=scale)
    want = run(torch_impl, logits, targets, opts, False, True, lse=lse, scale=scale)
    torch.testing.assert_close(got[0].float(), want[0].float(), **tol)
    # loss only (no_grad): the logits are left untouched
    got = run(kernels, logits, targets, opts, True, False)
    want = run(torch_impl, logits, targets, opts, True, False)
    assert torch.equal(got[0], logits)
    torch.testing.assert_close(got[1:3], want[1:3])


def test_invalid_label_gives_nan_not_a_read():
    logits = torch.randn(3, 100, device=DEVICE)
    targets = torch.tensor([5, 100, -7], device=DEVICE)
    _, loss, _, tg = run(kernels, logits, targets, OPTS[0], True, True, scale=torch.ones(1, device=DEVICE))
    assert torch.isfinite(loss[0]) and loss[1:].isnan().all()
    assert torch.equal(tg[1:], torch.zeros(2, device=DEVICE))  # no gradient from a bad label


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scatter", [True, False], ids=["dW-scatter", "dX-gather"])
def test_fold_matches_torch(scatter, dtype):
    """kernels.fold (atomic scatter / gather, no temporaries) equals torch_impl.fold; tokens that
    share a row (repeated targets) sum, and a coefficient of 0 adds nothing (even NaN rows)."""
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
    kernels.fold(got, args[0], src, args[1], coef)
    torch_impl.fold(want, args[0], src.nan_to_num() if scatter else src, args[1], coef)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_scale_in_place(dtype):
    """kernels.scale_ equals torch's in-place multiply (fp32 math, one rounding) over more than
    one block, and with a scale of 1 leaves every bit as it was, NaN included."""
    x = torch.randn(3 * 4096 + 77, device=DEVICE).to(dtype)
    x[5] = float("nan")
    for s in (0.37, 3.0, 1.0):
        scale = torch.tensor([s], device=DEVICE)
        got = kernels.scale_(x.clone(), scale)
        want = x.clone().mul_(scale)
        if s == 1.0:  # bit for bit
            assert torch.equal(got.view(torch.uint8), x.view(torch.uint8))
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scale_into_casts_once(dtype):
    """kernels.scale_into: an fp32 sum times the scale, rounded once (as torch.mul into an out
    of that dtype), every element written (the out is poisoned), a scale of 1 included."""
    x = torch.randn(2, 4096 + 300, device=DEVICE) * 5
    for s in (0.37, 1.0):
        scale = torch.tensor([s], device=DEVICE)
        out = torch.full(x.shape, float("nan"), dtype=dtype, device=DEVICE)
        kernels.scale_into(out, x, scale)
        want = torch.mul(x, scale, out=torch.empty_like(out))
        torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("first", [True, False], ids=["first-block", "later-block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_online_block_matches_torch(dtype, first):
    """Online mode (the low-memory token sweep): running statistics continued over one block of
    the vocabulary, the rescale factor, and exp(u - m) du/dz written over the block."""
    rows, cols, v0, V = 9, 300, 100, 1000
    logits = (torch.randn(rows, cols, device=DEVICE) * 3).to(dtype)
    targets = torch.randint(0, V, (rows,), device=DEVICE)
    targets[:4] = v0 + torch.randint(0, cols, (4,), device=DEVICE)  # some targets in this block
    targets[4] = -100
    stats = torch.stack([torch.randn(rows) * 3, torch.rand(rows) * 50 + 1, torch.randn(rows), torch.randn(rows)], 1)
    if first:
        stats[:, 0], stats[:, 1:] = float("-inf"), 0.0
    opts = dict(OPTS[1], label_smoothing=0.0, z_loss=0.0)
    results = []
    for impl in (kernels, torch_impl):
        out, st = logits.clone(), stats.to(DEVICE).clone()
        alpha, tg, lse = (torch.full((rows,), float("nan"), device=DEVICE) for _ in range(3))
        scale = torch.ones((), device=DEVICE)
        impl.ce_chunk(out, targets, None, lse, scale, tg, compute_lse=True, write_grad=True, stats=st, alpha=alpha,
                      vocab_start=v0, vocab_total=V, **opts)  # fmt: skip
        results.append((out.float(), st, alpha))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(results[0][1:], results[1][1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    if first:
        assert torch.equal(results[0][2], torch.zeros(rows, device=DEVICE))


def test_scale_rows():
    x = torch.randn(5, 5000, device=DEVICE)
    x[1, 7] = float("nan")
    alpha = torch.tensor([0.5, 1.0, 2.0, 1.0, 0.0], device=DEVICE)
    got = kernels.scale_rows_(x.clone(), alpha)
    torch.testing.assert_close(got, x * alpha[:, None], rtol=0, atol=0, equal_nan=True)
