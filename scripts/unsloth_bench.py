"""unsloth's FastLanguageModel trained with its own fused loss and with fused_cel, side by side.

A Llama-architecture model built from its config (random init, no downloads) and a byte-level
tokenizer built in memory are saved to a local folder, then loaded in a fresh process with
``FastLanguageModel.from_pretrained(folder, load_in_4bit=False, local_files_only=True)``; LoRA is
added with ``FastLanguageModel.get_peft_model`` (or every weight trains, ``full_finetuning=True``).
Then, for each method in turn (unsloth's own loss, fused_cel through install(), and install()'s
options as fused_cel[key=value;...], e.g. fused_cel[check_labels=False]: no label check, so no
host synchronisation), from the same weights: one forward and backward by hand (the gradients
compared) and Trainer steps on the same windows of the bundled text; --rounds R runs the methods
R times in turn (A B A B), to tell a difference from drift. Prints, per method, tokens/s over the
steps after two warm-ups (each round's, and their median), peak memory
(torch.cuda.max_memory_allocated), the Trainer's losses, which function computed the loss (calls
counted), and the first step's gradients' largest relative difference (|g - g_unsloth| /
|g_unsloth| per tensor).
Needs a CUDA GPU (unsloth's from_pretrained does).

    python scripts/unsloth_bench.py [--size llama3.2-1b] [--seq 8192] [--steps 8] [--mode lora]
        [--dtype bfloat16] [--methods unsloth,fused_cel] [--rounds 1] [--out unsloth_bench.csv]
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

from fused_cel import train_demo
from fused_cel.bench import fused_kwargs
from fused_cel.integrations.unsloth import OPTIONS

WARM = 2  # steps left out of tokens/s
METHODS = ("unsloth", "fused_cel")  # the default --methods; the first is the reference
LORA = dict(r=16, lora_alpha=16, lora_dropout=0, bias="none", random_state=0, use_gradient_checkpointing="unsloth",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip


def save_model(size: str, dtype: torch.dtype, folder: str) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = train_demo.build_model(size, dtype, device)
    model.config.torch_dtype = dtype
    model.save_pretrained(folder)
    train_demo.byte_tokenizer().save_pretrained(folder)


def _count_stock_calls(counter: dict) -> None:
    """Wrap unsloth's own loss where its callers look it up, counting the calls it computes."""
    from unsloth_zoo.fused_losses import cross_entropy_loss as home

    stock = home.unsloth_fused_ce_loss

    @functools.wraps(stock)  # its signature too, which install() checks
    def counted(*args, **kwargs):
        counter["unsloth"] = counter.get("unsloth", 0) + 1
        return stock(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "unsloth_fused_ce_loss", None) is stock:
            module.unsloth_fused_ce_loss = counted


def install_options(method: str) -> dict | None:
    """None for "unsloth"; install()'s options for "fused_cel" or "fused_cel[key=value;...]"."""
    return None if method == "unsloth" else fused_kwargs(method, allowed=OPTIONS, methods=["unsloth"])


def run(folder: str, seq: int, steps: int, mode: str, dtype: str, methods, rounds: int) -> dict:
    try:
        return _run(folder, seq, steps, mode, getattr(torch, dtype), methods, rounds)
    except Exception:  # the whole traceback: unsloth's failures are deep
        return {"error": traceback.format_exc()[-4000:]}


def _run(folder, seq, steps, mode, dtype, methods, rounds) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth  # noqa: F401  (first, as unsloth asks)
    from unsloth import FastLanguageModel

    import datasets
    import transformers

    from fused_cel.integrations import unsloth as fused_unsloth

    model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=seq, dtype=dtype, load_in_4bit=False,
                                                 local_files_only=True, full_finetuning=mode == "full")  # fmt: skip
    if mode == "lora":
        model = FastLanguageModel.get_peft_model(model, max_seq_length=seq, **LORA)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}  # each method trains from these
    stock_calls: dict = {}
    _count_stock_calls(stock_calls)
    text = train_demo.corpus_tokens("cpu")
    gen = torch.Generator().manual_seed(1)
    windows = [train_demo._batch(text, 1, seq, gen)[0].tolist() for _ in range(steps)]
    data = datasets.Dataset.from_dict({"input_ids": windows, "labels": windows})
    results, grads, times = {}, {}, []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            torch.cuda.synchronize()
            times[-1] = time.perf_counter() - times[-1]

    for method in [m for _ in range(rounds) for m in methods]:
        first = method not in results
        options = install_options(method)
        if options is not None:
            fused_unsloth.install(**options)
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(start[n])
        # One step by hand: the gradients before any update.
        model.train()
        ids = torch.tensor([windows[0]], device="cuda")
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if first:
            grads[method] = {n: p.grad.float().cpu() for n, p in trainable.items() if p.grad is not None}
        first_loss = loss.item()
        model.zero_grad(set_to_none=True)
        del loss
        times.clear()
        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(
                output_dir=out, per_device_train_batch_size=1, max_steps=steps, learning_rate=1e-4,
                logging_steps=1, bf16=dtype == torch.bfloat16, report_to=[], save_strategy="no", disable_tqdm=True,
                seed=0, dataloader_num_workers=0, optim="adamw_torch")  # fmt: skip
            trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                           data_collator=transformers.default_data_collator)  # fmt: skip
            trainer.add_callback(Clock())
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fused_before, stock_before = dict(fused_unsloth.calls), dict(stock_calls)
            trainer.train()
        fused_unsloth.uninstall()
        calls = {k: v - fused_before.get(k, 0) for k, v in fused_unsloth.calls.items()}
        calls |= {f"{k} (unsloth's own)": v - stock_before.get(k, 0) for k, v in stock_calls.items()}
        speed = seq * (steps - WARM) / sum(times[WARM:])
        if first:
            results[method] = dict(
                rounds=[],
                peak_mib=torch.cuda.max_memory_allocated() / 2**20,
                first_loss=first_loss,
                loss=[e["loss"] for e in trainer.state.log_history if "loss" in e],
                calls={k: v for k, v in calls.items() if v},
            )
        results[method]["rounds"].append(speed)
        results[method]["tokens_per_s"] = statistics.median(results[method]["rounds"])
        del trainer
    ref = grads[methods[0]]
    worst = {m: max(((grads[m][n] - g).norm() / g.norm().clamp(min=1e-30)).item() for n, g in ref.items())
             for m in methods}  # fmt: skip
    return dict(
        methods=results,
        grad_tensors=len(ref),
        max_rel_diff_grad=worst,
        versions={p: importlib.metadata.version(p) for p in ("unsloth", "unsloth_zoo", "transformers", "peft")},
    )


def head(size: str, seq: int, dtype: str, methods, reps: int = 10) -> dict:
    """The head alone: unsloth_fused_ce_loss and fused_cel's in its place, forward + backward at the
    model's head shape (seq tokens), the weight frozen (LoRA) and trained (full fine-tuning)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth  # noqa: F401
    from unsloth_zoo.fused_losses.cross_entropy_loss import unsloth_fused_ce_loss as stock

    from fused_cel.integrations import unsloth as fused_unsloth

    hidden, *_, vocab = train_demo.SIZES[size]
    dtype = getattr(torch, dtype)
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, seq, hidden, device="cuda", dtype=dtype, generator=gen)
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) * hidden**-0.5).to(dtype)
    labels = torch.randint(0, vocab, (1, seq), device="cuda", generator=gen)
    rows = []
    for weight_grad in (False, True):
        for method in methods:
            options = install_options(method)
            fused_unsloth.uninstall() if options is None else fused_unsloth.install(**options)
            fn = stock if options is None else fused_unsloth.fused_ce_loss
            xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_(weight_grad)
            times = []
            for _ in range(reps + 3):
                xr.grad = wr.grad = None
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(None, xr, wr, None, labels, n_items=None, shift_labels=True).backward()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            grads = (xr.grad.numel() + (wr.grad.numel() if weight_grad else 0)) * xr.element_size()
            rows.append(dict(method=method, weight_grad=weight_grad, ms=sorted(times[3:])[reps // 2],
                             extra_mib=(torch.cuda.max_memory_allocated() - base - grads) / 2**20))  # fmt: skip
    fused_unsloth.uninstall()
    return dict(rows=rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="llama3.2-1b", choices=list(train_demo.SIZES))
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--mode", default="lora", choices=("lora", "full"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated: unsloth, fused_cel, fused_cel[key=value;...] (install()'s options)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="times each method trains, in turn")
    ap.add_argument("--out", default=None, help="CSV of the runs")
    ap.add_argument("--head", action="store_true", help="time the head alone (no model, no Trainer)")
    args = ap.parse_args(argv)
    methods = list(dict.fromkeys(filter(None, (m.strip() for m in args.methods.split(",")))))
    try:
        for m in methods:
            install_options(m)
    except ValueError as e:
        ap.error(str(e))
    if not methods or args.rounds < 1:
        ap.error("--methods needs at least one method and --rounds must be >= 1")
    width = max(10, *map(len, methods))
    if args.head:
        result = train_demo.run_in_process(head, args.size, args.seq, args.dtype, methods)
        if "rows" not in result:
            raise SystemExit(str(result))
        print(f"head of {args.size}, {args.seq} tokens, {args.dtype}: median ms of 10, MiB beyond the gradients")
        for r in result["rows"]:
            print(f"{r['method']:<{width}} weight grad {r['weight_grad']!s:<5} {r['ms']:8.2f} ms "
                  f"{r['extra_mib']:8.0f} MiB")  # fmt: skip
        return result
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"unsloth FastLanguageModel, {args.size}, {args.mode}, {args.dtype}, {args.seq} tokens a step, "
          f"{args.steps} steps, {device}, torch {torch.__version__}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        train_demo.run_in_process(save_model, args.size, getattr(torch, args.dtype), folder)
        result = train_demo.run_in_process(run, folder, args.seq, args.steps, args.mode, args.dtype, methods,
                                           args.rounds)  # fmt: skip
    if "methods" not in result:
        raise SystemExit(str(result.get("error", result)))
    results, ref = result["methods"], result["methods"][methods[0]]
    print(f"versions: {result['versions']}")
    print(f"first step's gradients: {result['grad_tensors']} trainable tensors; largest relative difference to "
          f"{methods[0]}'s: {', '.join(f'{m} {d:.2e}' for m, d in result['max_rel_diff_grad'].items())}")  # fmt: skip
    print(f"{'loss by':<{width}} {'tokens/s':>9} {'peak MiB':>9} {'1st loss':>9} {'final loss':>10} "
          f"{'max|dloss|':>10}  calls; tokens/s of each round")  # fmt: skip
    rows = []
    for m, r in results.items():
        diff = max(abs(a - b) for a, b in zip(r["loss"], ref["loss"]))
        rows.append(dict(method=m, tokens_per_s=r["tokens_per_s"], rounds=r["rounds"], peak_mib=r["peak_mib"],
                         first_loss=r["first_loss"], final_loss=r["loss"][-1], max_diff_loss=diff,
                         max_rel_diff_grad=result["max_rel_diff_grad"][m], calls=r["calls"], size=args.size,
                         mode=args.mode, dtype=args.dtype, seq=args.seq, steps=args.steps, device=device,
                         torch=torch.__version__, **result["versions"]))  # fmt: skip
        print(f"{m:<{width}} {r['tokens_per_s']:9.0f} {r['peak_mib']:9.0f} {r['first_loss']:9.4f} "
              f"{r['loss'][-1]:10.4f} {diff:10.2e}  {r['calls']}; {[round(v) for v in r['rounds']]}")  # fmt: skip
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
