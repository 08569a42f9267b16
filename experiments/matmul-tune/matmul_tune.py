"""Sweep launch configurations of the logits kernel (fused_cel/matmul.py) against cuBLAS.

For each head, at the chunk the default plan uses (autograd.auto_chunk_size), times
matmul.logits_stats under each Config and torch.mm of the same operands (the cuBLAS route's
logits), by triton.testing.do_bench (median ms). Prints a table, best first per head, and writes
$OUT/matmul_tune.csv when $OUT is set.

    python scripts/matmul_tune.py                 # the heads below, every config
    python scripts/matmul_tune.py --heads gemma2  # one head
"""

import argparse
import csv
import functools
import os

import torch
import triton.testing

from fused_cel import matmul
from fused_cel.autograd import auto_chunk_size

HEADS = {  # name: (D, V)
    "llama3": (4096, 128256),
    "gemma2": (2304, 256000),
    "qwen2.5": (3584, 152064),
    "mistral": (4096, 32768),
    "gpt2": (768, 50304),  # padded to a multiple of 64, as run_chunks does
}
C = matmul.Config
CONFIGS = [
    C(128, 256, 64, 3, 8),
    C(128, 256, 64, 4, 8),
    C(128, 256, 64, 3, 8, 16),
    C(128, 128, 64, 3, 4),
    C(128, 128, 64, 4, 4),
    C(128, 128, 64, 5, 4),
    C(128, 128, 64, 4, 8),
    C(128, 128, 128, 3, 8),
    C(128, 128, 128, 4, 8),
    C(64, 256, 64, 4, 4),
    C(256, 128, 64, 3, 8),
    C(256, 128, 64, 4, 8),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default=",".join(HEADS), help="comma-separated: " + ",".join(HEADS))
    args = ap.parse_args()
    rows = []
    for name in args.heads.split(","):
        D, V = HEADS[name]
        M = auto_chunk_size(8192, V, D, torch.device("cuda"), "triton", True)
        x = torch.randn(M, D, device="cuda").bfloat16()
        w = (torch.randn(V, D, device="cuda") / D**0.5).bfloat16()
        out = torch.empty(M, V, dtype=torch.bfloat16, device="cuda")
        cublas = triton.testing.do_bench(functools.partial(torch.mm, x, w.t(), out=out))
        rows.append(dict(head=name, M=M, N=V, K=D, config="cublas torch.mm", ms=cublas, vs_cublas=1.0))
        for cfg in CONFIGS:
            stats = torch.empty(2, M, matmul.n_tiles(V, cfg.bn), device="cuda")
            kw = dict(n_valid=V, logit_scale=1.0, softcap=None, sum_u=False, config=cfg)
            run = functools.partial(matmul.logits_stats, x, w, None, out, stats, **kw)
            try:
                ms = triton.testing.do_bench(run)
            except Exception as e:  # e.g. out of shared memory for this tile and depth
                print(f"{name} {tuple(cfg)}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            rows.append(dict(head=name, M=M, N=V, K=D, config=str(tuple(cfg)), ms=ms, vs_cublas=ms / cublas))
            print(f"{name:8} M={M:5} {str(tuple(cfg)):28} {ms:7.3f} ms  {ms / cublas:5.3f}x cuBLAS", flush=True)
    print("\nhead      config (bm, bn, bk, stages, warps, group_m)      ms   vs cuBLAS")
    for name in dict.fromkeys(r["head"] for r in rows):
        mine = sorted((r for r in rows if r["head"] == name), key=lambda r: r["ms"])
        for r in mine[:4] + [r for r in mine[4:] if r["config"].startswith("cublas")]:
            print(f"{name:8}  {r['config']:44} {r['ms']:7.3f}  {r['vs_cublas']:5.3f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "matmul_tune.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
