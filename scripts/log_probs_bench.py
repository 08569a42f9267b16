"""Per-token log-probabilities on a GPU: fused_cel against TRL's own kernel, in one run.

For each head, forward + backward, bf16, median ms and peak MiB beyond the inputs and their
gradients, timed by CUDA events:
  floor          the three cuBLAS matmuls (logits, dX, dW)
  loss           fused_cel.linear_cross_entropy (mean), for reference
  loss+stats     the same with return_token_stats=True (entropy, top-1, mean logit, log sum p^2)
  log_probs      fused_cel.linear_log_probs, a random per-token grad_output
  log_probs+all  ... with every statistic, and the entropy differentiated too (GRPO's bonus)
  trl            TRL's ChunkedLogProbFunction (trl/kernels/chunked_logprob.py), log-probs only
  trl+all        ... with every output, the entropy differentiated too
TRL's kernel file is loaded on its own (its backward imports trl.trainer.utils, which pulls in
datasets; a stand-in gives it the no-op gather context it uses outside ZeRO-3).

    python scripts/log_probs_bench.py [--tokens 8192] [--out results.csv]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.metadata
import importlib.util
import statistics
import sys
import types

import torch

import fused_cel

HEADS = {"llama3-8b": (4096, 128256, None), "gemma2-2b": (2304, 256000, 30.0)}


def load_trl_kernel():
    """TRL's ChunkedLogProbFunction from the installed trl package's file, or None."""
    spec = importlib.util.find_spec("trl")
    if spec is None:
        return None
    path = spec.submodule_search_locations[0] + "/kernels/chunked_logprob.py"
    for name in ("trl", "trl.kernels", "trl.trainer"):  # packages with no code run
        sys.modules.setdefault(name, types.ModuleType(name)).__path__ = []
    utils = types.ModuleType("trl.trainer.utils")
    utils.maybe_gather_lm_head_ctx = lambda *args, **kwargs: contextlib.nullcontext()
    sys.modules["trl.trainer.utils"] = utils
    module_spec = importlib.util.spec_from_file_location("trl.kernels.chunked_logprob", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def time_ms(fn, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn, base_bytes, leaves):
    for t in leaves:  # the previous step's gradients are not part of the baseline
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - start - base_bytes) / 2**20


def methods(x, w, labels, softcap, trl):
    g = torch.randn(labels.shape, device=x.device)
    g_h = torch.randn(labels.shape, device=x.device)
    kw = dict(softcap=softcap)

    def loss():
        fused_cel.linear_cross_entropy(x, w, labels, **kw).backward()

    def loss_stats():
        fused_cel.linear_cross_entropy(x, w, labels, return_token_stats=True, **kw)[0].backward()

    def log_probs():
        (fused_cel.linear_log_probs(x, w, labels, **kw).log_probs * g).sum().backward()

    def log_probs_all():
        out = fused_cel.linear_log_probs(
            x, w, labels, entropy=True, top1=True, mean_logit=True, log_sum_sq_probs=True, **kw
        )
        (out.log_probs * g + out.entropy * g_h).sum().backward()

    found = dict(loss=loss, **{"loss+stats": loss_stats, "log_probs": log_probs, "log_probs+all": log_probs_all})
    if trl is not None:
        apply = trl.ChunkedLogProbFunction.apply
        every = trl.OPTIONAL_OUTPUTS

        def trl_log_probs():
            out = apply(x, w, None, labels, 1.0, 32768, softcap, 1.0, ())
            (out[0] * g).sum().backward()

        def trl_all():
            out = apply(x, w, None, labels, 1.0, 32768, softcap, 1.0, every)
            (out[0] * g + out[1] * g_h).sum().backward()

        found.update(trl=trl_log_probs, **{"trl+all": trl_all})
    return found


def floor(x, w):
    logits = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    dx, dw = torch.empty_like(x), torch.empty_like(w)

    def matmuls():
        torch.mm(x, w.t(), out=logits)
        torch.mm(logits, w, out=dx)
        torch.mm(logits.t(), x, out=dw)

    return time_ms(matmuls)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default=None, help="CSV of every row")
    args = ap.parse_args(argv)
    trl = load_trl_kernel()
    rows = []
    versions = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    versions["trl"] = importlib.metadata.version("trl") if trl is not None else None
    for head, (D, V, softcap) in HEADS.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = (torch.randn(args.tokens, D, device="cuda", generator=gen)).bfloat16().requires_grad_()
        w = (torch.randn(V, D, device="cuda", generator=gen) * (2 / D**0.5)).bfloat16().requires_grad_()
        labels = torch.randint(0, V, (args.tokens,), device="cuda", generator=gen)
        rows.append(dict(head=head, method="floor", ms=floor(x.detach(), w.detach()), extra_mib=None, **versions))
        for name, fn in methods(x, w, labels, softcap, trl).items():

            def step(fn=fn, x=x, w=w):
                x.grad = w.grad = None
                fn()

            ms = time_ms(step)
            base = x.numel() * x.element_size() + w.numel() * w.element_size()  # the gradients
            rows.append(dict(head=head, method=name, ms=ms, extra_mib=peak_mib(step, base, (x, w)), **versions))
            print(f"{head:<10} {name:<14} {ms:8.2f} ms {rows[-1]['extra_mib']:9.0f} MiB", flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    floors = {r["head"]: r["ms"] for r in rows if r["method"] == "floor"}
    print(f"\n{'head':<10} {'method':<14} {'ms':>8} {'x floor':>8} {'MiB':>9}")
    for r in rows:
        mib = "" if r["extra_mib"] is None else f"{r['extra_mib']:9.0f}"
        print(f"{r['head']:<10} {r['method']:<14} {r['ms']:8.2f} {r['ms'] / floors[r['head']]:8.2f} {mib:>9}")
    return rows


if __name__ == "__main__":
    main()
