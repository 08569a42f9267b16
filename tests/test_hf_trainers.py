"""fused_cel.patch under real training loops: transformers.Trainer and TRL's SFTTrainer run a few
optimizer steps (AdamW, gradient accumulation) on a tiny Llama (random init, no downloads) over the
bundled text as byte tokens, with and without the patch, from the same weights and data order.
tests/helpers.py has the runs' pieces and says why LOSS_RTOL and PARAM_RTOL are what they are;
tests/test_trainer_matrix.py runs Trainer's other ordinary setups.
"""

import copy

import pytest
import torch
from helpers import (
    ACCUMULATE,
    LOSS_RTOL,
    PATCH,
    VOCAB,
    MapDataset,
    assert_same_training,
    byte_windows,
    run_args,
    tiny_llama,
    train,
)

import fused_cel
from fused_cel import train_demo

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "dataset, remove_unused_columns", [("list", False), ("map-style", True)], ids=["list-keep", "map-style-default"]
)
def test_trainer_training_run_matches_stock(tmp_path, fused_calls, dataset, remove_unused_columns):
    """8 optimizer steps of 2 accumulated micro-batches, uneven counted tokens per sequence. With
    Trainer's default remove_unused_columns=True it keeps the batch keys the model's forward
    signature names, so the patched forward must keep the stock signature."""
    steps = 8
    data = []
    for i, ids in enumerate(byte_windows([32] * 16)):
        labels = ids.clone()
        labels[: i % 5] = -100
        labels[32 - 4 * (i % 3) :] = -100  # 0, 4 or 8 ignored at the end too
        data.append({"input_ids": ids, "labels": labels})
    if dataset == "map-style":
        data = MapDataset(data)
    init = tiny_llama()
    runs = {}
    for name in ("stock", "patched"):
        model = copy.deepcopy(init)
        if name == "patched":
            fused_cel.patch(model, **PATCH)
        args = run_args(
            transformers.TrainingArguments, tmp_path / name, steps, remove_unused_columns=remove_unused_columns
        )
        before = len(fused_calls)
        losses = train(transformers.Trainer(model=model, args=args, train_dataset=data))
        runs[name] = losses, model, len(fused_calls) - before
    (losses, model, calls), (stock_losses, stock_model, stock_calls) = runs["patched"], runs["stock"]
    assert (calls, stock_calls) == (steps * ACCUMULATE, 0), f"fused_cel ran {calls} / {stock_calls} times"
    assert_same_training(losses, stock_losses, model, stock_model, init)


# TRL's SFTTrainer (trl 1.16). In __init__ it calls trl.trainer.utils.add_fused_lm_head(model), which
# sets model.forward to its own: with fused_lm_head=True it runs the backbone and its own chunked
# log-probability kernel on lm_head.weight; without, it calls the forward it found. Its compute_loss
# always calls model(..., fused_lm_head=True) for the loss (loss_type "nll" or "dft"; with
# compute_loss_func or label_smoothing_factor it calls the model without labels and takes the
# logits). No SFTConfig option turns this off, so fused_cel.patch never computes the loss under
# SFTTrainer's own compute_loss; it does under Trainer's compute_loss, which calls model(**inputs).


@pytest.fixture
def sft(tmp_path, monkeypatch):
    """make(model, name, trainer_loss=False) -> an SFTTrainer over 16 pre-tokenized sequences of 20-32
    tokens (padded per batch, so num_items_in_batch varies), 6 steps. trainer_loss: its compute_loss
    is Trainer's, which takes the loss the model's forward computes (there the patch computes it)."""
    trl = pytest.importorskip("trl")
    import datasets  # a dependency of trl
    import huggingface_hub.constants

    class TrainerLossSFTTrainer(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return transformers.Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no downloads, no telemetry
    data = datasets.Dataset.from_dict(
        {"input_ids": [w.tolist() for w in byte_windows([20 + i % 13 for i in range(16)])]}
    )
    tokenizer = train_demo.byte_tokenizer()

    def make(model, name, trainer_loss=False, **extra):
        args = run_args(trl.SFTConfig, tmp_path / name, 6, bf16=False, **extra)  # SFTConfig defaults to bf16
        trainer_class = TrainerLossSFTTrainer if trainer_loss else trl.SFTTrainer
        return trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer)

    return make


def test_sft_trainer_with_trainer_loss_runs_the_patch(sft, fused_calls):
    """With Trainer's compute_loss the patch computes the loss (fused_cel runs on every micro-batch)
    and the loss curve equals stock SFTTrainer's (TRL's own chunked loss)."""
    init = tiny_llama()
    stock_model = copy.deepcopy(init)
    stock_losses = train(sft(stock_model, "stock"))
    assert not fused_calls
    model = fused_cel.patch(copy.deepcopy(init), **PATCH)
    losses = train(sft(model, "patched", trainer_loss=True))
    assert len(fused_calls) == 6 * ACCUMULATE, f"fused_cel ran {len(fused_calls)} times, not once per micro-batch"
    assert_same_training(losses, stock_losses, model, stock_model, init)
    fused_cel.unpatch(model)


def test_sft_trainer_default_supersedes_the_patch(sft, fused_calls):
    """Stock SFTTrainer on a patched model: TRL's fused head computes the loss, so fused_cel never
    runs and the losses are stock's exactly; after unpatch the model is stock transformers."""
    init = tiny_llama()
    stock_losses = train(sft(copy.deepcopy(init), "stock"))
    model = fused_cel.patch(copy.deepcopy(init), **PATCH)
    losses = train(sft(model, "patched"))
    assert not fused_calls, "fused_cel ran under SFTTrainer's own loss: update the README's TRL paragraph"
    assert losses == stock_losses, f"patched {losses} != stock {stock_losses}"

    fused_cel.unpatch(model)
    reference = copy.deepcopy(init)
    reference.load_state_dict(model.state_dict())
    ids = torch.stack(byte_windows([16, 16]))
    out, want = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, VOCAB), "after unpatch the model returns its logits again"
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)


def test_sft_trainer_patch_after_construction(sft, fused_calls):
    """Patched after SFTTrainer replaced the forward: the patch wraps TRL's forward, is superseded
    all the same, and unpatch gives TRL's forward back (training goes on)."""
    model = tiny_llama()
    trainer = sft(model, "patched")
    trl_forward = model.__dict__["forward"]
    fused_cel.patch(model, **PATCH)
    losses = train(trainer)
    assert not fused_calls and losses[-1] < losses[0], f"fused_cel ran {len(fused_calls)} times; losses {losses}"
    fused_cel.unpatch(model)
    assert model.__dict__.get("forward") is trl_forward, "unpatch did not give TRL's forward back"


def test_unpatch_keeps_a_forward_replaced_after_patching(sft, fused_calls):
    """unpatch restores only what still is its own: TRL's forward, set on top, stays and trains."""
    model = fused_cel.patch(tiny_llama(), **PATCH)
    trainer = sft(model, "patched")  # SFTTrainer.__init__ sets model.forward to TRL's fused-head forward
    trl_forward = model.__dict__["forward"]
    fused_cel.unpatch(model)
    assert model.__dict__.get("forward") is trl_forward, "unpatch removed TRL's forward, set after the patch"
    assert "forward" not in model.get_output_embeddings().__dict__, "the head's forward was not restored"
    losses = train(trainer)
    assert not fused_calls and losses[-1] < losses[0], f"fused_cel ran {len(fused_calls)} times; losses {losses}"


# fused_cel.integrations.trl: fused_cel in the slot TRL's trainers score tokens through.


@pytest.fixture
def trl_kernel_calls(monkeypatch):
    """Counts the calls into TRL's own kernel (its ChunkedLogProbFunction.apply)."""
    pytest.importorskip("trl")
    from trl.kernels import chunked_logprob

    calls = []
    stock = chunked_logprob.ChunkedLogProbFunction.apply

    def counting(*args):
        calls.append(args[0].shape)
        return stock(*args)

    monkeypatch.setattr(chunked_logprob.ChunkedLogProbFunction, "apply", counting)
    return calls


def sft_metrics(trainer):
    """(loss, entropy, mean_token_accuracy) per logged step."""
    return [(e["loss"], e["entropy"], e["mean_token_accuracy"]) for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize(
    "rows, loss_type", [("all", "nll"), ("counted", "nll"), ("counted", "dft")], ids=lambda v: str(v)
)
def test_sft_trainer_with_trl_install_matches_trl(sft, trl_kernel_calls, monkeypatch, rows, loss_type):
    """install(): SFTTrainer's loss, entropy and mean_token_accuracy logs and its final weights are
    TRL's own run's to fp32 rounding, fused_cel computed every micro-batch and TRL's kernel none.
    rows="counted": TRL passes only the counted rows to the kernel, as on a GPU (it does so where
    Triton runs); there SFT's NLL takes the uniform_grad path (gradients in forward), DFT not."""
    import trl.trainer.utils as utils

    from fused_cel.integrations import trl as fused_trl

    if rows == "counted":
        monkeypatch.setattr(utils, "_use_triton", lambda device: True)
    init = tiny_llama()
    stock_model = copy.deepcopy(init)
    stock_trainer = sft(stock_model, "stock", loss_type=loss_type)
    stock_losses = train(stock_trainer)
    assert len(trl_kernel_calls) == 6 * ACCUMULATE
    model = copy.deepcopy(init)
    trainer = sft(model, "fused", loss_type=loss_type)
    before, fused_before, uniform_before = (
        len(trl_kernel_calls),
        fused_trl.calls["fused"],
        fused_trl.calls["uniform_grad"],
    )
    fused_trl.install(**PATCH)
    try:
        losses = train(trainer)
    finally:
        fused_trl.uninstall()
    assert len(trl_kernel_calls) == before, "TRL's own kernel ran with fused_cel installed"
    assert fused_trl.calls["fused"] - fused_before == 6 * ACCUMULATE
    uniform = fused_trl.calls["uniform_grad"] - uniform_before
    assert uniform == (6 * ACCUMULATE if (rows, loss_type) == ("counted", "nll") else 0), uniform
    assert_same_training(losses, stock_losses, model, stock_model, init, falls=loss_type == "nll")
    for (_, entropy, accuracy), (_, stock_entropy, stock_accuracy) in zip(
        sft_metrics(trainer), sft_metrics(stock_trainer)
    ):
        assert abs(entropy - stock_entropy) <= LOSS_RTOL * abs(stock_entropy), (entropy, stock_entropy)
        assert accuracy == stock_accuracy, (accuracy, stock_accuracy)


def test_trl_install_is_idempotent_reversible_and_refuses_an_unknown_kernel(monkeypatch):
    pytest.importorskip("trl")
    import trl.trainer.utils as utils

    from fused_cel.integrations import trl as fused_trl

    stock = utils._ChunkedLogProbFunction
    fused_trl.install(backend="torch")
    fused_trl.install(backend="torch")  # again: one wrapper, not two
    assert fused_trl.installed() and utils._ChunkedLogProbFunction.stock is stock
    fused_trl.uninstall()
    fused_trl.uninstall()
    assert utils._ChunkedLogProbFunction is stock and not fused_trl.installed()
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['softcap'\]"):
        fused_trl.install(softcap=30.0)

    class Unknown(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, temperature):
            return hidden

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", Unknown)
    with pytest.raises(RuntimeError, match=r"takes \['hidden', 'weight', 'targets', 'temperature'\].*not installed"):
        fused_trl.install()
    assert utils._ChunkedLogProbFunction is Unknown


def test_trl_install_delegates_what_it_does_not_serve(monkeypatch, trl_kernel_calls):
    """ZeRO-3 (TRL's kernel gathers the head again in its backward) goes to TRL's kernel, with a
    warning and a count; the results are TRL's."""
    pytest.importorskip("trl")
    import transformers.integrations.deepspeed as ds
    import trl.trainer.utils as utils

    from fused_cel.integrations import trl as fused_trl

    hidden, weight = torch.randn(6, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (6,))
    fused_trl.install(backend="torch")
    try:
        ours = utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.7, 4096, 5.0, 1.0, ("entropy",))
        monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: True)
        fused_trl._warned.discard("DeepSpeed ZeRO-3")
        before = fused_trl.calls["delegated: DeepSpeed ZeRO-3"]
        with pytest.warns(UserWarning, match="TRL's own kernel computes this call \\(DeepSpeed ZeRO-3\\)"):
            theirs = utils._ChunkedLogProbFunction.apply(
                hidden, weight, None, targets, 0.7, 4096, 5.0, 1.0, ("entropy",)
            )
    finally:
        fused_trl.uninstall()
    assert fused_trl.calls["delegated: DeepSpeed ZeRO-3"] == before + 1 and len(trl_kernel_calls) == 1
    for a, b in zip(ours, theirs):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def word_tokenizer():
    """train_demo.byte_tokenizer splitting text at spaces: "<3> <17>" -> ids 3, 17 (TRL's RL trainers take text)."""
    from tokenizers import pre_tokenizers

    tokenizer = train_demo.byte_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def rl_trainer(kind, model, init, tmp_path):
    """A GRPOTrainer (entropy bonus on, a stub reward) or a DPOTrainer on 8 tiny examples, 2 steps."""
    trl = pytest.importorskip("trl")
    import datasets

    words = lambda *ids: " ".join(f"<{i}>" for i in ids)  # noqa: E731
    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                  logging_steps=1, seed=0, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                  bf16=False)  # fmt: skip
    if kind == "grpo":
        data = datasets.Dataset.from_dict({"prompt": [words(i + 3, (7 * i) % 200 + 3, 5) for i in range(8)]})
        args = trl.GRPOConfig(**common, num_generations=4, max_completion_length=8, entropy_coef=0.1, beta=0.0)
        reward = lambda completions, **kw: [0.1 * len(c) for c in completions]  # noqa: E731
        return trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                               processing_class=word_tokenizer())  # fmt: skip
    data = datasets.Dataset.from_dict(
        {
            "prompt": [words(i + 3, 9) for i in range(8)],
            "chosen": [words(i + 10, 11, 12) for i in range(8)],
            "rejected": [words(i + 40, 41) for i in range(8)],
        }
    )
    return trl.DPOTrainer(model=model, ref_model=copy.deepcopy(init), args=trl.DPOConfig(**common), train_dataset=data,
                          processing_class=word_tokenizer())  # fmt: skip


@pytest.mark.parametrize("kind", ["grpo", "dpo"])
def test_rl_trainers_with_trl_install_match_trl(kind, tmp_path, monkeypatch, trl_kernel_calls):
    """GRPO with its entropy bonus (the entropy's gradient) and DPO (log-probs of policy and
    reference, mean logits, entropy): every logged number and the final weights are TRL's own
    run's to fp32 rounding, with fused_cel computing every call."""
    import huggingface_hub.constants

    from fused_cel.integrations import trl as fused_trl

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    init = tiny_llama()
    runs = {}
    for name in ("stock", "fused"):
        model = copy.deepcopy(init)
        trainer = rl_trainer(kind, model, init, tmp_path / name)
        if name == "fused":
            fused_trl.install(**PATCH)
        before, fused_before = len(trl_kernel_calls), fused_trl.calls["fused"]
        try:
            trainer.train()
        finally:
            fused_trl.uninstall()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        runs[name] = model, logs, len(trl_kernel_calls) - before, fused_trl.calls["fused"] - fused_before
    (model, logs, trl_calls, fused), (stock_model, stock_logs, stock_trl_calls, _) = runs["fused"], runs["stock"]
    assert trl_calls == 0 and fused == stock_trl_calls > 0, (trl_calls, fused, stock_trl_calls)
    for entry, stock_entry in zip(logs, stock_logs):
        for key, want in stock_entry.items():
            if isinstance(want, float) and key not in ("step_time", "train_runtime"):
                assert abs(entry[key] - want) <= LOSS_RTOL * abs(want) + 1e-6, (key, entry[key], want)
    assert_same_training([e["loss"] for e in logs], [e["loss"] for e in stock_logs], model, stock_model, init)
