"""python -m fused_cel.demo: fused_cel next to stock PyTorch / transformers.

    python -m fused_cel.demo            train a small Llama-architecture model on the bundled text,
                                        stock vs fused_cel.patch: loss agreement, peak memory,
                                        tokens/s, and a loss-curve PNG (python -m fused_cel.demo -h)
    python -m fused_cel.demo head       one LM head, plain PyTorch vs fused_cel (below)

The head demo computes the mean next-token loss and the gradients of hidden and weight with plain PyTorch
(F.linear, upcast to fp32, F.cross_entropy: what Hugging Face models do) and with fused_cel, and
prints side by side: time of forward + backward, peak memory beyond the inputs and the gradients,
and the error of loss and gradients against a float64 reference. On a GPU the default shape is
Llama 3 8B's head (8192 tokens, D=4096, V=128256, bf16); on the CPU a scaled-down head.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

import fused_cel

from . import train_demo
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


def _cpu_measure(name, shape, dtype):
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
    return ms, max(extra, 0.0), loss, dx, dw


def measure_cpu(name, shape, dtype):
    """CPU: each method in a fresh process, peak = growth of its resident set (coarser)."""
    result = train_demo.run_in_process(_cpu_measure, name, shape, dtype)
    if isinstance(result, dict):
        raise RuntimeError(f"the {name} measurement failed: {result}")
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["head"]:
        return head_main(argv[1:])
    return train_main(argv)


def train_main(argv):
    ap = argparse.ArgumentParser(prog="python -m fused_cel.demo", description=train_demo.__doc__)
    ap.add_argument("--size", choices=train_demo.SIZES, help="model shape, random init (CPU default: a small body "
                    "with Llama 3's 128256-word vocabulary, where the logits dominate memory; GPU: tiny)")  # fmt: skip
    ap.add_argument("--methods", default="stock,fused_cel", help=f"comma list of {', '.join(train_demo.METHODS)}")
    ap.add_argument("--steps", type=int, help="default 30 on the CPU, 200 on a GPU")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default 512 on the CPU, 128 on a GPU)")
    ap.add_argument("--batch", type=int, help="sequences per step (default 2 on the CPU, 8 on a GPU)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dtype", choices=DTYPES, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--plot", default="demo-loss.png", help="loss-curve PNG ('' for none)")
    ap.add_argument("--longest", type=int, default=0, help="also find the longest sequence (<= this) that trains")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(train_demo.METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; valid: {', '.join(train_demo.METHODS)}")
    device = torch.device(_device(args.device))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cpu = device.type == "cpu"
    defaults = (
        dict(size="tiny-llama3-vocab", steps=30, seq=512, batch=2)
        if cpu
        else dict(size="tiny", steps=200, seq=128, batch=8)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"fused_cel {fused_cel.__version__} training demo on {where}: {args.size} Llama, {dtype}, "
        f"{args.batch} x {args.seq} tokens a step, {args.steps} steps"
    )
    common = dict(size=args.size, dtype=dtype, device=device, batch=args.batch, lr=args.lr)
    results = {m: train_demo.run_isolated(m, seq=args.seq, steps=args.steps, **common) for m in methods}
    stock = results.get("stock", {}).get("losses")
    mem = "peak MiB" if device.type == "cuda" else "peak RSS growth MiB"
    print(f"\n{'method':<11}{'first loss':>11}{'final loss':>11}{'max |diff| vs stock':>21}{'tokens/s':>11}{mem:>21}")
    for m, r in results.items():
        if "losses" not in r:
            print(f"{m:<11} {r}")
            continue
        diff = max(abs(a - b) for a, b in zip(r["losses"], stock)) if stock else float("nan")
        print(
            f"{m:<11}{r['losses'][0]:>11.5f}{r['losses'][-1]:>11.5f}{diff:>21.2e}"
            f"{r['tokens_per_s']:>11.0f}{r['peak_mib']:>21.0f}"
        )
    fused = results.get("fused_cel", {})
    if stock and "losses" in fused:  # what this run measured, in one sentence
        diff = max(abs(a - b) for a, b in zip(fused["losses"], stock))
        base = results["stock"]
        memory = f"peak memory {fused['peak_mib']:.0f} vs {base['peak_mib']:.0f} MiB"
        if base["peak_mib"] > 0:  # (a run too short to grow the resident set measures 0)
            saved = 100 * (1 - fused["peak_mib"] / base["peak_mib"])
            memory += f" ({abs(saved):.0f}% {'less' if saved >= 0 else 'more'})"
        print(
            f"\nfused_cel against stock: losses equal to {diff:.1e} at every one of {len(stock)} steps; {memory}; "
            f"{fused['tokens_per_s'] / base['tokens_per_s']:.2f}x stock's tokens/s on this {where}"
        )
    if args.plot:
        train_demo.plot(results, args.plot)
        print(f"loss curves: {args.plot}")
    if args.longest:
        for m in methods:
            n = train_demo.longest_sequence(m, args.seq, args.longest, **{**common, "batch": 1})
            print(f"longest sequence {m} trains (batch 1, doubling from {args.seq}): {n or 'none'}")
    return results


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def head_main(argv):
    ap = argparse.ArgumentParser(
        prog="python -m fused_cel.demo head", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, help="N (default: 8192 on GPU, 1024 on CPU)")
    ap.add_argument("--hidden", type=int, help="D (default: 4096 on GPU, 512 on CPU)")
    ap.add_argument("--vocab", type=int, help="V (default: 128256 on GPU, 16384 on CPU)")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = ap.parse_args(argv)

    device = _device(args.device)
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
