# ruff: noqa: B023  (every closure is timed at once, inside its loop iteration)
"""Tuning probe for the low-memory plan on a GPU: its two passes timed apart, for several step
shapes, and the planner's choice end to end (time and peak working memory).

    python scripts/lowmem_tune.py [--budget 64] [--shapes llama3,gemma2,mistral]

Prints one table; not a benchmark record (that is python -m fused_cel.bench).
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from fused_cel import autograd, budget, linear_cross_entropy

SHAPES = {"llama3": (4096, 128256, None), "gemma2": (2304, 256000, 30.0), "mistral": (4096, 32768, None)}
N = 8192


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def inputs(D, V):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    w = (torch.randn(V, D, device="cuda", generator=g) * (2.0 / D**0.5)).bfloat16()
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    return x, w, y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=64.0)
    ap.add_argument("--shapes", default="llama3,gemma2,mistral")
    args = ap.parse_args()
    rows = []
    for name in args.shapes.split(","):
        D, V, cap = SHAPES[name]
        x, w, y = inputs(D, V)
        opts = autograd.Options(backend="triton", softcap=cap)
        f32 = dict(dtype=torch.float32, device="cuda")
        loss, lse, ones = torch.empty(N, **f32), torch.empty(N, **f32), torch.ones((), **f32)
        dx = torch.empty(N, D, dtype=torch.bfloat16, device="cuda")
        floor = bench(lambda: torch.mm(x, w.t())) * 3  # ~ the three matmuls
        chosen = autograd._plan(
            autograd.Options(backend="triton", softcap=cap, memory_budget=args.budget * 2**20),
            x,
            w,
            (torch.bfloat16,) * 3,
            (True, True, False),
        )
        rows.append((name, "planner", str(chosen), "", ""))
        for tokens in (512, 1024, 2048, 4096):
            for cols in (2048, 4096, 8192, 16384):
                mib = (tokens * cols * 2 + tokens * D * 4) / 2**20
                if mib > 4 * args.budget:
                    continue
                plan = budget.Plan(chunk=tokens, low_memory=True, block_vocab=cols)
                ms = bench(
                    lambda: autograd.run_token_blocks(
                        x, w, None, y, opts, plan, loss=loss, lse=lse, grad_scale=ones, dx=dx
                    )
                )
                rows.append((name, "token sweep", f"T={tokens} Vb={cols}", f"{mib:.0f} MiB", f"{ms:.2f} ms"))
        old = budget.Plan(chunk=max(16, int(args.budget * 2**20 * 0.9 / (V * 2 + D * 4)) // 16 * 16), low_memory=True)
        ms = bench(lambda: autograd.run_chunks(x, w, None, y, autograd._with_plan(opts, old), loss=loss, lse=lse,
                                               grad_scale=ones, dx=dx, pad=False))  # fmt: skip
        rows.append((name, "whole rows", f"chunk={old.chunk}", "", f"{ms:.2f} ms"))
        dw = torch.empty_like(w)
        for block_rows in (1024, 2048, 4096):
            plan = budget.Plan(chunk=1, low_memory=True, block_rows=block_rows, block_tokens=N)
            ms = bench(
                lambda: autograd.run_vocab_blocks(
                    x, w, None, y, opts, plan, lse=lse, grad_scale=ones, dw=dw, db=None, out_scale=None
                )
            )
            mib = (N * block_rows * 2 + block_rows * D * 4) / 2**20
            rows.append((name, "vocab pass", f"rows={block_rows}", f"{mib:.0f} MiB", f"{ms:.2f} ms"))
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

        def step():
            linear_cross_entropy(xg, wg, y, softcap=cap, memory_budget_mib=args.budget, check_labels=False).backward()
            xg.grad = wg.grad = None

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        linear_cross_entropy(xg, wg, y, softcap=cap, memory_budget_mib=args.budget, check_labels=False).backward()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base - xg.grad.nbytes - wg.grad.nbytes) / 2**20
        xg.grad = wg.grad = None
        ms = bench(step)
        rows.append((name, "fwd+bwd", f"budget {args.budget:g} MiB", f"{extra:.0f} MiB", f"{ms:.2f} ms"))
        rows.append((name, "floor", "3 x mm", "", f"{floor:.2f} ms ({ms / floor:.2f}x)"))
    for r in rows:
        print(" | ".join(f"{c:<14}" if i < 2 else f"{c}" for i, c in enumerate(r)))


if __name__ == "__main__":
    main()
