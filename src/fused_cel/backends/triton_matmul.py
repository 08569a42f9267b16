"""The Triton backend with the opt-in logits matmul (FUSED_CEL_MATMUL=triton, kernels/logits.py):
when the loss is computed its epilogue writes per-tile softmax statistics beside the logits, and
the cross-entropy kernel reads each row once instead of twice."""

from __future__ import annotations

from ..kernels import logits as logits_kernel
from .triton import TritonBackend


class TritonMatmulBackend(TritonBackend):
    name = "triton_matmul"
    tile_stats = True
    n_tiles = staticmethod(logits_kernel.n_tiles)  # column tiles with statistics, for a vocabulary
    usable = staticmethod(logits_kernel.usable)

    def logits(self, x, w, b, out, stats=None, *, n_valid=None, opts=None) -> None:
        if stats is None:  # no loss wanted (a gradient pass): cuBLAS
            return super().logits(x, w, b, out)
        logits_kernel.logits_stats(x, w, b, out, stats, n_valid=n_valid, logit_scale=opts.logit_scale,
                                   softcap=opts.softcap, sum_u=stats.shape[0] == 3)  # fmt: skip
