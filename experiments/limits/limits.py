# ruff: noqa: B023  (every closure is timed at once, inside its loop iteration)
"""How close a design built on cuBLAS matmuls can come to issue 3's targets (GPU).

For each head, timed in one run (forward + backward, bf16):
  floor       the 3 matmuls (2 frozen, 4 for the low-memory plans' recompute) at full size
  fused_cel   the op as shipped: default, frozen weight, memory_budget_mib=64
  skeleton    the same call with the cross-entropy kernel and the target fold replaced by
              no-ops. Meant as a bound on any CE kernel, it is not one: its dX and dW matmuls
              multiply raw logits instead of gradients, and cuBLAS's speed depends on the values
              (on the H100 it was slower than the op itself at Llama 3's head)
  ce min      one read and one write of the N x V logits at the copy bandwidth measured here:
              the least a separate CE pass can cost
  bf16 sum    the chunk loop with chunks small enough for a quarter of torch.compile's memory
              (compile holds the N x V logits in bf16) and dW summed in bf16 (no fp32 V x D
              accumulator: what a plan needs to get under that memory), also at 2 chunks
and the dW error of plain PyTorch, fused_cel, Liger and those bf16 sums against float64 at the
full shape.

    python scripts/limits.py [--heads llama3,gemma2,qwen16k] [--csv limits.csv]
"""

from __future__ import annotations

import argparse
import contextlib
import csv

import torch

import fused_cel
from fused_cel import autograd, bench

HEADS = {  # name: (N, D, V, softcap)
    "llama3": (8192, 4096, 128256, None),
    "gemma2": (8192, 2304, 256000, 30.0),
    "qwen16k": (16384, 3584, 152064, None),
}
DEVICE = torch.device("cuda")


def timed(fn) -> float:
    return bench.time_gpu(fn, warmup=3, reps=10)


def peak_mib(fn, keep: int = 0) -> float:
    """Peak allocation of fn() beyond what was allocated before it, less ``keep`` bytes (its outputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before - keep) / 2**20


def _noop(*args, **kwargs):
    return None


@contextlib.contextmanager
def ops(ce_chunk, fold):
    """fused_cel.autograd with this (ce_chunk, fold) pair on every backend."""
    real = autograd._ops
    autograd._ops = lambda backend: (ce_chunk, fold)
    try:
        yield
    finally:
        autograd._ops = real


def skeleton():
    """fused_cel with no cross-entropy work: its CE kernel and target fold do nothing."""
    return ops(_noop, _noop)


def bf16_sum(x, w, y, cap, chunk, ce=True):
    """The chunk loop writing dX (rounded per chunk) and dW summed in bf16, chunk by chunk: the
    gradient is prescaled by 1/count in the buffer (grad_out = 1, the mean) and its target entries
    are written into it in bf16 (as plain PyTorch and Liger have them), so no fold is needed and
    each chunk's dW is one cuBLAS addmm into the bf16 dW. ce=False: no CE work. Returns (dx, dw)."""
    N = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    loss, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    scale = 1.0 / (y != -100).sum().clamp(min=1).float()
    dx, dw = torch.empty_like(x), torch.empty_like(w)
    opts = autograd.Options(backend="triton", softcap=cap, chunk_size=chunk)
    ce_chunk = autograd._ops("triton")[0]

    def ce_with_targets(logits, targets, loss, lse, grad_scale, target_grad, **kw):
        ce_chunk(logits, targets, loss, lse, grad_scale, target_grad, **kw)
        column = targets.clamp(0, logits.shape[1] - 1).long()[:, None]  # ignored rows: all 0, tg 0
        logits.scatter_(1, column, target_grad[:, None].to(logits.dtype))

    with ops(ce_with_targets if ce else _noop, _noop):
        autograd.run_chunks(x, w, None, y, opts, loss=loss, lse=lse, grad_scale=scale, dx=dx, dw=dw)
    return dx, dw


def copy_gbps() -> float:
    a = torch.empty(2**30, dtype=torch.bfloat16, device=DEVICE)
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a))
    return 2 * a.nbytes / ms / 1e6


def floors(x, w, y):
    """(3-matmul, frozen 2-matmul, 4-matmul) floors as the bench times them (dX and dW multiply
    the logits), and the 3-matmul floor with dX and dW multiplying the real gradient (softmax
    minus one-hot, over the count, in bf16): cuBLAS's speed depends on the values."""
    logits = x @ w.t()
    dx, dw = torch.empty_like(x), torch.empty_like(w)
    mm = {
        "logits": timed(lambda: torch.mm(x, w.t(), out=logits)),
        "dx": timed(lambda: torch.mm(logits, w, out=dx)),
        "dw": timed(lambda: torch.mm(logits.t(), x, out=dw)),
    }
    g = torch.softmax(logits.float(), -1)
    valid = y != -100
    g[valid.nonzero()[:, 0], y[valid]] -= 1.0
    g[~valid] = 0.0
    grad = (g / valid.sum()).bfloat16()
    g = None
    on_grad = timed(lambda: torch.mm(grad, w, out=dx)) + timed(lambda: torch.mm(grad.t(), x, out=dw))
    floor3 = mm["logits"] + mm["dx"] + mm["dw"]
    return floor3, mm["logits"] + mm["dx"], floor3 + mm["logits"], mm["logits"] + on_grad


def run_head(name, gbps, rows, errors):
    N, D, V, cap = HEADS[name]
    hidden, weight, y = bench.make_inputs(N, D, V, DEVICE)
    x, w = hidden.bfloat16(), weight.bfloat16()
    del hidden, weight
    floor3, floor2, floor4, floor_on_grad = floors(x, w, y)
    quarter = N * V * 2 / 4  # a quarter of torch.compile's extra memory (its bf16 N x V logits)
    row = dict(head=name, N=N, D=D, V=V, floor_ms=floor3, frozen_floor_ms=floor2, four_mm_floor_ms=floor4,
               floor_on_grad_ms=floor_on_grad,
               ce_min_ms=2 * N * V * 2 / gbps / 1e6, quarter_compile_mib=quarter / 2**20)  # fmt: skip

    def op(**kw):
        return lambda a, b, c: fused_cel.linear_cross_entropy(a, b, c, softcap=cap, **kw)

    for label, kw, train in (("default", {}, True), ("frozen", {}, False), ("64mib", dict(memory_budget_mib=64), True)):
        fn = op(**kw)

        def run():
            return bench.step(fn, x, w, y, weight_grad=train)

        row[f"{label}_ms"] = timed(run)
        row[f"{label}_mib"] = peak_mib(run, keep=x.nbytes + (w.nbytes if train else 0))
        with skeleton():
            row[f"{label}_skeleton_ms"] = timed(run)
    # A quarter of compile's memory: the chunk buffer (and a few per-token numbers) must fit in it.
    chunk = int(quarter * 0.95 / (V * 2)) // 128 * 128
    row["bf16_chunk"] = chunk
    row["bf16_sum_ms"] = timed(lambda: bf16_sum(x, w, y, cap, chunk))
    row["bf16_sum_skeleton_ms"] = timed(lambda: bf16_sum(x, w, y, cap, chunk, ce=False))
    row["bf16_sum_mib"] = peak_mib(lambda: bf16_sum(x, w, y, cap, chunk), keep=x.nbytes + w.nbytes)
    row["bf16_sum2_ms"] = timed(lambda: bf16_sum(x, w, y, cap, N // 2))
    rows.append(row)

    # dW (and dX) errors against float64 at the full shape.
    torch.cuda.empty_cache()
    ref = bench.reference(x, w, y, chunk=1024, softcap=cap)
    got = {
        "plain": bench.step(lambda a, b, c: bench.plain_loss(a, b, c, cap), x, w, y)[1:],
        "fused_cel": bench.step(op(), x, w, y)[1:],
        f"bf16 sum, {-(-N // chunk)} chunks": bf16_sum(x, w, y, cap, chunk),
        "bf16 sum, 2 chunks": bf16_sum(x, w, y, cap, N // 2),
    }
    try:
        got["liger"] = bench.step(bench.build_method("liger", cap, DEVICE), x, w, y)[1:]
    except Exception as e:  # not installed here
        print(f"liger: {e}")
    for method, (dx, dw) in got.items():
        dx_err, dw_err = bench.rel_err(dx, ref[1]), bench.rel_err(dw, ref[2])
        errors.append(dict(head=name, method=method, dx_err=dx_err, dw_err=dw_err))
    del ref, got
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="llama3,gemma2,qwen16k")
    ap.add_argument("--csv", default="limits.csv")
    args = ap.parse_args()
    gbps = copy_gbps()
    print(f"copy bandwidth {gbps:.0f} GB/s (read + write)")
    rows, errors = [], []
    for name in args.heads.split(","):
        run_head(name, gbps, rows, errors)
        torch.cuda.empty_cache()
    with open(args.csv, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)
    with open(args.csv.replace(".csv", "-errors.csv"), "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(errors[0]))
        out.writeheader()
        out.writerows(errors)
    for r in rows:
        f3, f2, f4 = r["floor_ms"], r["frozen_floor_ms"], r["four_mm_floor_ms"]
        print(f"\n{r['head']} N={r['N']}: floor {f3:.2f} ms, frozen floor {f2:.2f}, 4-matmul floor {f4:.2f} "
              f"({f4 / f3:.2f}x), on the real gradient {r['floor_on_grad_ms']:.2f},"
              f" CE pass at least {r['ce_min_ms']:.2f} ms ({r['ce_min_ms'] / f3:.3f}x)")  # fmt: skip
        for label, base in (("default", f3), ("frozen", f2), ("64mib", f3)):
            ms, sk = r[f"{label}_ms"], r[f"{label}_skeleton_ms"]
            print(f"  {label:8s} {ms:7.2f} ms ({ms / base:.3f}x), {r[f'{label}_mib']:7.0f} MiB; "
                  f"without CE work {sk:7.2f} ms ({sk / base:.3f}x)")  # fmt: skip
        q = r["quarter_compile_mib"]
        ms, sk = r["bf16_sum_ms"], r["bf16_sum_skeleton_ms"]
        print(f"  bf16 dW sum, chunk {r['bf16_chunk']} (quarter of compile = {q:.0f} MiB): {ms:.2f} ms "
              f"({ms / f3:.3f}x, without CE {sk / f3:.3f}x), {r['bf16_sum_mib']:.0f} MiB;"
              f" 2 chunks {r['bf16_sum2_ms']:.2f} ms ({r['bf16_sum2_ms'] / f3:.3f}x)")  # fmt: skip
    print("\nerrors against float64 at the full shape")
    for e in errors:
        print(f"  {e['head']:8s} {e['method']:22s} dX {e['dx_err']:.3e}  dW {e['dw_err']:.3e}")


if __name__ == "__main__":
    main()
