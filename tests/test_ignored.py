"""Ignored tokens cost nothing: the passes run over the counted tokens only (fused_cel.op), and a
call's results are those of its counted tokens alone, bitwise, with 0 at the ignored ones."""

import pytest
import torch

from fused_cel import chunks, linear_cross_entropy, linear_log_probs
from helpers import BACKENDS, DEVICE, LOW, make_inputs

CASES = {
    "mean": dict(),
    "sum_smoothing_zloss_bias": dict(reduction="sum", label_smoothing=0.1, z_loss=1e-3, bias=True),
    "none_softcap": dict(reduction="none", softcap=5.0),
    "none_frozen_weight": dict(reduction="none", frozen_weight=True),
    "mean_class_weight": dict(class_weight=True),
    "mean_chunks": dict(chunk_size=16),
    "mean_low_memory": dict(memory_budget_mib=LOW),
    "none_low_memory_smoothing": dict(reduction="none", memory_budget_mib=LOW, label_smoothing=0.1),
}


def _call(hidden, weight, bias, labels, case, backend, class_weight, grad):
    """Loss and (dX, dW, db) of one call, the per-token grad_output ``grad`` for "none"."""
    opts = {k: v for k, v in case.items() if k not in ("bias", "class_weight", "frozen_weight")}
    x = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_(not case.get("frozen_weight"))
    b = bias.detach().requires_grad_() if case.get("bias") else None
    loss = linear_cross_entropy(x, w, labels, b, class_weight=class_weight, backend=backend, **opts)
    (loss * grad if loss.dim() else loss).sum().backward()
    return loss.detach(), (x.grad, w.grad, None if b is None else b.grad)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_as_the_counted_tokens_alone(backend, case, monkeypatch):
    case = CASES[case]
    N, D, V = 96, 40, 300
    hidden, weight, bias, labels = make_inputs((N,), D, V, ignore_frac=0.5)
    counted = labels != -100
    n = int(counted.sum())
    class_weight = torch.rand(V, device=DEVICE) + 0.5 if case.get("class_weight") else None
    grad = torch.randn(N, device=DEVICE)
    seen = []
    x_rows = chunks.Work.x_rows
    monkeypatch.setattr(chunks.Work, "x_rows", lambda self, a, b: seen.append(b - a) or x_rows(self, a, b))
    loss, grads = _call(hidden, weight, bias, labels, case, backend, class_weight, grad)
    passes = sum(seen)
    alone, alone_grads = _call(
        hidden[counted], weight, bias, labels[counted], case, backend, class_weight, grad[counted]
    )

    # Bitwise, except where the two calls group a sum differently: the low-memory plan's steps
    # are sized from all N tokens, and the class weights' divisor is summed over N or n labels.
    exact = "memory_budget_mib" not in case and "class_weight" not in case
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    if loss.dim():  # "none": each counted token's loss, 0 at the ignored ones
        torch.testing.assert_close(loss[counted], alone, **tol)
        assert torch.equal(loss[~counted], torch.zeros(N - n, device=DEVICE))
    else:
        torch.testing.assert_close(loss, alone, **tol)
    dx, dw, db = grads
    torch.testing.assert_close(dx[counted], alone_grads[0], **tol)
    assert torch.equal(dx[~counted], torch.zeros_like(dx[~counted]))
    for got, want in zip((dw, db), alone_grads[1:]):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, **tol)
    # the passes read only counted tokens' rows (forward, and backward's pass for "none"; the
    # low-memory plan's vocabulary pass once per block of rows)
    assert passes > 0 and passes % n == 0, (passes, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_of_the_counted_tokens_alone(backend):
    """linear_log_probs with every statistic and the entropy's gradient."""
    hidden, weight, bias, labels = make_inputs((2, 40), 24, 300, ignore_frac=0.5)
    flags = dict(entropy=True, top1=True, mean_logit=True, log_sum_sq_probs=True)
    grads, outs = [], []
    for select in (slice(None), labels != -100):
        x = hidden[select].detach().requires_grad_()
        out = linear_log_probs(x, weight, labels[select], backend=backend, **flags)
        (out.log_probs.sum() + 0.1 * out.entropy.sum()).backward()
        outs.append(out)
        grads.append(x.grad)
    counted = labels != -100
    for got, want in zip(outs[0], outs[1]):
        assert torch.equal(got[counted], want)
        assert not got[~counted].any()  # 0 (False) where ignored
    assert torch.equal(grads[0][counted], grads[1]) and not grads[0][~counted].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_the_label_check_every_token_is_computed(backend, monkeypatch):
    """check_labels=False: no count, so no compaction (and no host synchronisation at all)."""
    hidden, weight, bias, labels = make_inputs((64,), 24, 300, ignore_frac=0.5)
    seen = []
    x_rows = chunks.Work.x_rows
    monkeypatch.setattr(chunks.Work, "x_rows", lambda self, a, b: seen.append(b - a) or x_rows(self, a, b))
    results = []
    for check in (True, False):
        seen.clear()
        x = hidden.detach().requires_grad_()
        loss = linear_cross_entropy(x, weight, labels, check_labels=check, backend=backend)
        loss.backward()
        results.append((loss, x.grad, sum(seen)))
    assert results[0][2] == int((labels != -100).sum()) and results[1][2] == 64
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)
