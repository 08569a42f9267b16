"""The backends: one object each, with the same functions (the chunk kernels, the target fold,
the casts of fp32 sums, the matmuls), so that the loops never ask which one runs.

  torch          the pure-PyTorch twins of the kernels (any device; the readable statement)
  triton         the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1)
  triton_matmul  triton with the opt-in logits matmul that writes softmax statistics
"""

from __future__ import annotations

from .torch import TorchBackend

TORCH = TorchBackend()
try:
    from .triton import TritonBackend
    from .triton_matmul import TritonMatmulBackend
except ImportError:  # no Triton: only the torch backend
    TRITON = TRITON_MATMUL = None
else:
    TRITON, TRITON_MATMUL = TritonBackend(), TritonMatmulBackend()


def get(name: str, x=None, w=None):
    """The backend called ``name`` ("torch" or "triton"); "triton" is the one with the logits
    matmul when it is switched on and usable for the chunk's operands x, w."""
    if name == "torch":
        return TORCH
    if x is not None and TRITON_MATMUL.usable(x, w):
        return TRITON_MATMUL
    return TRITON
