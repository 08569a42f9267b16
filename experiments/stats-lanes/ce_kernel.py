"""The cross-entropy kernel alone on one chunk of bf16 logits, with and without the token
statistics, with the gradient written in place (as the chunk loop runs it) and without (pass 1
alone), over launch configurations (columns per step, warps); median ms of 20, registers, spills.

    PYTHONPATH=<src> python experiments/stats-lanes/ce_kernel.py [label [defaults]]
"""

import statistics
import sys

import torch
import triton

from fused_cel import options
from fused_cel.kernels import common
from fused_cel.kernels.cross_entropy import cross_entropy

ROWS = 4096
CONFIGS = ((4096, 8), (4096, 4), (2048, 4), (2048, 2), (1024, 4), (1024, 2), (1024, 1), (512, 1))
label = sys.argv[1] if len(sys.argv) > 1 else "this"
config, seen = {}, {}


def launch_rows(kernel, logits, *args, block_max=None, warps=None, **meta):
    if not config:  # the launcher's own choice
        config.update(BLOCK_V=min(triton.next_power_of_2(logits.shape[1]), block_max or 4096))
        config.update(num_warps=warps or (8 if config["BLOCK_V"] >= 2048 else 4))
    compiled = kernel[(logits.shape[0],)](logits, logits.stride(0), *args, **config, **meta)
    seen["regs"] = (getattr(compiled, "n_regs", -1), getattr(compiled, "n_spills", -1))


common.launch_rows = launch_rows
for head, V, cap in (("llama3", 128256, None), ("gemma2", 256000, 30.0)):
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = (torch.randn(ROWS, V, device="cuda", generator=gen) * 3).bfloat16()
    targets = torch.randint(0, V, (ROWS,), device="cuda", generator=gen)
    opts = options.Options(softcap=cap, backend="triton")
    f32 = dict(dtype=torch.float32, device="cuda")
    loss, lse, tg, ent = (torch.empty(ROWS, **f32) for _ in range(4))
    extras, scale = torch.empty(ROWS, 3, **f32), torch.ones(1, **f32)
    logits = base.clone()
    for mode in ("loss", "stats", "loss-nograd", "stats-nograd"):
        kw = dict(entropy=ent, extras=extras) if mode.startswith("stats") else {}
        if not mode.endswith("nograd"):
            kw.update(scale=scale, target_grad=tg)
        for block, warps in CONFIGS if len(sys.argv) < 3 else [(None, None)]:  # any 2nd argument: the defaults
            config.clear()
            if block is not None:
                config.update(BLOCK_V=block, num_warps=warps)
            times = []
            for i in range(23):
                logits.copy_(base)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                cross_entropy(logits, targets, loss, lse, opts, **kw)
                b.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(a.elapsed_time(b))
            regs, spills = seen["regs"]
            ms = statistics.median(times)
            shape = f"{config['BLOCK_V']},{config['num_warps']}"
            print(f"{label},{head},{mode},{shape},{ms:.3f},{regs},{spills}", flush=True)
