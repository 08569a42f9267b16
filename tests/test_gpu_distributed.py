"""One-GPU checks of the distributed paths on CUDA with NCCL (world size 1, so the engines still
shard, gather and reduce through their real code): fused_cel.patch under FSDP2 (layers + root;
the head as its own unit) and DeepSpeed ZeRO-3 against the stock model without any engine, and
the vocab-parallel loss over an NCCL group against the plain call. fp32, one SGD step each.

The NCCL group is set up by the module-scoped `nccl_group` fixture, not at import, so collecting
this module without CUDA does nothing. H100 record: docs/benchmarks/h100-distributed.txt (made
by this module's former script, scripts/gpu_distributed_check.py).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

import fused_cel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOL = 1e-4  # relative; the same math in fp32 differs by summation order only (~1e-6)
VOCAB_PARALLEL_TOL = 1e-2  # bf16 inputs; the shard statistics path against the plain call
LR = 0.1
V = 32000


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank NCCL process group on the current GPU for the module's tests; destroyed after."""
    if dist.is_initialized():
        pytest.skip("a torch.distributed process group is already initialised in this process")
    port = _free_port()
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=device)
    try:
        yield {"device": device, "port": port}
    finally:
        dist.destroy_process_group()


# --- fused_cel.patch under FSDP2 and ZeRO-3, against the stock model without an engine ---------


def _config():
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4
    )


def tiny_model(state, patched, device):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(_config())
    model.load_state_dict(state)
    model = model.to(device).train()
    return fused_cel.patch(model) if patched else model


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sgd_step(model, ids, labels):
    """loss, full gradients, full parameters after one SGD step (lr 0.1)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    opt.step()
    return loss, grads, {n: _full(p).detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference(nccl_group):
    """The stock model's weights, a batch, and one SGD step of the stock model with no engine."""
    transformers = pytest.importorskip("transformers")
    device = nccl_group["device"]
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(_config()).state_dict()
    ids = torch.randint(0, V, (2, 256), device=device)
    labels = ids.clone()
    labels[0, :40] = -100
    step = sgd_step(tiny_model(state, False, device), ids, labels)
    return {"state": state, "ids": ids, "labels": labels, "step": step}


def assert_same_step(name, got, ref):
    """Loss, every gradient and every updated parameter within TOL (relative) of the reference."""
    (loss, grads, params), (ref_loss, ref_grads, ref_params) = got, ref
    assert grads.keys() == ref_grads.keys(), f"{name}: parameters {sorted(grads)} != {sorted(ref_grads)}"
    grad_errs = {n: rel(grads[n], ref_grads[n]) for n in ref_grads}
    param_errs = {n: rel(params[n], ref_params[n]) for n in ref_params}
    worst_grad = max(grad_errs, key=grad_errs.get)
    worst_param = max(param_errs, key=param_errs.get)
    loss_err = rel(loss, ref_loss)
    assert max(loss_err, grad_errs[worst_grad], param_errs[worst_param]) < TOL, (
        f"{name} vs the stock model without an engine: loss rel {loss_err:.2e}, "
        f"grad rel {grad_errs[worst_grad]:.2e} ({worst_grad}), "
        f"param rel {param_errs[worst_param]:.2e} ({worst_param}); tolerance {TOL:g}"
    )


@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
@pytest.mark.parametrize("head_alone", [False, True], ids=["layers+root", "lm_head alone"])
def test_fsdp2(nccl_group, reference, head_alone, patched):
    """fully_shard on every decoder layer (and the head as its own unit), then the root."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_model(reference["state"], patched, nccl_group["device"])
    for layer in model.model.layers:
        fully_shard(layer)
    if head_alone:
        fully_shard(model.lm_head)
    fully_shard(model)
    got = sgd_step(model, reference["ids"], reference["labels"])
    name = f"FSDP2 {'lm_head alone' if head_alone else 'layers+root'}, {'patched' if patched else 'stock'}"
    assert_same_step(name, got, reference["step"])


@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
def test_zero3(nccl_group, reference, patched, monkeypatch):
    """DeepSpeed ZeRO-3 on the NCCL group, return_dict=False (Trainer's convention)."""
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.utils import safe_get_full_grad

    # What a launcher would set: DeepSpeed reads them (and looks for MPI without them).
    for key, value in dict(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(nccl_group["port"])
    ).items():
        monkeypatch.setenv(key, value)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    model = tiny_model(reference["state"], patched, nccl_group["device"])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    loss = engine(input_ids=reference["ids"], labels=reference["labels"], return_dict=False)[0]
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    name = f"ZeRO-3 (return_dict=False), {'patched' if patched else 'stock'}"
    assert_same_step(name, (loss, grads, params), reference["step"])


# --- the vocab-parallel loss over an NCCL group of one ------------------------------------------


def test_vocab_parallel_nccl(nccl_group):
    """process_group=WORLD (one rank: the shard statistics path on the compiled kernel) equals the
    plain call, with label smoothing and z-loss."""
    device = nccl_group["device"]
    h = torch.randn(4096, 1024, device=device, dtype=torch.bfloat16)
    w = torch.randn(50000, 1024, device=device, dtype=torch.bfloat16) * 0.03
    y = torch.randint(0, 50000, (4096,), device=device)
    outs = []
    for kw in ({}, {"process_group": dist.group.WORLD}):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_cel.linear_cross_entropy(hh, ww, y, label_smoothing=0.1, z_loss=1e-4, **kw)
        loss.backward()
        outs.append((loss, {"x": hh.grad, "w": ww.grad}))
    (plain_loss, plain_grads), (loss, grads) = outs
    loss_err = rel(loss, plain_loss)
    grad_errs = {k: rel(grads[k], plain_grads[k]) for k in ("x", "w")}
    assert max(loss_err, *grad_errs.values()) < VOCAB_PARALLEL_TOL, (
        f"vocab-parallel (NCCL, 1 rank) vs the plain call: loss rel {loss_err:.2e}, "
        f"dX rel {grad_errs['x']:.2e}, dW rel {grad_errs['w']:.2e}; tolerance {VOCAB_PARALLEL_TOL:g}"
    )
