"""Where the token statistics' time goes in a Llama 3 head step: CUDA kernel totals of the loss
step with and without return_token_stats (torch.profiler, 5 steps each after 3 warm-ups).

    PYTHONPATH=src python experiments/stats-lanes/profile_step.py
"""

import torch
from torch.profiler import ProfilerActivity, profile

import fused_cel

gen = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(8192, 4096, device="cuda", generator=gen).bfloat16().requires_grad_()
w = (torch.randn(128256, 4096, device="cuda", generator=gen) * (2 / 64)).bfloat16().requires_grad_()
labels = torch.randint(0, 128256, (8192,), device="cuda", generator=gen)
for stats in (False, True):

    def step(stats=stats):
        x.grad = w.grad = None
        out = fused_cel.linear_cross_entropy(x, w, labels, return_token_stats=stats)
        (out[0] if stats else out).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"--- return_token_stats={stats} (5 steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
