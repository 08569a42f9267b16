"""Per-token log-probabilities on a GPU: fused_cel against TRL's own kernel, in one run.

For each head, forward + backward, bf16, median ms and peak MiB beyond the inputs and their
gradients, timed by CUDA events:
  floor          the three cuBLAS matmuls (logits, dX, dW)
  loss           fused_cel.linear_cross_entropy (mean), for reference
  loss+stats     the same with return_token_stats=True (entropy, top-1, mean logit, log sum p^2)
  log_probs      fused_cel.linear_log_probs, a random per-token grad_output
  log_probs+all  ... with every statistic, and the entropy differentiated too (GRPO's bonus)
  sft            linear_log_probs(uniform_grad=True), entropy and top-1, -mean: SFTTrainer's loss
                 with fused_cel.integrations.trl installed (gradients in forward, 3 matmuls)
  trl            TRL's ChunkedLogProbFunction (trl/kernels/chunked_logprob.py), log-probs only
  trl+all        ... with every output, the entropy differentiated too
  trl-sft        ... log-probs, entropy and top-1, -mean: SFTTrainer's own head
With --ignored, the per-token methods get the counted rows only, as TRL's fused head passes them;
loss and loss+stats take every row. --errors adds each kernel's errors against float64.
TRL's kernel file is loaded on its own (its backward imports trl.trainer.utils, which pulls in
datasets; a stand-in gives it the no-op gather context it uses outside ZeRO-3).

    python scripts/log_probs_bench.py [--tokens 8192] [--ignored 0.5] [--errors] [--out results.csv]
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import statistics

import torch

import fused_cel
from fused_cel.bench import load_trl_kernel

HEADS = {"llama3-8b": (4096, 128256, None), "gemma2-2b": (2304, 256000, 30.0)}


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
    """The timed steps. With ignored labels the per-token methods get the counted rows only, as
    TRL's fused head passes them (on Triton devices); loss and loss+stats take every row."""
    mask = labels != -100
    xc, lc = x[mask].detach().requires_grad_(), labels[mask]
    g = torch.randn(lc.shape, device=x.device)
    g_h = torch.randn(lc.shape, device=x.device)
    kw = dict(softcap=softcap)

    def loss():
        fused_cel.linear_cross_entropy(x, w, labels, **kw).backward()

    def loss_stats():
        fused_cel.linear_cross_entropy(x, w, labels, return_token_stats=True, **kw)[0].backward()

    def log_probs():
        (fused_cel.linear_log_probs(xc, w, lc, **kw).log_probs * g).sum().backward()

    def log_probs_all():
        out = fused_cel.linear_log_probs(
            xc, w, lc, entropy=True, top1=True, mean_logit=True, log_sum_sq_probs=True, **kw
        )
        (out.log_probs * g + out.entropy * g_h).sum().backward()

    def sft():  # SFTTrainer's NLL mean with fused_cel installed: one gradient value, 3 matmuls
        out = fused_cel.linear_log_probs(xc, w, lc, entropy=True, top1=True, uniform_grad=True, **kw)
        (-out.log_probs.sum() / lc.numel()).backward()

    found = dict(loss=loss, **{"loss+stats": loss_stats, "log_probs": log_probs, "log_probs+all": log_probs_all})
    found["sft"] = sft
    if trl is not None:
        apply = trl.ChunkedLogProbFunction.apply
        every = trl.OPTIONAL_OUTPUTS

        def trl_log_probs():
            out = apply(xc, w, None, lc, 1.0, 32768, softcap, 1.0, ())
            (out[0] * g).sum().backward()

        def trl_all():
            out = apply(xc, w, None, lc, 1.0, 32768, softcap, 1.0, every)
            (out[0] * g + out[1] * g_h).sum().backward()

        def trl_sft():  # SFTTrainer's own: log-probs, entropy and top-1, the NLL mean
            out = apply(xc, w, None, lc, 1.0, 32768, softcap, 1.0, ("entropy", "is_top1"))
            (-out[0].sum() / lc.numel()).backward()

        found.update(trl=trl_log_probs, **{"trl+all": trl_all, "trl-sft": trl_sft})
    return found, (x, xc, w)


def errors(x, w, labels, softcap, trl):
    """Relative errors (2-norm) against float64 of log-probs, dX and dW, for the SFT loss
    (-mean log-prob) and for random per-token grads: fused_cel and TRL's kernel on the counted rows."""
    mask = labels != -100
    xc, lc = x[mask].detach(), labels[mask]
    n = lc.numel()
    g = torch.randn(lc.shape, device=x.device, generator=torch.Generator(device=x.device).manual_seed(1))
    cases = {"sft": torch.full_like(g, -1.0 / n), "random": g}
    ref_in = [xc.double().requires_grad_(), w.detach().double().requires_grad_()]
    z = ref_in[0] @ ref_in[1].T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ref_lp = z.log_softmax(-1).gather(1, lc[:, None])[:, 0]

    def fused(a, b, uniform):
        return fused_cel.linear_log_probs(a, b, lc, softcap=softcap, uniform_grad=uniform).log_probs

    def theirs(a, b, uniform):
        return trl.ChunkedLogProbFunction.apply(a, b, None, lc, 1.0, 32768, softcap, 1.0, ())[0]

    kernels = {"fused_cel": fused, **({} if trl is None else {"trl": theirs})}
    rows = []
    for case, grad in cases.items():
        want = torch.autograd.grad((ref_lp * grad.double()).sum(), ref_in, retain_graph=True)
        for name, fn in kernels.items():
            ins = [xc.clone().requires_grad_(), w.detach().clone().requires_grad_()]
            lp = fn(*ins, case == "sft" and name == "fused_cel")
            got = torch.autograd.grad((lp * grad).sum(), ins)
            err = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
            rows.append(dict(case=case, kernel=name, log_probs=err(lp.detach(), ref_lp.detach()),
                             dx=err(got[0], want[0]), dw=err(got[1], want[1])))  # fmt: skip
    return rows


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
    ap.add_argument("--ignored", type=float, default=0.0, help="fraction of labels ignored (SFT prompts)")
    ap.add_argument("--errors", action="store_true", help="also the errors against float64")
    ap.add_argument("--out", default=None, help="CSV of every row")
    args = ap.parse_args(argv)
    trl = load_trl_kernel()
    rows, error_rows = [], []
    versions = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, ignored=args.ignored)
    versions["trl"] = importlib.metadata.version("trl") if trl is not None else None
    for head, (D, V, softcap) in HEADS.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = (torch.randn(args.tokens, D, device="cuda", generator=gen)).bfloat16().requires_grad_()
        w = (torch.randn(V, D, device="cuda", generator=gen) * (2 / D**0.5)).bfloat16().requires_grad_()
        labels = torch.randint(0, V, (args.tokens,), device="cuda", generator=gen)
        labels[torch.rand(args.tokens, device="cuda", generator=gen) < args.ignored] = -100
        rows.append(dict(head=head, method="floor", ms=floor(x.detach(), w.detach()), extra_mib=None, **versions))
        found, leaves = methods(x, w, labels, softcap, trl)
        for name, fn in found.items():

            def step(fn=fn, leaves=leaves):
                for t in leaves:
                    t.grad = None
                fn()

            ms = time_ms(step)
            rows_of_x = x if name.startswith("loss") else leaves[1]  # the gradients are not extra memory
            base = rows_of_x.numel() * x.element_size() + w.numel() * w.element_size()
            rows.append(dict(head=head, method=name, ms=ms, extra_mib=peak_mib(step, base, leaves), **versions))
            print(f"{head:<10} {name:<14} {ms:8.2f} ms {rows[-1]['extra_mib']:9.0f} MiB", flush=True)
        if args.errors:
            error_rows += [dict(head=head, **r) for r in errors(x, w, labels, softcap, trl)]
        del x, w, leaves, found
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        if error_rows:
            with open(args.out.replace(".csv", "_errors.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(error_rows[0]))
                writer.writeheader()
                writer.writerows(error_rows)
    floors = {r["head"]: r["ms"] for r in rows if r["method"] == "floor"}
    print(f"\n{'head':<10} {'method':<14} {'ms':>8} {'x floor':>8} {'MiB':>9}   ({args.ignored:.0%} of labels ignored)")
    for r in rows:
        mib = "" if r["extra_mib"] is None else f"{r['extra_mib']:9.0f}"
        print(f"{r['head']:<10} {r['method']:<14} {r['ms']:8.2f} {r['ms'] / floors[r['head']]:8.2f} {mib:>9}")
    if error_rows:
        print(f"\n{'head':<10} {'grad_output':<11} {'kernel':<10} {'log_probs':>10} {'dX':>10} {'dW':>10}  (vs fp64)")
        for r in error_rows:
            print(f"{r['head']:<10} {r['case']:<11} {r['kernel']:<10} {r['log_probs']:10.2e} {r['dx']:10.2e} "
                  f"{r['dw']:10.2e}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
