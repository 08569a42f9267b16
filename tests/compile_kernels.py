"""Compile every Triton kernel of fused_cel for a Hopper GPU (sm_90), without a GPU.

Triton's CPU interpreter, which runs the kernels in CI, accepts Python the GPU compiler does not
(a generator expression, say): this compiles each kernel's main specializations through the real
compiler down to a cubin. Run by tests/test_kernels.py in a process of its own, since it needs
TRITON_INTERPRET unset:

    python tests/compile_kernels.py        # prints one line per kernel; exit 1 on a failure
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_cel.kernels import cross_entropy, fold, gradient, logits, online_softmax, scale, shard_stats  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}


class Ptr:
    """A tensor argument: its element type."""

    def __init__(self, dtype, shape=(1,)):
        self.dtype, self.shape = dtype, shape
        self.device = torch.device("cuda")


def signature(fn, args: dict):
    """(signature, constexprs) of a JITFunction for these arguments (every parameter given)."""
    sig, const = {}, {}
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    for name in fn.arg_names:
        value = args[name]
        if isinstance(value, Ptr):
            sig[name] = "*" + DTYPES[value.dtype]
        elif value is None or name in constexprs:
            sig[name], const[(fn.arg_names.index(name),)] = "constexpr", value
        elif isinstance(value, int):
            sig[name] = "i64" if abs(value) >= 2**31 else "i32"
        else:
            sig[name] = "fp32"
    return sig, const


def compile_kernel(kernel, num_warps=4, **args):
    """Apply the kernel's heuristics to ``args``, then compile it for TARGET."""
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        if isinstance(fn, triton.runtime.autotuner.Heuristics):
            args.update({k: v(args) for k, v in fn.values.items()})
        fn = fn.fn
    sig, const = signature(fn, args)
    triton.compile(ASTSource(fn, sig, const), target=TARGET, options=dict(num_warps=num_warps))


def row_args(dtype=torch.bfloat16):
    return dict(logits_ptr=Ptr(dtype), logits_stride=4096, targets_ptr=Ptr(torch.int64), BLOCK_V=4096)


f32 = Ptr(torch.float32)
tiles = Ptr(torch.float32, (3, 1, 1))
CASES = {
    "cross_entropy": [
        dict(scale_ptr=f32, target_grad_ptr=f32, entropy_ptr=None, extras_ptr=None, tile_ptr=None, w_ptr=None,
             softcap=None, label_smoothing=0.0),
        dict(scale_ptr=f32, target_grad_ptr=f32, entropy_ptr=f32, extras_ptr=f32, tile_ptr=None, w_ptr=f32,
             softcap=30.0, label_smoothing=0.1),
        dict(scale_ptr=None, target_grad_ptr=None, entropy_ptr=None, extras_ptr=None, tile_ptr=tiles, w_ptr=None,
             softcap=None, label_smoothing=0.1),
    ],
    "gradient": [
        dict(ent_scale_ptr=None, entropy_ptr=None, w_ptr=None, softcap=None, label_smoothing=0.0),
        dict(ent_scale_ptr=f32, entropy_ptr=f32, w_ptr=f32, softcap=30.0, label_smoothing=0.1),
    ],
    "shard_stats": [
        dict(width=4, tile_ptr=None, w_ptr=None, softcap=None),
        dict(width=8, tile_ptr=None, w_ptr=f32, softcap=30.0),
        dict(width=4, tile_ptr=tiles, w_ptr=None, softcap=None),
    ],
    "online_softmax": [dict(WRITE_P=True, softcap=30.0), dict(WRITE_P=False, softcap=None)],
}  # fmt: skip
COMMON = dict(
    loss_ptr=f32, lse_ptr=f32, scale_stride=0, n_tiles=1, tile_plane=1, w_total_ptr=f32, V=128256,
    ignore_index=-100, z_loss=1e-4, logit_scale=1.0, target_grad_ptr=f32, scale_ptr=f32, vocab_start=0,
    vocab_total=128256, stats_ptr=f32, running_ptr=f32, alpha_ptr=f32, label_smoothing=0.0,
)  # fmt: skip
KERNELS = {
    "cross_entropy": cross_entropy._cross_entropy_kernel,
    "gradient": gradient._gradient_kernel,
    "shard_stats": shard_stats._shard_stats_kernel,
    "online_softmax": online_softmax._online_softmax_kernel,
}


def main() -> int:
    failures = 0
    jobs = [(name, case) for name, cases in CASES.items() for case in cases]
    jobs += [("fold", None), ("scale", None), ("logits", None)]
    for name, case in jobs:
        try:
            if name == "fold":
                compile_kernel(fold._fold_kernel, dst_ptr=f32, dst_stride=4096, dst_index_ptr=Ptr(torch.int64),
                               src_ptr=Ptr(torch.bfloat16), src_stride=4096, src_index_ptr=Ptr(torch.int64),
                               coef_ptr=f32, D=4096, DST_INDEXED=True, BLOCK_D=1024)  # fmt: skip
            elif name == "scale":
                compile_kernel(scale._scale_kernel, num_warps=8, x_ptr=f32, out_ptr=Ptr(torch.bfloat16), scale_ptr=f32,
                               n=4096, x_stride=4096, BLOCK=4096, IN_PLACE=False, ROUND_BF16=False)  # fmt: skip
            elif name == "logits":  # the pointer-load path (TMA descriptors need a GPU to build)
                compile_kernel(logits._logits_kernel, num_warps=8, x=Ptr(torch.bfloat16), w=Ptr(torch.bfloat16),
                               out=Ptr(torch.bfloat16), bias_ptr=None, stats_ptr=f32, M=4096, N=128256, K=4096,
                               n_valid=128256, n_tiles=501, plane=4096 * 501, stride_xm=4096, stride_wn=4096,
                               stride_om=128256, logit_scale=1.0, softcap=None, SUM_U=True, USE_TMA=False,
                               OUT_FP16=False, ROUND_BF16=False, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8,
                               NUM_PROGRAMS=132)  # fmt: skip
            else:
                args = {**COMMON, **row_args(), **case}
                compile_kernel(KERNELS[name], num_warps=8, **args)
            print(f"ok     {name} {case if case is None else sorted(k for k, v in case.items() if v)}")
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit code says it
            failures += 1
            print(f"FAILED {name} {case}: {type(e).__name__}: {str(e)[:2000]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
