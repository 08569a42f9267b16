"""Shared test helpers. Without CUDA, the Triton kernel runs on CPU tensors through Triton's
interpreter: TRITON_INTERPRET must be set before Triton is first imported, hence here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The chunk's logits through the opt-in Triton matmul with statistics (fused_cel.matmul), so
    # that every Triton-backend test covers it here; test_matmul also runs the torch.mm route,
    # and the GPU runs the default (cuBLAS) route.
    os.environ.setdefault("FUSED_CEL_MATMUL", "triton")

import math  # noqa: E402

import pytest  # noqa: E402

import fused_cel  # noqa: E402
from fused_cel import autograd  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch"] + (["triton"] if fused_cel.triton_available(DEVICE) else [])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (NaN if got has NaN)."""
    got, ref = got.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (got - ref).norm().item()
    return diff / denom if denom > 0 else diff


# Floor under the baseline-relative tolerance: what is left when both errors are pure noise.
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-5, torch.float16: 2e-6}


def assert_close_to_baseline(name, ours, base, ref, dtype, n_tokens):
    """Our error vs the fp64 reference is at most plain PyTorch's (same dtype) plus small slack.

    Two equally good computations differ in measured RMS error by about 1/sqrt(2n) for n
    independent error terms. In gradients the error is dominated by a few large entries of each
    token's dlogits (the target and the likeliest classes), so n is about 4 per token, not the
    number of elements. A scalar (a mean loss) has one random error, as likely near 0 for plain
    PyTorch as for us: there the floor is its expected size, eps / 2 / sqrt(tokens).
    """
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    e_ours, e_base = rel_err(ours, ref), rel_err(base, ref)
    slack = 0.1 + 3.0 / math.sqrt(max(min(ref.numel(), 4 * n_tokens), 1))
    floor = FLOOR[dtype]
    if ref.numel() == 1:
        floor = max(floor, torch.finfo(dtype).eps / 2 / math.sqrt(max(n_tokens, 1)))
    tol = e_base * (1.0 + slack) + floor
    assert e_ours <= tol, f"{name}: error {e_ours:.3e} > {tol:.3e} (plain PyTorch {e_base:.3e})"


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run; the seed is printed on failure so a run can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")
    yield seed


def spy_calls(monkeypatch, name, record, module=autograd):
    """Replace module.<name> with a wrapper that appends record(args, kwargs) per call."""
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(record(args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def grads_written(args, kwargs):
    """spy_calls record of run_chunks: which of dX, dW, db the call writes."""
    return tuple(kwargs.get(k) is not None for k in ("dx", "dw", "db"))
