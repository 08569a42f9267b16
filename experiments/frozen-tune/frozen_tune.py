# ruff: noqa: B023  (every closure is timed at once, inside its loop iteration)
"""Tuning probe for the frozen head (no dW) on a GPU: the whole op per chunk size, and the
chunk's dX matmul ([chunk, V] gradient @ W, fp32 out) alone, plain or split over the vocabulary
(K) as a batched matmul whose parts are summed: with few tokens per chunk and a small D the dX
output has few tiles for the GPU's SMs.

    python scripts/frozen_tune.py [--heads gemma2,qwen16k,llama3]

Prints one table; not a benchmark record (that is python -m fused_cel.bench).
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

import fused_cel
from fused_cel import autograd, bench

HEADS = {
    "llama3": (8192, 4096, 128256, None),
    "gemma2": (8192, 2304, 256000, 30.0),
    "qwen16k": (16384, 3584, 152064, None),
}


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=80, return_mode="median")


def split_k_dx(g, w, parts, out):
    """out [n, D] fp32 = g [n, V] @ w [V, D], as `parts` batched matmuls over slices of V, summed."""
    n, V = g.shape
    k = V // parts
    gb = g[:, : parts * k].unflatten(1, (parts, k)).transpose(0, 1)  # [parts, n, k], a view
    wb = w[: parts * k].view(parts, k, -1)
    partial = torch.bmm(gb, wb, out_dtype=torch.float32)
    torch.sum(partial, 0, out=out)
    if parts * k < V:
        torch.addmm(out, g[:, parts * k :], w[parts * k :], out_dtype=torch.float32, out=out)


def frozen_ms(x, w, y, cap, **kw) -> float:
    def loss(a, b, c):
        return fused_cel.linear_cross_entropy(a, b, c, softcap=cap, **kw)

    return timed(lambda: bench.step(loss, x, w, y, weight_grad=False))


def dx_rows(name, x, w, chunk):
    """The dX matmul of one chunk, plain and split-K, on gradient-like values."""
    D, V = x.shape[1], w.shape[0]
    g = torch.softmax((x[:chunk] @ w.t()).float(), -1).bfloat16()
    out = torch.empty(chunk, D, dtype=torch.float32, device="cuda")
    tflops = 2 * chunk * D * V / 1e9
    base = timed(lambda: torch.mm(g, w, out_dtype=torch.float32, out=out))
    rows = [(name, f"dX mm, chunk {chunk}", "", f"{base:.3f} ms", f"{tflops / base:.0f} TFLOP/s")]
    for parts in (2, 4, 8):
        try:
            ms = timed(lambda: split_k_dx(g, w, parts, out))
        except RuntimeError as e:
            rows.append((name, f"dX split-K {parts}, chunk {chunk}", "", "failed", str(e)[:60]))
            continue
        rows.append((name, f"dX split-K {parts}, chunk {chunk}", "", f"{ms:.3f} ms", f"{tflops / ms:.0f} TFLOP/s"))
    return rows


def matmul_rows(name, x, w, y, cap):
    """Per chunk size: the logits matmul, the dX matmul (fp32 out, gradient-like values) and the
    CE kernel (loss, lse and gradient in place), each alone."""
    from fused_cel import kernels

    D, V = x.shape[1], w.shape[0]
    rows = []
    for chunk in (1024, 1280, 1536, 1664, 1792, 2048, 2560, 3072, 3584, 4096, 5248, 6144, 8192):
        xc, tt = x[:chunk], y[:chunk]
        logits = torch.empty(chunk, V, dtype=x.dtype, device="cuda")
        lg = timed(lambda: torch.mm(xc, w.t(), out=logits))
        f32 = dict(dtype=torch.float32, device="cuda")
        loss, lse, tg = (torch.empty(chunk, **f32) for _ in range(3))
        one = torch.ones((), **f32)
        ce = timed(lambda: kernels.ce_chunk(logits, tt, loss, lse, one, tg, compute_lse=True, write_grad=True,
                                            softcap=cap, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                                            logit_scale=1.0))  # fmt: skip
        out = torch.empty(chunk, D, **f32)
        dx = timed(lambda: torch.mm(logits, w, out_dtype=torch.float32, out=out))
        tflops = 2 * chunk * D * V / 1e9
        rows.append((name, f"chunk {chunk}: logits | dX | CE", f"{lg:.3f} | {dx:.3f}", f"{ce:.3f} ms",
                     f"{tflops / lg:.0f} | {tflops / dx:.0f} TFLOP/s"))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="gemma2,qwen16k,llama3")
    ap.add_argument("--shapes", action="store_true", help="time each matmul and the CE kernel per chunk size")
    args = ap.parse_args()
    rows = []
    for name in args.heads.split(","):
        N, D, V, cap = HEADS[name]
        hidden, weight, y = bench.make_inputs(N, D, V, "cuda")
        x, w = hidden.bfloat16(), weight.bfloat16()
        del hidden, weight
        logits = x @ w.t()
        floor = timed(lambda: torch.mm(x, w.t(), out=logits)) + timed(lambda: torch.mm(logits, w))
        logits = None
        auto = autograd.auto_chunk_size(N, V, D, x.device, "triton", False)
        rows.append((name, "floor (logits + dX)", "", f"{floor:.2f} ms", ""))
        for chunk in sorted({1024, 2048, 3072, 4096, 6144, auto}):
            ms = frozen_ms(x, w, y, cap, chunk_size=chunk)
            buf = f"{chunk * V * 2 / 2**20:.0f} MiB buf"
            tag = " (auto)" if chunk == auto else ""
            rows.append((name, f"frozen op, chunk {chunk}{tag}", buf, f"{ms:.2f} ms", f"{ms / floor:.3f}x"))
        for chunk in (1024, 2048, 4096):
            rows += dx_rows(name, x, w, chunk)
        if args.shapes:
            rows += matmul_rows(name, x, w, y, cap)
        torch.cuda.empty_cache()
    for r in rows:
        print(f"{r[0]:8s} | {r[1]:32s} | {r[2]:14s} | {r[3]:10s} | {r[4]}")


if __name__ == "__main__":
    main()
