"""TRL's SFTTrainer with its own kernel and with fused_cel.integrations.trl.install(), side by side.

The same model (Llama-architecture, random init from its config: no downloads), the same batches
of the bundled text (byte-level tokens, a tokenizer built in memory), the same SFTConfig; each run
in its own process. Prints, per run, tokens/s over the steps after two warm-ups (CUDA-synchronised
step times), peak memory (torch.cuda.max_memory_allocated; on a CPU the resident set's growth),
the logged loss, entropy and mean_token_accuracy, and which kernel computed the calls.

    python scripts/sft_bench.py [--size llama3.2-1b] [--seq 8192] [--steps 8] [--out sft_bench.csv]
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import resource
import tempfile
import time

import torch

from fused_cel import train_demo

WARM = 2  # steps left out of tokens/s


def run(method: str, size: str, seq: int, steps: int) -> dict:
    import datasets
    import transformers
    import trl

    from fused_cel.integrations import trl as fused_trl

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = train_demo.build_model(size, torch.bfloat16 if cuda else torch.float32, device)
    text = train_demo.corpus_tokens("cpu")
    gen = torch.Generator().manual_seed(1)
    windows = [train_demo._batch(text, 1, seq - 1, gen)[0].tolist() for _ in range(steps)]  # SFT appends eos
    data = datasets.Dataset.from_dict({"input_ids": windows})
    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            torch.cuda.synchronize() if cuda else None
            times.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            torch.cuda.synchronize() if cuda else None
            times[-1] = time.perf_counter() - times[-1]

    with tempfile.TemporaryDirectory() as out:
        args = trl.SFTConfig(output_dir=out, per_device_train_batch_size=1, max_steps=steps, learning_rate=1e-4,
                             logging_steps=1, bf16=cuda, use_cpu=not cuda, max_length=seq, report_to=[],
                             save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)  # fmt: skip
        tokenizer = train_demo.byte_tokenizer()
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.add_callback(Clock())
        if method == "fused_cel":
            fused_trl.install()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        before = dict(fused_trl.calls)
        try:
            trainer.train()
        finally:
            fused_trl.uninstall()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    logs = [e for e in trainer.state.log_history if "loss" in e]
    calls = {k: v - before.get(k, 0) for k, v in fused_trl.calls.items() if v != before.get(k, 0)}
    return dict(
        tokens_per_s=seq * (steps - WARM) / sum(times[WARM:]),
        peak_mib=peak,
        loss=[e["loss"] for e in logs],
        entropy=[e["entropy"] for e in logs],
        accuracy=[e["mean_token_accuracy"] for e in logs],
        calls=calls,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="llama3.2-1b", choices=list(train_demo.SIZES))
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="CSV of every run")
    args = ap.parse_args(argv)
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "trl")}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"SFTTrainer, {args.size}, {args.seq} tokens a step, {args.steps} steps, {device}, {versions}", flush=True)
    results = {m: train_demo.run_in_process(run, m, args.size, args.seq, args.steps) for m in ("trl", "fused_cel")}
    for m, r in results.items():
        if "loss" not in r:
            raise SystemExit(f"{m}: {r}")
    ref = results["trl"]
    rows = []
    print(f"{'kernel':<10} {'tokens/s':>9} {'peak MiB':>9} {'final loss':>10} {'max|dloss|':>10} "
          f"{'max|dent|':>9} {'max|dacc|':>9}  calls")  # fmt: skip
    for m, r in results.items():
        diff = {k: max(abs(a - b) for a, b in zip(r[k], ref[k])) for k in ("loss", "entropy", "accuracy")}
        rows.append(dict(method=m, **{k: r[k] for k in ("tokens_per_s", "peak_mib")}, final_loss=r["loss"][-1],
                         **{f"max_diff_{k}": v for k, v in diff.items()}, calls=r["calls"], size=args.size,
                         seq=args.seq, steps=args.steps, device=device, **versions))  # fmt: skip
        print(f"{m:<10} {r['tokens_per_s']:9.0f} {r['peak_mib']:9.0f} {r['loss'][-1]:10.4f} {diff['loss']:10.2e} "
              f"{diff['entropy']:9.2e} {diff['accuracy']:9.2e}  {r['calls']}")  # fmt: skip
    for m, r in results.items():
        print(f"{m} losses: {[round(v, 4) for v in r['loss']]}")
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return results


if __name__ == "__main__":
    main()
