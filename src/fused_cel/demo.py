"""python -m fused_cel.demo: fused_cel next to plain PyTorch on one LM-head shape.

Computes the mean next-token loss and the gradients of hidden and weight with plain PyTorch
(F.linear, upcast to fp32, F.cross_entropy: what Hugging Face models do) and with fused_cel, and
prints side by side: time of forward + backward, peak memory beyond the inputs and the gradients,
and the error of loss and gradients against a float64 reference. On a GPU the default shape is
Llama 3 8B's head (8192 tokens, D=4096, V=128256, bf16); on the CPU a scaled-down head.
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import resource
import time

import torch

import fused_cel

from .bench import DTYPES, make_inputs, plain_loss, reference, rel_err, step, time_gpu

GPU_SHAPE = (8192, 4096, 128256)
CPU_SHAPE = (1024, 512, 16384)


def fused_loss(hidden, weight, labels, chunk_size=None):
    return fused_cel.linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)


def measure_gpu(loss_fn, hidden, weight, labels, dtype):
    """(median ms, peak MiB beyond inputs and gradients, loss, dX, dW) on the GPU."""
    x, w = hidden.to(dtype), weight.to(dtype)
    ms = time_gpu(lambda: step(loss_fn, x, w, labels))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, dx, dw = step(loss_fn, x, w, labels)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - dx.nbytes - dw.nbytes
    return ms, extra / 2**20, loss, dx, dw


def _cpu_child(name, shape, dtype, conn):
    hidden, weight, labels = make_inputs(*shape, "cpu")
    x, w = hidden.to(dtype), weight.to(dtype)
    loss_fn = plain_loss if name == "plain" else fused_loss
    step(loss_fn, x[:64], w, labels[:64])  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss, dx, dw = step(loss_fn, x, w, labels)
    ms = (time.perf_counter() - t0) * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    extra = max(peak - before, 0) / 1024 - (dx.nbytes + dw.nbytes) / 2**20
    # Plain pickle copies the tensors' bytes; Connection.send would share them through files
    # that vanish when this process exits.
    conn.send_bytes(pickle.dumps((ms, max(extra, 0.0), loss, dx, dw)))


def measure_cpu(name, shape, dtype):
    """CPU: each method in a fresh process, peak = growth of its resident set (coarser)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_cpu_child, args=(name, shape, dtype, child))
    p.start()
    result = pickle.loads(parent.recv_bytes())
    p.join()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, help="N (default: 8192 on GPU, 1024 on CPU)")
    ap.add_argument("--hidden", type=int, help="D (default: 4096 on GPU, 512 on CPU)")
    ap.add_argument("--vocab", type=int, help="V (default: 128256 on GPU, 16384 on CPU)")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = ap.parse_args(argv)

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    default = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    shape = tuple(a or b for a, b in zip((args.tokens, args.hidden, args.vocab), default))
    dtype = DTYPES[args.dtype]
    n, d, v = shape
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"fused_cel {fused_cel.__version__} demo on {where}: N={n} tokens, D={d}, V={v}, {args.dtype}")
    print(f"the full logits tensor would be {n * v * dtype.itemsize / 2**20:.0f} MiB in {args.dtype}")

    rows = {}
    hidden, weight, labels = make_inputs(*shape, device)
    for name, fn in (("plain PyTorch", plain_loss), ("fused_cel", fused_loss)):
        if device == "cuda":
            rows[name] = measure_gpu(fn, hidden, weight, labels, dtype)
            torch.cuda.empty_cache()
        else:
            rows[name] = measure_cpu("plain" if fn is plain_loss else "fused", shape, dtype)
    ref_loss, ref_dx, ref_dw = reference(hidden, weight, labels)

    mem = "peak extra MiB" if device == "cuda" else "peak RSS growth MiB"
    print(f"\n{'method':<15}{'fwd+bwd ms':>12}{mem:>22}{'loss':>12}{'loss err':>11}{'dX err':>11}{'dW err':>11}")
    for name, (ms, extra, loss, dx, dw) in rows.items():
        print(
            f"{name:<15}{ms:>12.2f}{extra:>22.0f}{loss.item():>12.6f}"
            f"{rel_err(loss, ref_loss):>11.2e}{rel_err(dx, ref_dx):>11.2e}{rel_err(dw, ref_dw):>11.2e}"
        )
    print("errors: ||ours - fp64|| / ||fp64|| against a float64 reference")


if __name__ == "__main__":
    main()
