"""Two GPUs over NCCL (issue 6): the vocab-parallel loss against one GPU, its speed, and FSDP2
training of a Llama 3.2 1B-shaped model with and without fused_cel.patch.

    torchrun --nproc_per_node 2 scripts/multi_gpu_check.py            # one GPU per rank, NCCL
    torchrun --nproc_per_node 2 scripts/multi_gpu_check.py --cpu      # tiny shapes, gloo (a dry run)

1. correctness: Llama 3 and Gemma 2 heads (V split in two), bf16 and fp32, several option sets.
   Every rank computes the one-GPU result with the whole W on its own GPU, the vocab-parallel
   result with its half, and the float64 reference; the parallel result must be as close to
   float64 as the one-GPU result (1.2x its error, plus a floor).
2. speed: Llama 3's head, N = 8192 and 32768, bf16 forward + backward: one GPU with the whole
   W, two ranks with half each, and the collectives the parallel loss adds, timed alone (the
   per-token statistics: one MAX of N and one SUM of 3N fp32; dX: one SUM of N x D fp32).
3. fsdp2: fully_shard per layer and root, bf16, AdamW, 20 steps of 4 x 1024 tokens a rank,
   stock vs patched (and patched without the label check's host sync) from the same initial
   weights and batches: losses, peak memory, tokens/s.

Rank 0 prints tables and, with $OUT set, writes multi_gpu.csv there. Exit status 1 on a failure.
"""

import argparse
import csv
import os
import statistics
import sys
import time

for key, value in dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1").items():
    os.environ.setdefault(key, value)  # NVLink multicast stays off (the device notes)
if "--cpu" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fused_cel  # noqa: E402

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-5}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def say(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def shard_bounds(vocab, world):
    """Rows [start, end) of rank r: as even as can be, the first shards one row longer."""
    sizes = [vocab // world + (r < vocab % world) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def run_loss(hidden, weight, bias, labels, dtype, compute=None, **opts):
    """loss, dX, dW, db (detached) of one call; the leaves are made from the given tensors."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    if compute is None:
        loss = fused_cel.linear_cross_entropy(leaves[0], leaves[1], labels, leaves[2], **opts)
    else:
        loss = fused_cel.linear_cross_entropy_reference(
            leaves[0], leaves[1], labels, leaves[2], compute_dtype=compute, **opts
        )
    grad = torch.linspace(0.5, 2.0, loss.numel(), device=loss.device, dtype=loss.dtype).reshape(loss.shape)
    (loss * grad).sum().backward()
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def correctness(dev, cpu, rows):
    rank, world = dist.get_rank(), dist.get_world_size()
    heads = {"llama3": (4096, 128256, None), "gemma2": (2304, 256000, 30.0)}
    n = 1024
    if cpu:
        heads, n = {"tiny": (32, 301, None), "tiny-softcap": (24, 500, 30.0)}, 48
    option_sets = {
        "mean": {},
        "sum, smoothing, z-loss, shift": dict(reduction="sum", label_smoothing=0.1, z_loss=1e-4, shift=True),
        "none, logit_scale, ignore 7": dict(reduction="none", logit_scale=0.7, ignore_index=7),
    }
    ok = True
    for head, (D, V, softcap) in heads.items():
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, D, generator=gen).to(dev)
        weight = (torch.randn(V, D, generator=gen) * (2.0 / D**0.5)).to(dev)
        bias = (torch.randn(V, generator=gen) * 0.5).to(dev)
        labels = torch.randint(0, V, (n,), generator=gen).to(dev)
        labels[torch.rand(n, generator=gen).to(dev) < 0.2] = -100
        start, end = shard_bounds(V, world)[rank]
        for dtype in (torch.bfloat16, torch.float32):
            for name, opts in option_sets.items():
                opts = dict(opts, softcap=softcap)
                ignore = opts.get("ignore_index", -100)
                lab = torch.where(labels == -100, ignore, labels)
                ref = run_loss(hidden, weight, bias, lab, torch.float64, compute=torch.float64, **opts)
                one = run_loss(hidden, weight, bias, lab, dtype, **opts)
                par = run_loss(
                    hidden, weight[start:end], bias[start:end], lab, dtype, process_group=dist.group.WORLD, **opts
                )
                # this rank's rows of dW and db, against the same rows of the others
                pieces = [(par[0], one[0], ref[0]), (par[1], one[1], ref[1])]
                pieces += [(p, o[start:end], r[start:end]) for p, o, r in zip(par[2:], one[2:], ref[2:])]
                errs = []
                for got, single, want in pieces:
                    e_par, e_one = rel(got, want), rel(single, want)
                    errs.append((e_par, e_one, rel(got, single), e_par <= 1.2 * e_one + FLOOR[dtype]))
                # every rank's verdict, so that rank 0 reports the worst
                verdict = torch.tensor([float(all(e[3] for e in errs))], device=dev)
                dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
                passed = bool(verdict.item())
                ok &= passed
                for part, (e_par, e_one, vs_one, _) in zip(("loss", "dX", "dW rows", "db rows"), errs):
                    rows.append(dict(part="correctness", head=head, dtype=str(dtype).split(".")[-1], case=name,
                                     quantity=part, parallel_err=e_par, one_gpu_err=e_one, parallel_vs_one=vs_one,
                                     status="ok" if passed else "FAIL"))  # fmt: skip
                say(f"{head:12} {str(dtype):15} {name:32} " + "  ".join(
                    f"{p} {e[0]:.2e}/{e[1]:.2e}" for p, e in zip(("loss", "dX", "dW", "db"), errs)
                ) + ("" if passed else "  FAIL"))  # fmt: skip
    return ok


def timed(fn, reps, dev):
    """Median ms of fn() over reps, after warm-up; all ranks in step (barrier before each)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def speed(dev, cpu, rows):
    rank, world = dist.get_rank(), dist.get_world_size()
    D, V = (64, 1000) if cpu else (4096, 128256)
    for n in (256, 512) if cpu else (8192, 32768):
        speed_at(n, D, V, shard_bounds(V, world)[rank], dev, rows)


def speed_at(n, D, V, bounds, dev, rows):
    """One N of the speed part (its own function: the timed closures bind its locals)."""
    world = dist.get_world_size()
    start, end = bounds
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, D, generator=gen).to(dev, torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) * 0.02).to(dev, torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=gen).to(dev)
    shard = weight.detach()[start:end].clone().requires_grad_()

    def step(w, **kw):
        def run():
            hidden.grad = w.grad = None
            fused_cel.linear_cross_entropy(hidden, w, labels, check_labels=False, **kw).backward()

        return run

    layout = dict(process_group=dist.group.WORLD, vocab_start=start, vocab_size=V)
    results = {}
    for name, fn in (("one GPU, whole W", step(weight)), (f"{world} ranks, W split", step(shard, **layout))):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        results[name] = timed(fn, 10, dev)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else float("nan")
        rows.append(dict(part="speed", head="llama3", dtype="bfloat16", case=f"N={n}", quantity=name,
                         ms=results[name], peak_mib=peak))  # fmt: skip
    stats_max, stats_sum = torch.zeros(n, device=dev), torch.zeros(3 * n, device=dev)
    dx = torch.zeros(n, D, device=dev)

    def statistics_reduce():
        dist.all_reduce(stats_max, op=dist.ReduceOp.MAX)
        dist.all_reduce(stats_sum)

    collectives = {
        "statistics all-reduces (MAX N, SUM 3N fp32)": statistics_reduce,
        "dX all-reduce (N x D fp32)": lambda: dist.all_reduce(dx),
    }
    for name, fn in collectives.items():
        ms = timed(fn, 10, dev)
        results[name] = ms
        rows.append(dict(part="speed", head="llama3", dtype="float32", case=f"N={n}", quantity=name, ms=ms))
    one, par = results["one GPU, whole W"], results[f"{world} ranks, W split"]
    eff = one / (world * par)
    rows.append(dict(part="speed", head="llama3", case=f"N={n}", quantity="scaling efficiency", ms=eff))
    say(f"N={n}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in results.items()) + f"; efficiency {eff:.2f}")


def fsdp2(dev, cpu, rows, profile=False):
    import transformers
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    if cpu:
        config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=True)  # fmt: skip
        batch, seq, steps = 2, 32, 5
    else:  # Llama 3.2 1B's shape
        config = transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                          tie_word_embeddings=True, rope_theta=500000.0)  # fmt: skip
        batch, seq, steps = 4, 1024, 20
    torch.manual_seed(0)
    with dev:  # initialised on the GPU: 1.2B parameters
        state = transformers.LlamaForCausalLM(config).to(torch.bfloat16).state_dict()
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    data = [torch.randint(0, config.vocab_size, (batch, seq), generator=gen) for _ in range(steps)]
    losses, summary = {}, {}
    variants = {"stock": None, "patched": {}, "patched, check_labels=False": {"check_labels": False}}
    for name, options in variants.items():
        with dev:
            model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        model.load_state_dict(state)
        model.train()
        if options is not None:
            fused_cel.patch(model, **options)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        curve, times = [], []
        for step_no, ids in enumerate(data):
            if profile and step_no == len(data) - 3:  # the last 3 steps, traced (rank 0 prints)
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else []))  # fmt: skip
                prof.__enter__()
            ids = ids.to(dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            curve.append(mean.item() / world)  # a host sync: also the end of the step
            times.append(time.perf_counter() - t0)
        if profile:
            prof.__exit__(None, None, None)
            key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60)
            say(f"--- profile of {name}, last 3 steps ---\n{table}")
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
        tps = world * batch * seq / statistics.median(times[len(times) // 4 :])
        losses[name], summary[name] = curve, (peak, tps)
        del model, opt
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses["patched"], losses["stock"]))
    for name, (peak, tps) in summary.items():
        rows.append(dict(part="fsdp2", head="llama3.2-1b", dtype="bfloat16", case=f"{steps} steps", quantity=name,
                         peak_mib=peak, tokens_per_s=tps, first_loss=losses[name][0], last_loss=losses[name][-1],
                         max_rel_loss_diff=diff))  # fmt: skip
        say(f"FSDP2 {name:28}: loss {losses[name][0]:.4f} -> {losses[name][-1]:.4f}, peak {peak:.0f} MiB, "
            f"{tps:.0f} tokens/s")  # fmt: skip
    say(
        "losses per step, stock / patched: "
        + " ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(losses["stock"], losses["patched"]))
    )
    say(f"largest relative loss difference over the steps: {diff:.2e}")
    return diff < 1e-2


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU, tiny shapes (a dry run)")
    ap.add_argument("--parts", default="correctness,speed,fsdp2")
    ap.add_argument("--profile", action="store_true", help="fsdp2: trace the last 3 steps of each run, print tables")
    args = ap.parse_args()
    if args.cpu:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    rows, ok = [], True
    say(f"world {dist.get_world_size()}, {dist.get_backend()}, "
        f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}")  # fmt: skip
    parts = args.parts.split(",")
    if "correctness" in parts:
        ok &= correctness(dev, args.cpu, rows)
    if "speed" in parts:
        speed(dev, args.cpu, rows)
    if "fsdp2" in parts:
        ok &= fsdp2(dev, args.cpu, rows, profile=args.profile)
    if dist.get_rank() == 0 and os.environ.get("OUT"):
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(os.path.join(os.environ["OUT"], "multi_gpu.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    say("all checks passed" if ok else "SOME CHECKS FAILED")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
