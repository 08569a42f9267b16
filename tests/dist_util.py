"""Run a function in a group of spawned processes (gloo, CPU), with bounded time.

run_group(fn, world_size, *args) starts world_size processes; each joins one gloo process group
(every collective times out after `timeout` seconds) and calls fn(rank, world_size, *args). Its
return value (tensors, dicts, lists) comes back through torch.save files, one list entry per rank.
A rank that raises makes run_group raise with every failing rank's traceback; processes still
alive after the deadline are killed, so a hung collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _child(rank, world_size, init_file, out_file, timeout, fn, args):
    torch.set_num_threads(1)  # world_size processes share the machine's cores
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        result = {"ok": True, "value": fn(rank, world_size, *args)}
    except BaseException:  # noqa: B036 - reported to the parent, which raises
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, out_file)


def run_group(fn, world_size: int, *args, timeout: float = 60.0) -> list:
    """fn(rank, world_size, *args) on world_size gloo ranks; returns the ranks' results in order."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world_size)]
        procs = [
            ctx.Process(target=_child, args=(r, world_size, init_file, outs[r], timeout, fn, args), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        # Start-up (imports) plus the collectives' own timeout, then kill what is left.
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout + 60)
        try:
            for p in procs:
                p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
        finally:
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        if hung:
            raise TimeoutError(f"ranks {hung} of {world_size} did not finish within {timeout + 60:.0f} s")
        results, errors = [], []
        for r, (p, out) in enumerate(zip(procs, outs)):
            if not os.path.exists(out):
                errors.append(f"rank {r}: exited with code {p.exitcode} and no result")
                continue
            result = torch.load(out, weights_only=False)
            if result["ok"]:
                results.append(result["value"])
            else:
                errors.append(f"rank {r}:\n{result['error']}")
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return results
