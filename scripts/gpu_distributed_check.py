"""One-GPU checks of the distributed paths on CUDA with NCCL (world size 1, so the engines still
shard, gather and reduce through their real code): fused_cel.patch under FSDP2 (layers + root;
the head as its own unit) and DeepSpeed ZeRO-3 against the stock model without any engine, and
the vocab-parallel loss over an NCCL group against the plain call. fp32, one SGD step each.

    PYTHONPATH=src python3 scripts/gpu_distributed_check.py     # prints a table; exit 1 on a failure
"""

import os

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

import fused_cel  # noqa: E402

DEV = torch.device("cuda", 0)
TOL = 1e-4  # relative; the same math in fp32 differs by summation order only (~1e-6)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def tiny_model(state, patched):
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4
    )
    model = transformers.LlamaForCausalLM(config)
    if state is not None:
        model.load_state_dict(state)
    model = model.to(DEV).train()
    return fused_cel.patch(model) if patched else model


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def one_step(model, ids, labels, engine=None):
    """loss, full gradients, full parameters after one SGD step (lr 0.1)."""
    if engine is None:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grads = {n: full(p.grad).clone() for n, p in model.named_parameters()}
        opt.step()
        return loss, grads, {n: full(p).detach().clone() for n, p in model.named_parameters()}
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    loss = engine(input_ids=ids, labels=labels, return_dict=False)[0]
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return loss, grads, params


def compare(name, got, ref, rows):
    (loss, grads, params), (rl, rg, rp) = got, ref
    errs = (rel(loss, rl), max(rel(grads[n], rg[n]) for n in rg), max(rel(params[n], rp[n]) for n in rp))
    rows.append((name, *errs, "ok" if max(errs) < TOL else "FAIL"))


def main():
    dist.init_process_group("nccl", device_id=DEV)
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4
        )
    ).state_dict()
    ids = torch.randint(0, 32000, (2, 256), device=DEV)
    labels = ids.clone()
    labels[0, :40] = -100
    ref = one_step(tiny_model(state, False), ids, labels)
    rows = []

    from torch.distributed.fsdp import fully_shard

    for variant, head_alone in (("FSDP2 layers+root", False), ("FSDP2 lm_head alone", True)):
        for patched in (False, True):
            model = tiny_model(state, patched)
            for layer in model.model.layers:
                fully_shard(layer)
            if head_alone:
                fully_shard(model.lm_head)
            fully_shard(model)
            compare(f"{variant}, {'patched' if patched else 'stock'}", one_step(model, ids, labels), ref, rows)

    try:
        import deepspeed
    except ImportError as e:
        rows.append(("ZeRO-3", float("nan"), float("nan"), float("nan"), f"not run: {e}"))
    else:
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }
        for patched in (False, True):
            model = tiny_model(state, patched)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            got = one_step(model, ids, labels, engine=engine)
            compare(f"ZeRO-3 (return_dict=False), {'patched' if patched else 'stock'}", got, ref, rows)

    # vocab-parallel over an NCCL group of one: the shard statistics path on the compiled kernel
    h = torch.randn(4096, 1024, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(50000, 1024, device=DEV, dtype=torch.bfloat16) * 0.03
    y = torch.randint(0, 50000, (4096,), device=DEV)
    outs = []
    for kw in ({}, {"process_group": dist.group.WORLD}):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_cel.linear_cross_entropy(hh, ww, y, label_smoothing=0.1, z_loss=1e-4, **kw)
        loss.backward()
        outs.append((loss, {"x": hh.grad, "w": ww.grad}, {}))
    rows.append(
        (
            "vocab-parallel (NCCL, 1 rank)",
            rel(outs[1][0], outs[0][0]),
            max(rel(outs[1][1][k], outs[0][1][k]) for k in "xw"),
        )
        + (0.0,)
    )
    rows[-1] = (*rows[-1], "ok" if max(rows[-1][1:3]) < 1e-2 else "FAIL")
    dist.destroy_process_group()

    print(f"{'check':45s} {'loss rel':>10s} {'grad rel':>10s} {'param rel':>10s}  status")
    for name, a, b, c, status in rows:
        print(f"{name:45s} {a:10.2e} {b:10.2e} {c:10.2e}  {status}")
    return 0 if all(r[-1] == "ok" or r[-1].startswith("not run") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
