"""Data-parallel training with fused_cel on CPU gloo process groups (tests/dist_util.run_group):
the functional API, and fused_cel.patch under DDP, FSDP2 (fully_shard), FSDP1 and DeepSpeed ZeRO-3.

Every check compares one distributed step with single-process training on the concatenated
batch, computed here in the parent. The ranks ignore different numbers of labels, so averaging
per-rank means is wrong, and the sanity checks show that the comparison sees it.

Tolerance: float32 runs whose only differences are summation orders (chunks, the all-reduce,
batch-size-dependent matmul blocking) agree to about 1e-6 of the largest entry; GRAD_RTOL = 1e-5
leaves a 10x margin, while a wrong normalisation is off by 10% or more (assert_differs wants
100x the tolerance) and a 1% error in num_items fails every check.

The 2-rank runs (functional DDP, the patch under DDP, FSDP2 and FSDP1) share one spawned group, the
`two_ranks` fixture: each spawn costs seconds of imports.
"""

from __future__ import annotations

import importlib.util
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fused_cel
from dist_util import run_group

transformers = pytest.importorskip("transformers")

GRAD_RTOL = 1e-5
V, D = 300, 32  # the tiny Llama of test_hf.py
BACKENDS = ["torch"] + (["triton"] if fused_cel.triton_available(torch.device("cpu")) else [])


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = 0.0):
    """Elementwise within GRAD_RTOL of the reference's largest entry (entries near 0 carry the
    rounding error of the large ones they are summed from), plus atol."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    tol = GRAD_RTOL * scale + atol
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e} (max |ref| {scale:.3e})"


def assert_differs(got: torch.Tensor, want: torch.Tensor, what: str):
    """Sanity check: a wrong recipe is off by far more than the tolerance."""
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err > 100 * GRAD_RTOL * scale, f"{what}: a wrong recipe came within {err / scale:.2e} of the reference"


def ragged_labels(world: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels for `world` ranks, [world, *shape]: rank r ignores 1 + 4r of its
    labels, at random positions, so the ranks count different numbers of tokens."""
    ids = torch.randint(0, V, (world, *shape))
    labels = ids.clone()
    per_rank = labels[0].numel()
    for r in range(world):
        ignored = torch.randperm(per_rank)[: min(1 + 4 * r, per_rank - 2)]
        labels[r].view(-1)[ignored] = -100
    return ids, labels


def global_count(labels: torch.Tensor) -> torch.Tensor:
    """The number of counted tokens summed over the ranks (the mean's divisor)."""
    n = (labels != -100).sum()
    dist.all_reduce(n)
    return n


# --- The functional API under DDP ---------------------------------------------------------------


class TinyLM(torch.nn.Module):
    """A trainable layer producing the hidden states, and the LM head used for its weight."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(D, D)
        self.lm_head = torch.nn.Linear(D, V, bias=False)

    def forward(self, x, labels, num_items=None, backend="auto"):
        hidden = torch.tanh(self.proj(x))
        return fused_cel.linear_cross_entropy(hidden, self.lm_head.weight, labels, num_items=num_items, backend=backend)


def functional_case(world: int) -> dict:
    _, labels = ragged_labels(world, (2, 8))
    return {"state": TinyLM().state_dict(), "x": torch.randn(world, 2, 8, D), "labels": labels}


def _functional_ddp(rank, world, case):
    model = TinyLM()
    model.load_state_dict(case["state"])
    ddp = DDP(model)
    x, labels = case["x"][rank], case["labels"][rank]
    results = {}
    for backend in BACKENDS:
        for recipe in ("global", "naive"):
            ddp.zero_grad(set_to_none=True)
            if recipe == "global":  # the recipe of the README
                loss = ddp(x, labels, num_items=global_count(labels), backend=backend) * world
            else:  # per-rank means, which DDP's gradient average does not turn into the global mean
                loss = ddp(x, labels, backend=backend)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            results[backend, recipe] = {"loss": loss.detach(), "grads": grads}
    return results


def check_functional(case, ranks):
    model = TinyLM()
    model.load_state_dict(case["state"])
    ref_loss = model(case["x"].flatten(0, 1), case["labels"].flatten(0, 1), backend="torch")  # all tokens
    ref_loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    for backend in BACKENDS:
        losses = torch.stack([r[backend, "global"]["loss"] for r in ranks])
        assert_close(losses.mean(), ref_loss.detach(), f"{backend}: mean of the ranks' losses")
        for rank, result in enumerate(ranks):
            for name, want in ref.items():
                assert_close(result[backend, "global"]["grads"][name], want, f"{backend}, rank {rank}: grad of {name}")
        naive = ranks[0][backend, "naive"]["grads"]["lm_head.weight"]
        assert_differs(naive, ref["lm_head.weight"], f"{backend}: per-rank means")


# --- fused_cel.patch of a Hugging Face model ----------------------------------------------------


def tiny_llama_config(**overrides):
    return transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        **overrides,
    )


def hf_case(world: int, **config_overrides) -> dict:
    config = tiny_llama_config(**config_overrides)
    ids, labels = ragged_labels(world, (2, 12))
    state = transformers.LlamaForCausalLM(config).state_dict()
    return {"config": config, "state": state, "ids": ids, "labels": labels, "lr": 1.0}


def build(case, patched: bool):
    model = transformers.LlamaForCausalLM(case["config"])
    model.load_state_dict(case["state"])
    model.train()
    return fused_cel.patch(model) if patched else model


def hf_step(model, rank, world, case, backward=torch.Tensor.backward, tuple_output=False):
    """Forward and backward as transformers' Trainer runs them: num_items_in_batch is the count
    of shifted labels gathered over the ranks (Trainer._get_num_items_in_batch with the default
    average_tokens_across_devices=True), and the loss is multiplied by the number of processes
    (Trainer.compute_loss) because the gradient reduction averages over the ranks.
    tuple_output: return_dict=False, whose logits slot must be None (the patched model's)."""
    ids, labels = case["ids"][rank], case["labels"][rank]
    n = global_count(labels[..., 1:])
    out = model(input_ids=ids, labels=labels, num_items_in_batch=n, return_dict=not tuple_output)
    if tuple_output:
        assert out[1] is None, f"the logits slot of return_dict=False holds {type(out[1]).__name__}, not None"
    loss = (out[0] if tuple_output else out.loss) * world
    backward(loss)
    return loss.detach()


def single_process_step(case):
    """The reference: stock transformers, one process, the ranks' batches concatenated."""
    model = build(case, patched=False)
    opt = torch.optim.SGD(model.parameters(), lr=case["lr"])
    loss = model(input_ids=case["ids"].flatten(0, 1), labels=case["labels"].flatten(0, 1)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return loss.detach(), grads, dict(model.state_dict())


def check_against_reference(results, case, what, runs=(False, True)):
    """results[rank][patched]: the rank's loss, full gradients and full parameters after the step."""
    ref_loss, ref_grads, ref_params = single_process_step(case)
    for patched in runs:
        label = f"{what}, {'patched' if patched else 'stock'}"
        losses = torch.stack([r[patched]["loss"] for r in results])
        assert_close(losses.mean(), ref_loss, f"{label}: mean of the ranks' losses")
        for rank, r in enumerate(results):
            for name, want in ref_grads.items():
                assert_close(r[patched]["grads"][name], want, f"{label}, rank {rank}: grad of {name}")
            for name, want in ref_params.items():  # the step: compare the update, whose rounding
                got, before = r[patched]["params"][name], case["state"][name]  # is the parameters'
                atol = torch.finfo(torch.float32).eps * before.abs().max().item()
                assert_close(got - before, want - before, f"{label}, rank {rank}: update of {name}", atol)


def _hf_ddp(rank, world, case):
    results = {}
    for patched in (False, True):
        model = build(case, patched)
        opt = torch.optim.SGD(model.parameters(), lr=case["lr"])
        loss = hf_step(DDP(model), rank, world, case)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        results[patched] = {"loss": loss, "grads": grads, "params": dict(model.state_dict())}
    return results


FSDP2_VARIANTS = {
    # name: (config overrides, whether lm_head is fully_shard-ed on its own)
    "layers+root": ({}, False),
    "lm_head alone": ({}, True),
    "tied embeddings": ({"tie_word_embeddings": True}, False),
}


def _fsdp2(rank, world, cases):
    """fully_shard each decoder layer (optionally lm_head) and the root; one SGD step."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for variant, (_, head_alone) in FSDP2_VARIANTS.items():
        case, results[variant] = cases[variant], {}
        for patched in (False, True):
            model = build(case, patched)
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            if head_alone:
                fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = torch.optim.SGD(model.parameters(), lr=case["lr"])
            loss = hf_step(model, rank, world, case)
            grads, not_sharded = {}, []
            for name, p in model.named_parameters():
                if not (
                    isinstance(p, DTensor)
                    and isinstance(p.grad, DTensor)
                    and p.grad.placements == p.placements
                    and p.grad.to_local().shape == p.to_local().shape
                    and p.to_local().shape[0] < p.shape[0]
                ):
                    grad = None if p.grad is None else (type(p.grad).__name__, tuple(p.grad.shape))
                    not_sharded.append(f"{name}: {type(p).__name__} {tuple(p.shape)}, grad {grad}")
                else:
                    grads[name] = p.grad.full_tensor()
            opt.step()
            params = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in model.state_dict().items()}
            results[variant][patched] = {"loss": loss, "grads": grads, "params": params, "not_sharded": not_sharded}
    return results


FSDP1_VARIANTS = ("layers+root", "lm_head alone")


def _fsdp1(rank, world, case):
    """FullyShardedDataParallel (what accelerate's FSDP still defaults to): decoder layers as
    units, and the rest in the root unit or lm_head as a unit of its own; one SGD step."""
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    warnings.filterwarnings("ignore", category=FutureWarning)  # FSDP1 is deprecated for fully_shard

    def clean(named):
        return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in named}

    results = {}
    for variant in FSDP1_VARIANTS:
        results[variant] = {}
        for patched in (False, True):
            model = build(case, patched)

            def policy(module, recurse, nonwrapped_numel, head=model.lm_head, alone=variant == "lm_head alone"):
                return recurse or isinstance(module, LlamaDecoderLayer) or (alone and module is head)

            wrapped = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)
            opt = torch.optim.SGD(wrapped.parameters(), lr=case["lr"])
            try:
                loss = hf_step(wrapped, rank, world, case)
            except Exception:  # reported by the test, after the stock run's checks
                results[variant][patched] = {"error": traceback.format_exc(limit=-3)}
                continue
            with FSDP.summon_full_params(wrapped, with_grads=True):
                grads = clean((n, p.grad) for n, p in wrapped.named_parameters())
            opt.step()
            with FSDP.summon_full_params(wrapped):
                params = clean(wrapped.named_parameters())
            results[variant][patched] = {"loss": loss, "grads": grads, "params": params}
    return results


def _two_rank_runs(rank, world, cases):
    """All the 2-rank runs in one group; a run that raises is reported by its test."""
    runs = {"functional": _functional_ddp, "ddp": _hf_ddp, "fsdp2": _fsdp2, "fsdp1": _fsdp1}
    results = {}
    for name, run in runs.items():
        try:
            results[name] = run(rank, world, cases[name])
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    return results


@pytest.fixture(scope="module")
def two_ranks():
    seed = int.from_bytes(os.urandom(4), "little")  # before the function-scoped seed fixture
    torch.manual_seed(seed)
    print(f"two_ranks: torch.manual_seed({seed})")
    cases = {
        "functional": functional_case(2),
        "ddp": hf_case(2),
        "fsdp2": {variant: hf_case(2, **overrides) for variant, (overrides, _) in FSDP2_VARIANTS.items()},
        "fsdp1": hf_case(2),
    }
    return cases, run_group(_two_rank_runs, 2, cases)


def ranks_of(two_ranks, name):
    cases, results = two_ranks
    errors = [f"rank {rank}:\n{r[name]['error']}" for rank, r in enumerate(results) if "error" in r[name]]
    assert not errors, f"the {name} run failed:\n" + "\n".join(errors)
    return cases[name], [r[name] for r in results]


def test_functional_ddp_num_items(two_ranks):
    """The data-parallel recipe: with the global count of counted tokens as num_items,

        n = (labels != -100).sum(); torch.distributed.all_reduce(n)
        loss = fused_cel.linear_cross_entropy(hidden, lm_head.weight, labels, num_items=n) * world_size
        loss.backward()  # DDP averages the gradients over the ranks

    the gradients equal single-process training on the concatenated batch (and the ranks' losses
    average to its loss). Without num_items (per-rank means) they do not."""
    check_functional(*ranks_of(two_ranks, "functional"))


def test_functional_ddp_num_items_three_ranks():
    """The same recipe on 3 ranks (1, 5 and 9 labels ignored)."""
    case = functional_case(3)
    check_functional(case, run_group(_functional_ddp, 3, case))


def test_hf_patch_under_ddp(two_ranks):
    """Trainer's convention under DDP (num_items_in_batch = global count, loss * world size):
    one SGD step of the patched model equals the stock model's and single-process training."""
    case, results = ranks_of(two_ranks, "ddp")
    check_against_reference(results, case, "DDP")
    # Sanity: averaging the ranks' own means (no num_items_in_batch, no * world) would differ.
    grads = []
    for rank in range(2):
        model = build(case, patched=False)
        model(input_ids=case["ids"][rank], labels=case["labels"][rank]).loss.backward()
        grads.append(model.lm_head.weight.grad)
    _, ref_grads, _ = single_process_step(case)
    assert_differs(torch.stack(grads).mean(0), ref_grads["lm_head.weight"], "average of per-rank means")


@pytest.mark.parametrize("variant", FSDP2_VARIANTS)
def test_hf_patch_under_fsdp2(two_ranks, variant):
    """FSDP2 on CPU (gloo): every parameter and its gradient are sharded DTensors, and one SGD
    step of the patched model equals the stock model's and single-process training. The fused
    loss computes dW during forward (backward only scales it), and it still reaches the sharded
    parameter through FSDP2's post-backward reduce-scatter, also when lm_head is an FSDP unit of
    its own, resharded after its forward."""
    cases, results = ranks_of(two_ranks, "fsdp2")
    results = [r[variant] for r in results]
    for rank, r in enumerate(results):
        for patched in (False, True):
            assert not r[patched]["not_sharded"], f"rank {rank}, patched={patched}: {r[patched]['not_sharded']}"
    check_against_reference(results, cases[variant], f"FSDP2 {variant}")


class PatchedRunFailure(AssertionError):
    """The patched model's step raised (the stock model's, in the same run, passed its checks)."""


def check_stock_then_patched(results, case, what):
    """The stock run must pass; a patched run that raised fails with PatchedRunFailure."""
    for rank, r in enumerate(results):
        assert "error" not in r[False], f"rank {rank}, stock model under {what}:\n{r[False]['error']}"
    check_against_reference(results, case, what, runs=(False,))
    errors = [f"rank {rank}:\n{r[True]['error']}" for rank, r in enumerate(results) if "error" in r[True]]
    if errors:
        raise PatchedRunFailure(f"the patched model under {what} failed:\n" + "\n".join(errors))
    check_against_reference(results, case, what, runs=(True,))


# Both need backward to reach the head's output, as it does the stock logits: FSDP1 and ZeRO-3
# prepare a module's parameters for backward from a hook on its output (fused_cel.patch makes its
# placeholder output part of the graph for this).
@pytest.mark.parametrize("variant", ["layers+root", "lm_head alone"])
def test_hf_patch_under_fsdp1(two_ranks, variant):
    """FullyShardedDataParallel (use_orig_params=True): one SGD step of the patched model
    equals the stock model's and single-process training."""
    case, results = ranks_of(two_ranks, "fsdp1")
    check_stock_then_patched([r[variant] for r in results], case, f"FSDP1 {variant}")


# --- DeepSpeed ZeRO-3 ---------------------------------------------------------------------------


def _zero3(rank, world, case):
    # What the deepspeed launcher would set; the CPU accelerator (gloo), not a GPU's.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    # Not its shared-memory all-reduce: that op is compiled on first use (a C++ toolchain, minutes).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_config = {
        "train_micro_batch_size_per_gpu": case["ids"].shape[1],
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,  # a plain torch SGD, as in the other tests
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
        "steps_per_print": 10**9,
    }
    results = {}
    for patched in (False, True):
        model = build(case, patched)
        opt = torch.optim.SGD(model.parameters(), lr=case["lr"])
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        whole = [n for n, p in engine.module.named_parameters() if p.numel() != 0]
        assert not whole, f"ZeRO-3 left these parameters whole: {whole}"
        try:
            loss = hf_step(engine, rank, world, case, backward=engine.backward, tuple_output=patched)
        except Exception:  # reported by the test, after the stock run's checks
            results[patched] = {"error": traceback.format_exc(limit=-3)}
            continue
        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
        engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        results[patched] = {"loss": loss, "grads": grads, "params": params}
    return results


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_hf_patch_under_zero3():
    """DeepSpeed ZeRO-3 on its CPU accelerator (gloo), Trainer's convention: one SGD step of
    the patched model equals the stock model's and single-process training."""
    case = hf_case(2)
    check_stock_then_patched(run_group(_zero3, 2, case), case, "ZeRO-3")
