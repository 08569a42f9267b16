"""The logits matmul with softmax statistics (fused_cel/kernels/logits.py) against torch, and the
chunk loop through it (backends.triton_matmul) against the chunk loop through cuBLAS / torch.mm.

On CUDA (Hopper) the kernel loads through TMA; on the CPU it runs in Triton's interpreter with
pointer loads. Outputs are poisoned with NaN first, so anything left unwritten fails.
"""

import pytest
import torch

import fused_cel
from fused_cel.backends import torch as twin
from fused_cel.options import Options
from helpers import BACKENDS, DEVICE, rel_err, spy_calls

if "triton" not in BACKENDS:
    pytest.skip("Triton cannot run here", allow_module_level=True)

from fused_cel import backends  # noqa: E402
from fused_cel.kernels import logits as matmul  # noqa: E402

NAN = float("nan")


def logits_and_stats(x, w, b, n_valid, sum_u, **opts):
    M, N = x.shape[0], w.shape[0]
    out = torch.full((M, N), NAN, dtype=x.dtype, device=DEVICE)
    stats = torch.full((2 + sum_u, M, matmul.n_tiles(n_valid)), NAN, device=DEVICE)
    matmul.logits_stats(x, w, b, out, stats, n_valid=n_valid, sum_u=sum_u, **opts)
    return out, stats


# (tokens, vocabulary columns, hidden, columns with statistics): partial row and column tiles,
# a padded vocabulary (n_valid < columns), a K that is not a multiple of the reduction step.
SHAPES = [(130, 600, 72, 600), (5, 320, 64, 300), (1, 256, 40, 256), (257, 1100, 136, 1037)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "opts",
    [dict(logit_scale=1.0, softcap=None), dict(logit_scale=0.7, softcap=5.0), dict(logit_scale=-1.3, softcap=None)],
    ids=["plain", "scale-softcap", "negative-scale"],
)
@pytest.mark.parametrize("bias", [False, True])
def test_logits_stats_matches_torch(shape, dtype, opts, bias):
    M, N, K, n_valid = shape
    x = (torch.randn(M, K, device=DEVICE) * 0.5).to(dtype)
    w = torch.randn(N, K, device=DEVICE).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    out, stats = logits_and_stats(x, w, b, n_valid, sum_u=True, **opts)
    # The logits: fp32 accumulation rounded once, as torch.mm's (error vs fp64 no larger).
    ref = x.double() @ w.double().T + (b.double() if bias else 0.0)
    plain = (x.float() @ w.float().T + (b.float() if bias else 0.0)).to(dtype).double()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= rel_err(plain, ref) * 1.1 + 1e-6
    # The statistics: those of the logits as stored.
    want = twin.logits_tile_stats(out, n_valid, matmul.BN, opts["logit_scale"], opts["softcap"])
    torch.testing.assert_close(stats[0], want[0], rtol=0, atol=1e-5 * want[0].abs().max().item())
    torch.testing.assert_close(stats[1], want[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(stats[2], want[2], rtol=1e-5, atol=1e-4 * want[2].abs().max().item())
    # Without the sum plane: the same max and sum of exp.
    out2, stats2 = logits_and_stats(x, w, b, n_valid, sum_u=False, **opts)
    assert torch.equal(out2, out) and torch.equal(stats2, stats[:2])


def test_logits_stats_rejects_a_wrong_stats_shape():
    x, w = torch.randn(4, 16, device=DEVICE).bfloat16(), torch.randn(300, 16, device=DEVICE).bfloat16()
    out = torch.empty(4, 300, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        matmul.logits_stats(x, w, None, out, torch.empty(2, 4, 1, device=DEVICE), n_valid=300, logit_scale=1.0,
                            softcap=None, sum_u=False)  # fmt: skip


@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.2, z_loss=1e-3, softcap=4.0, logit_scale=0.8)],
                         ids=["plain", "all-options"])  # fmt: skip
def test_cross_entropy_with_tile_stats_equals_two_passes(opts):
    kw = Options(**opts)
    rows, V = 37, 1500
    logits = (torch.randn(rows, V, device=DEVICE) * 3).bfloat16()
    logits[:, 1234] += 12  # the max in a late tile
    targets = torch.randint(0, V, (rows,), device=DEVICE)
    targets[3] = -100
    stats = twin.logits_tile_stats(logits, V, matmul.BN, kw.logit_scale, kw.softcap).contiguous()
    results = []
    for tile in (None, stats):
        z = logits.clone()
        loss, lse, tg = (torch.full((rows,), NAN, device=DEVICE) for _ in range(3))
        scale = torch.full((1,), 0.5, device=DEVICE)
        backends.TRITON.cross_entropy(z, targets, loss, lse, kw, scale=scale, target_grad=tg, tile_stats=tile)
        results.append((z, loss, lse, tg))
    for name, got, want in zip(("grad", "loss", "lse", "target grad"), results[1], results[0]):
        assert torch.isfinite(got).all(), name
        if name == "grad":  # bf16: the merged lse differs in its last fp32 bits, so a rounding may
            # land one bf16 step apart, rarely
            assert (got != want).float().mean() < 1e-3, name
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-6, atol=2e-6, msg=name)


def test_usable_follows_the_switch(monkeypatch):
    x = torch.randn(4, 16, device=DEVICE).bfloat16()
    for off in ("cublas", "auto"):
        monkeypatch.setenv("FUSED_CEL_MATMUL", off)
        assert not matmul.usable(x, x)
    monkeypatch.setenv("FUSED_CEL_MATMUL", "triton")
    assert matmul.usable(x, x)
    assert not matmul.usable(x.float(), x.float())  # fp32 logits stay with cuBLAS


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_loop_through_the_matmul(monkeypatch, bias, reduction):
    """The whole op with the logits from the Triton matmul equals the op through cuBLAS / torch.mm
    (to rounding: the logits may differ in their last bit), and the matmul did run."""
    N, D, V = 300, 64, 777  # V not a multiple of 64: the padded W
    hidden = (torch.randn(N, D, device=DEVICE) * 0.5).bfloat16()
    weight = torch.randn(V, D, device=DEVICE).bfloat16()
    b = torch.randn(V, device=DEVICE).bfloat16() if bias else None
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[::7] = -100
    opts = dict(backend="triton", reduction=reduction, chunk_size=128, label_smoothing=0.1, z_loss=1e-4, softcap=8.0)
    calls = spy_calls(monkeypatch, matmul, "logits_stats", lambda args, kwargs: 1)
    results, grad = {}, torch.randn(N, device=DEVICE) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    for route in ("cublas", "triton"):
        monkeypatch.setenv("FUSED_CEL_MATMUL", route)
        inputs = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
        loss = fused_cel.linear_cross_entropy(*inputs[:2], labels, bias=inputs[2] if bias else None, **opts)
        loss.backward(grad)
        results[route] = [loss.detach()] + [t.grad for t in inputs]
    assert len(calls) == 3  # 3 chunks, in forward (reduction "none": backward reuses the lse)
    for got, want in zip(results["triton"], results["cublas"]):
        assert rel_err(got, want) < 1e-2
