"""A/B on a GPU: the plans that round gradients chunk by chunk (low memory, round_dx), with the
rounding by kernels.scale_into (current) and by torch.mul with a dtype change (before), timed
alternately, median of 5 rounds. Prints one table.

    python scripts/ab_round_into.py
"""

from __future__ import annotations

import statistics

import torch

import fused_cel
from fused_cel import autograd, bench

CASES = (  # head, N, D, V, softcap, budget MiB
    ("llama3", 8192, 4096, 128256, None, 64),
    ("gemma2", 8192, 2304, 256000, 30.0, 64),
    ("qwen16k", 16384, 3584, 152064, None, 64),
    ("llama3", 65536, 4096, 128256, None, 3100),
)


def torch_round_into(out, src, scale, backend):
    if scale is None:
        out.copy_(src)
    else:
        torch.mul(src, scale, out=out)


def ab_case(name, N, D, V, cap, mib) -> str:
    hidden, weight, y = bench.make_inputs(N, D, V, "cuda")
    x, w = hidden.bfloat16(), weight.bfloat16()
    hidden = weight = None

    def loss(a, b, c):
        return fused_cel.linear_cross_entropy(a, b, c, softcap=cap, memory_budget_mib=mib)

    def run():
        return bench.step(loss, x, w, y)

    current = autograd._round_into
    times = {"scale_into": [], "torch.mul": []}
    try:
        for _ in range(5):
            for label, fn in (("scale_into", current), ("torch.mul", torch_round_into)):
                autograd._round_into = fn
                times[label].append(bench.time_gpu(run, warmup=2, reps=5))
    finally:
        autograd._round_into = current
    a, b = statistics.median(times["scale_into"]), statistics.median(times["torch.mul"])
    return f"{name:8s} N={N:6d} {mib:5d} MiB | scale_into {a:8.2f} ms | torch.mul {b:8.2f} ms | {a / b:.3f}"


def main() -> None:
    rows = []
    for case in CASES:
        rows.append(ab_case(*case))
        torch.cuda.empty_cache()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
