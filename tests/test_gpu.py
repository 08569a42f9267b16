"""GPU-only checks: realistic heads, offsets past 2**31, memory, and no host synchronisation."""

import warnings

import pytest
import torch

from fused_cel import linear_cross_entropy, plan
from helpers import make_inputs, rel_err, run_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize(
    "D,V,opts",
    [(2304, 256000, {"softcap": 30.0}), (4096, 128256, {}), (1024, 50257, {"reduction": "none", "shift": True})],
    ids=["gemma2", "llama3", "gpt2-none"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_real_heads(dtype, D, V, opts):
    run_case(make_inputs((2, 300), D, V), dtype, "triton", opts, chunk_size=256)


def test_offsets_beyond_2_31():
    """One chunk of 16400 x 131072 logits (2.15e9 elements): rows past 2**31 must be right."""
    N, D, V = 16400, 32, 131072
    hidden, weight, _, labels = make_inputs((N,), D, V)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    results = []
    for chunk in (N, 1024):  # one chunk past 2**31 elements; chunks far below it
        w = weight.detach().requires_grad_()
        x = hidden.detach().requires_grad_()
        loss = linear_cross_entropy(x, w, labels, reduction="none", chunk_size=chunk)
        loss.backward(torch.ones_like(loss))
        results.append((loss.detach(), x.grad, w.grad))
        del loss, x, w
        torch.cuda.empty_cache()
    big, small = results
    assert N * V > 2**31
    past = slice(2**31 // V, N)  # the rows whose element offsets exceed 2**31
    # Same math, different matmul shapes: equal to rounding (an offset bug gives garbage rows).
    torch.testing.assert_close(big[0], small[0], rtol=1e-4, atol=1e-4)
    assert rel_err(big[1][past], small[1][past]) < 1e-2
    assert rel_err(big[1], small[1]) < 1e-2 and rel_err(big[2], small[2]) < 1e-2
    # and the rows past 2**31 agree with plain PyTorch (fp32 softmax of the same bf16 logits)
    want = torch.nn.functional.cross_entropy((hidden[past] @ weight.T).float(), labels[past], reduction="none")
    torch.testing.assert_close(big[0][past], want, rtol=1e-5, atol=1e-5)


def test_peak_memory_is_chunk_sized():
    """Peak memory beyond inputs and gradients: the chunk buffer and fp32 accumulators only."""
    N, D, V = 8192, 2048, 128256
    hidden, weight, _, labels = make_inputs((N,), D, V)
    x = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(x, w, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - x.grad.nbytes - w.grad.nbytes
    chunk = plan.auto_chunk_size(N, V, D, x.device, "triton", weight_grad=True)
    # fp32 dW and dX accumulators, and the chunk buffer beyond the gradients' own size
    expected = (V * D + N * D) * 4 + max(chunk * V * 2 - x.grad.nbytes - w.grad.nbytes, 0)
    assert extra <= expected + 64 * 2**20, (extra / 2**20, expected / 2**20)
    assert extra < N * V * 2  # well under one bf16 logits tensor, let alone plain PyTorch's


def test_no_host_sync():
    """With check_labels=False, forward and backward never synchronise with the host."""
    hidden, weight, bias, labels = make_inputs((4, 256), 512, 32000)
    x = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    n = (labels != -100).sum()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kwargs in ({}, {"num_items": n}, {"softcap": 30.0, "shift": True, "reduction": "sum"}):
            linear_cross_entropy(x, w, labels, check_labels=False, **kwargs).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("opts", [{}, {"reduction": "none"}, {"memory_budget_mib": 4}], ids=str)
def test_counted_tokens_without_another_sync(opts):
    """Half the labels ignored: forward synchronises once (the label check, which reads their
    count), and nothing else does: not the gathered rows, not backward's pass of "none"."""
    hidden, weight, bias, labels = make_inputs((4, 256), 512, 32000, ignore_frac=0.5)
    x = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss = linear_cross_entropy(x, w, labels, **opts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(c.message) for c in caught if "synchroniz" in str(c.message)]
    assert len(syncs) == 1, syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not x.grad[labels == -100].any()


@pytest.mark.parametrize("D,V", [(4096, 128256), (2304, 256000)], ids=["llama3", "gemma2"])
def test_low_memory_plan_stays_in_budget(D, V):
    """memory_budget_mib=64 at Llama 3's and Gemma 2's heads: at most 64 MiB beyond inputs and
    gradients (measured after a warm-up call, so cuBLAS's workspace is not counted)."""
    N, budget = 8192, 64
    hidden, weight, _, labels = make_inputs((N,), D, V)
    x = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    linear_cross_entropy(x, w, labels, memory_budget_mib=budget).backward()
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(x, w, labels, memory_budget_mib=budget).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - x.grad.nbytes - w.grad.nbytes
    assert extra <= budget * 2**20, extra / 2**20


@pytest.mark.parametrize(
    "D,V,opts",
    [(2304, 256000, {"softcap": 30.0}), (4096, 128256, {"label_smoothing": 0.1}), (1024, 50257, {"reduction": "none"})],
    ids=["gemma2", "llama3", "gpt2-none"],
)
def test_low_memory_plan_real_heads(D, V, opts):
    run_case(make_inputs((2, 300), D, V), torch.bfloat16, "triton", {**opts, "memory_budget_mib": 8}, grad_scale=4.0)


def test_low_memory_plan_no_host_sync():
    hidden, weight, _, labels = make_inputs((4, 256), 512, 32000)
    x = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        linear_cross_entropy(x, w, labels, check_labels=False, memory_budget_mib=4).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
