"""The Triton backend: the kernels of fused_cel.kernels in place of their torch twins.

The matmuls stay cuBLAS's (inherited). The target fold falls back to the twin (index_add_) when
deterministic algorithms are requested, since the kernel's scatter adds atomically, and for rows
of non-unit column stride. The casts of fp32 sums go through kernels.scale unless the tensor is a
fake or functional one (traced for a compiled graph), which a kernel cannot take.
"""

from __future__ import annotations

import torch

from ..kernels import cross_entropy, fold, gradient, online_softmax, scale, shard_stats
from . import torch as twin


class TritonBackend(twin.TorchBackend):
    name = "triton"

    cross_entropy = staticmethod(cross_entropy.cross_entropy)
    gradient = staticmethod(gradient.gradient)
    shard_stats = staticmethod(shard_stats.shard_stats)
    online_softmax = staticmethod(online_softmax.online_softmax)

    def fold_makes_temporaries(self) -> bool:
        return torch.are_deterministic_algorithms_enabled()

    def fold(self, dst, dst_index, src, src_index, coef) -> None:
        if self.fold_makes_temporaries() or src.stride(1) != 1 or dst.stride(1) != 1:
            return twin.fold(dst, dst_index, src, src_index, coef)
        fold.fold(dst, dst_index, src, src_index, coef)

    def scale_into(self, out, src, scale_by) -> None:
        if scale_by.numel() == 1 and type(src) is torch.Tensor:
            scale.scale_into(out, src, scale_by.reshape(1).float())
        else:
            twin.scale_into(out, src, scale_by)

    def scale_(self, x, scale_by):
        if scale_by.numel() == 1:
            return scale.scale_(x, scale_by.reshape(1).float())
        return twin.scale_(x, scale_by)

    scale_rows_ = staticmethod(scale.scale_rows_)
