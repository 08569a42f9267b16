"""fused_cel.patch under transformers.Trainer in its ordinary setups (issue 16): a datasets.Dataset
with Trainer's column pruning, evaluation and prediction, the training forward's logits, saving
and reloading, resuming from a checkpoint, PEFT LoRA, gradient checkpointing, bf16 autocast and
label smoothing. Each test trains
a patched tiny Llama and a stock one from the same weights and data order (tests/helpers.py has
the pieces and the tolerances LOSS_RTOL / PARAM_RTOL), counts the patch's calls into fused_cel
(the fused_calls fixture) and checks the stock run made none.
"""

import copy
import json
import types

import pytest
import torch
from helpers import (
    ACCUMULATE,
    LOSS_RTOL,
    PARAM_RTOL,
    PATCH,
    VOCAB,
    assert_same_training,
    byte_windows,
    run_args,
    tiny_llama,
    train,
)

import fused_cel

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
LENGTH = 32


def labelled(windows):
    """{"input_ids", "labels"} per window; labels ignore 0-4 tokens at the start and 0, 4 or 8 at
    the end, so that the counted tokens (num_items_in_batch) differ from batch to batch."""
    items = []
    for i, ids in enumerate(windows):
        labels = ids.clone()
        labels[: i % 5] = -100
        labels[len(ids) - 4 * (i % 3) :] = -100
        items.append({"input_ids": ids, "labels": labels})
    return items


def corpus_data(n=16):
    return labelled(byte_windows([LENGTH] * n))


def run_pair(fused_calls, make_model, make_trainer):
    """Trains make_model(patched) for patched False, then True, each with make_trainer(model, name);
    returns (patched, stock) runs: losses, model, trainer, calls (into fused_cel while training)."""
    runs = {}
    for name in ("stock", "patched"):
        model = make_model(name == "patched")
        trainer = make_trainer(model, name)
        before = len(fused_calls)
        losses = train(trainer)
        runs[name] = types.SimpleNamespace(losses=losses, model=model, trainer=trainer, calls=len(fused_calls) - before)
    assert runs["stock"].calls == 0, "fused_cel ran in the stock run"
    return runs["patched"], runs["stock"]


def copies_of(init, **patch_options):
    """make_model for run_pair: a deep copy of init, patched or not."""
    return lambda patched: (
        fused_cel.patch(copy.deepcopy(init), **PATCH, **patch_options) if patched else copy.deepcopy(init)
    )


def test_datasets_dataset_with_column_pruning(tmp_path, fused_calls):
    """A datasets.Dataset with a text and a length column besides input_ids and labels, under
    Trainer's default remove_unused_columns=True: Trainer keeps the columns the forward's signature
    names, so the patched model gets the batches the stock one gets, and trains as it does."""
    datasets = pytest.importorskip("datasets")
    items = corpus_data()
    data = datasets.Dataset.from_dict(
        {
            "input_ids": [item["input_ids"].tolist() for item in items],
            "labels": [item["labels"].tolist() for item in items],
            "text": [bytes(item["input_ids"].tolist()).decode("latin-1") for item in items],
            "length": [LENGTH] * len(items),
        }
    )
    init = tiny_llama()

    def make_trainer(model, name):
        return transformers.Trainer(
            model=model, args=run_args(transformers.TrainingArguments, tmp_path / name, STEPS), train_dataset=data
        )

    patched, stock = run_pair(fused_calls, copies_of(init), make_trainer)
    assert patched.calls == STEPS * ACCUMULATE, f"fused_cel ran {patched.calls} times"
    assert_same_training(patched.losses, stock.losses, patched.model, stock.model, init)
    batch = next(iter(patched.trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}, f"Trainer passed {sorted(batch)} to the patched model"


def token_accuracy(prediction):
    """compute_metrics: next-token accuracy over the counted labels (it needs the logits)."""
    logits, labels = prediction.predictions, prediction.label_ids
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    counted = target != -100
    return {"accuracy": float((predicted == target)[counted].mean())}


def test_evaluate_and_predict(tmp_path, fused_calls):
    """Trainer.evaluate and Trainer.predict put the model in eval mode, where the patch passes every
    call to the stock forward: the stock loss and the full logits (what Trainer's compute_metrics
    and predict() need), bit-equal to the stock model's from the same weights, and fused_cel does
    not run (so evaluation saves no memory). prediction_loss_only=True goes the same stock way.
    Evaluating during training (eval_strategy="steps") switches the model to eval and back: every
    training micro-batch still goes through fused_cel, and the logged eval losses equal stock's."""
    init, data = tiny_llama(), corpus_data()
    eval_data = labelled(byte_windows([LENGTH] * 6))

    def make_trainer(model, name):
        args = run_args(
            transformers.TrainingArguments,
            tmp_path / name,
            STEPS,
            eval_strategy="steps",
            eval_steps=2,
            per_device_eval_batch_size=4,  # 6 sequences: batches of 4 and 2
        )
        return transformers.Trainer(
            model=model, args=args, train_dataset=data, eval_dataset=eval_data, compute_metrics=token_accuracy
        )

    # Before training, from the same weights: bit-equal results.
    results = {}
    for patched in (False, True):
        trainer = make_trainer(copies_of(init)(patched), "before")
        before = len(fused_calls)
        metrics = trainer.evaluate()  # compute_metrics is set: Trainer asks for the logits
        trainer.args.prediction_loss_only = True
        loss_only = trainer.evaluate()["eval_loss"]
        trainer.args.prediction_loss_only = False
        prediction = trainer.predict(eval_data)
        assert len(fused_calls) == before, "fused_cel ran in evaluation"
        results[patched] = metrics, loss_only, prediction
    (metrics, loss_only, prediction), (stock_metrics, stock_loss_only, stock_prediction) = results[True], results[False]
    for key in ("eval_loss", "eval_accuracy"):
        assert metrics[key] == stock_metrics[key], (key, metrics[key], stock_metrics[key])
    assert loss_only == stock_loss_only == metrics["eval_loss"]
    assert prediction.predictions.shape == (6, LENGTH, VOCAB), "predict() did not return the logits"
    assert (prediction.predictions == stock_prediction.predictions).all()
    assert (prediction.label_ids == stock_prediction.label_ids).all()
    assert prediction.metrics["test_loss"] == stock_prediction.metrics["test_loss"]

    # Training with evaluation every 2 steps.
    patched, stock = run_pair(fused_calls, copies_of(init), make_trainer)
    assert patched.calls == STEPS * ACCUMULATE, f"fused_cel ran {patched.calls} times: not once per micro-batch"
    assert_same_training(patched.losses, stock.losses, patched.model, stock.model, init)
    evals = [[e["eval_loss"] for e in run.trainer.state.log_history if "eval_loss" in e] for run in (patched, stock)]
    assert len(evals[0]) == len(evals[1]) == STEPS // 2
    for loss, stock_loss in zip(*evals):
        assert abs(loss - stock_loss) <= LOSS_RTOL * stock_loss, f"eval losses {evals[0]} != stock {evals[1]}"
    # After training the logits are apart by the weights' rounding: PARAM_RTOL of how far training moved them.
    after, stock_after = (run.trainer.predict(eval_data).predictions for run in (patched, stock))
    diff, moved = abs(after - stock_after).max(), abs(stock_after - stock_prediction.predictions).max()
    assert diff <= PARAM_RTOL * moved, (
        f"logits after training: patched - stock = {diff:.2e}, {diff / moved:.2e} of their move"
    )


class LogitsReadingTrainer(transformers.Trainer):
    """A Trainer subclass that reads the training forward's logits (as ones logging extra metrics do)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        self.seen.append(None if outputs.logits is None else outputs.logits.detach().clone())
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("return_logits", [False, True])
def test_training_forward_logits(tmp_path, fused_calls, return_logits):
    """In training with labels the patched forward returns logits=None by default (not computing
    them is the memory it saves); code that reads them during training needs
    fused_cel.patch(model, return_logits=True), which returns stock's logits and still takes the
    loss from fused_cel."""
    init, data = tiny_llama(), corpus_data()

    def make_trainer(model, name):
        trainer = LogitsReadingTrainer(
            model=model, args=run_args(transformers.TrainingArguments, tmp_path / name, STEPS), train_dataset=data
        )
        trainer.seen = []
        return trainer

    patched, stock = run_pair(fused_calls, copies_of(init, return_logits=return_logits), make_trainer)
    assert patched.calls == STEPS * ACCUMULATE, f"fused_cel ran {patched.calls} times"
    assert_same_training(patched.losses, stock.losses, patched.model, stock.model, init)
    seen, stock_seen = patched.trainer.seen, stock.trainer.seen
    assert len(seen) == len(stock_seen) == STEPS * ACCUMULATE
    if not return_logits:
        assert all(logits is None for logits in seen)
        return
    # The first micro-batch's are from the same weights: equal. Later ones differ by the weights' rounding
    # (at most PARAM_RTOL of their move in 4 steps, smaller than their size): PARAM_RTOL of the logits' size.
    assert torch.equal(seen[0], stock_seen[0])
    for logits, stock_logits in zip(seen, stock_seen):
        torch.testing.assert_close(logits, stock_logits, rtol=0, atol=PARAM_RTOL * stock_logits.abs().max().item())


def test_save_reload_and_resume(tmp_path, fused_calls, monkeypatch):
    """trainer.save_model() and model.save_pretrained() of a patched model write stock files: the
    trained weights, and a config.json equal to the stock run's. AutoModelForCausalLM.from_pretrained
    gives back a stock model (logits in training, fused_cel not called) with those weights; the
    patched model stays patched. Resuming from a patched run's checkpoint (a fresh patched model)
    continues that run: the same losses and weights as without the interruption."""
    import huggingface_hub.constants
    from safetensors.torch import load_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    init = tiny_llama()
    data = corpus_data()

    def make_trainer(model, name):
        args = run_args(transformers.TrainingArguments, tmp_path / name, STEPS, save_strategy="steps", save_steps=2)
        return transformers.Trainer(model=model, args=args, train_dataset=data)

    patched, stock = run_pair(fused_calls, copies_of(init), make_trainer)
    assert patched.calls == STEPS * ACCUMULATE
    assert_same_training(patched.losses, stock.losses, patched.model, stock.model, init)
    weights = {name: t.detach().clone() for name, t in patched.model.state_dict().items()}

    patched.trainer.save_model()  # to args.output_dir
    stock.trainer.save_model()
    patched.model.save_pretrained(tmp_path / "save_pretrained")
    stock_config = json.loads((tmp_path / "stock" / "config.json").read_text())
    ids = torch.stack(byte_windows([16, 16]))
    for saved in (tmp_path / "patched", tmp_path / "save_pretrained"):
        config = json.loads((saved / "config.json").read_text())
        differ = sorted(k for k in config.keys() | stock_config.keys() if config.get(k) != stock_config.get(k))
        assert not differ, f"{saved.name}/config.json differs from stock's in {differ}"
        assert not any("fused" in key for key in config)
        tensors = load_file(saved / "model.safetensors")
        assert tensors.keys() == weights.keys()
        for name, tensor in tensors.items():
            assert torch.equal(tensor, weights[name]), f"saved {name} is not the trained one"

        reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved).train()
        assert type(reloaded) is type(init)
        assert not {"forward", "_loss_function", "__deepcopy__", "_fused_cel_patch"} & reloaded.__dict__.keys()
        for name, tensor in reloaded.state_dict().items():
            assert torch.equal(tensor, weights[name]), f"reloaded {name} is not the trained one"
        before = len(fused_calls)
        out = reloaded(input_ids=ids, labels=ids)
        assert out.logits.shape == (2, 16, VOCAB) and len(fused_calls) == before, "the reloaded model is not stock"

    assert patched.model(input_ids=ids, labels=ids).logits is None and len(fused_calls) == before + 1, (
        "saving unpatched the model"
    )

    # Resume the patched run from its checkpoint at step 2, on a fresh patched model.
    resumed_model = fused_cel.patch(copy.deepcopy(init), **PATCH)
    resumed = make_trainer(resumed_model, "resumed")
    before = len(fused_calls)
    resumed.train(resume_from_checkpoint=str(tmp_path / "patched" / "checkpoint-2"))
    assert len(fused_calls) - before == (STEPS - 2) * ACCUMULATE
    losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]  # steps 1-2 from the checkpoint
    assert losses == patched.losses, f"resumed {losses} != uninterrupted {patched.losses}"
    for name, tensor in resumed_model.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0, msg=name)


# LoRA's parameters: AdamW's first step on an entry is lr * g / (|g| + eps), about lr whatever g's
# size, and lora_A's first nonzero gradient comes at step 2 (lora_B starts at zero), so an entry
# whose gradient is near zero then carries fp32 rounding into the weights as in full training; with
# 128 entries per A matrix one such entry weighs more in the norm. Measured over about 350 seeds (both
# patch orders and modules_to_save, 4 steps): at most 2.5e-3 of the move (99th percentile 2e-4,
# median 1e-6); LORA_PARAM_RTOL = 1e-2 leaves a 4x margin, a real fault moves them by about 1.
LORA_PARAM_RTOL = 1e-2


def lora_models(init, lora, order):
    """make_model for run_pair: PEFT LoRA on a copy of init, with the same LoRA initialisation in
    every model (patch() draws random numbers, so it is loaded, not seeded); patched before or after
    get_peft_model."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora)
    reference = peft.get_peft_model(copy.deepcopy(init), config)

    def make(patched):
        base = copy.deepcopy(init)
        if patched and order == "patch-then-lora":
            base = fused_cel.patch(base, **PATCH)
        model = peft.get_peft_model(base, config)
        if patched and order == "lora-then-patch":
            fused_cel.patch(model, **PATCH)
        model.load_state_dict(reference.state_dict())
        return model

    return make, reference


def lora_trainer(tmp_path):
    data = corpus_data()

    def make_trainer(model, name):
        return transformers.Trainer(
            model=model,
            # LoRA trains a few weights, and only the attention's: at 3e-3 4 steps do not always
            # lower the loss past the batches' differences; 3e-2 does (measured over 12 seeds).
            args=run_args(transformers.TrainingArguments, tmp_path / name, STEPS, learning_rate=3e-2),
            train_dataset=data,
        )

    return make_trainer


@pytest.mark.parametrize("order", ["patch-then-lora", "lora-then-patch"])
def test_peft_lora(tmp_path, fused_calls, order):
    """LoRA on q_proj and v_proj (the base model, head included, frozen), patched before or after
    get_peft_model: the loss curve and the LoRA weights match the stock LoRA run, the frozen
    weights stay as they were, and fused_cel computes every micro-batch's loss."""
    make_model, reference = lora_models(tiny_llama(), dict(target_modules=["q_proj", "v_proj"]), order)
    patched, stock = run_pair(fused_calls, make_model, lora_trainer(tmp_path))
    assert patched.calls == STEPS * ACCUMULATE, f"fused_cel ran {patched.calls} times"
    assert_same_training(
        patched.losses, stock.losses, patched.model, stock.model, reference, param_rtol=LORA_PARAM_RTOL
    )
    trainable = [name for name, p in patched.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable), trainable


@pytest.mark.parametrize("order", ["patch-then-lora", "lora-then-patch"])
def test_peft_modules_to_save_head(tmp_path, fused_calls, order):
    """LoRA on q_proj with modules_to_save=['lm_head'] (the head trained in full, through PEFT's
    trainable copy of it): the run matches stock LoRA's, patched before or after get_peft_model
    (before: PEFT deep-copies the patched head, and the copy gets a forward of its own)."""
    make_model, reference = lora_models(
        tiny_llama(), dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), order
    )
    patched, stock = run_pair(fused_calls, make_model, lora_trainer(tmp_path))
    assert patched.calls == STEPS * ACCUMULATE
    assert_same_training(
        patched.losses, stock.losses, patched.model, stock.model, reference, param_rtol=LORA_PARAM_RTOL
    )


def test_peft_lora_on_the_head_added_after_patching_is_refused():
    """Patched after get_peft_model, LoRA on lm_head is refused with a TypeError that says why
    (tests/test_hf.py); added after patching, it is refused as clearly at the first training
    forward (the patch looks at the head on every call), not deep inside PEFT."""
    peft = pytest.importorskip("peft")
    model = fused_cel.patch(tiny_llama(), **PATCH)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    ids = torch.stack(byte_windows([16, 16]))
    with pytest.raises(TypeError, match="PEFT adapter layer"):
        model(input_ids=ids, labels=ids)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing(tmp_path, fused_calls, reentrant):
    """gradient_checkpointing=True in TrainingArguments (transformers' default is non-reentrant):
    the decoder layers are recomputed in backward, the head is not, so fused_cel runs once per
    micro-batch and the run equals stock's."""
    init, data = tiny_llama(), corpus_data()

    def make_trainer(model, name):
        args = run_args(
            transformers.TrainingArguments,
            tmp_path / name,
            STEPS,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        )
        return transformers.Trainer(model=model, args=args, train_dataset=data)

    patched, stock = run_pair(fused_calls, copies_of(init), make_trainer)
    assert patched.model.is_gradient_checkpointing and stock.model.is_gradient_checkpointing
    assert patched.calls == STEPS * ACCUMULATE, f"fused_cel ran {patched.calls} times"
    assert_same_training(patched.losses, stock.losses, patched.model, stock.model, init)


# bf16 tolerances. The stock run's logits are bf16 (autocast), and the patch computes from the same
# bf16-rounded operands in its own order: the runs differ by bf16 rounding, which AdamW carries into
# the weights. Measured over 260 seeds (this test, 4 steps): losses at most 1.8e-4 apart (relative),
# parameters at most 0.22 of how far training moved them (median 0.055); a stock fp32 run differs
# from the stock bf16 one as much (12 seeds: 1e-4 .. 4e-4, 0.05 .. 0.14). BF16_LOSS_RTOL = 1e-3 leaves
# a 5x margin and still catches one miscounted token in num_items_in_batch (1e-2); BF16_PARAM_RTOL =
# 0.5 (2x) still catches a parameter that did not train (1.0).
BF16_LOSS_RTOL = 1e-3
BF16_PARAM_RTOL = 0.5


def test_bf16_autocast(tmp_path, fused_calls, monkeypatch):
    """bf16=True with use_cpu=True: Trainer trains fp32 weights under bf16 autocast. Stock's head
    returns bf16 logits; fused_cel runs inside the autocast region (so computes in bf16 too), and
    the runs agree within BF16_LOSS_RTOL / BF16_PARAM_RTOL (see above)."""
    from fused_cel.integrations import hf

    init, data = tiny_llama(), corpus_data()
    try:
        run_args(transformers.TrainingArguments, tmp_path / "probe", STEPS, bf16=True)
    except ValueError as error:
        pytest.skip(f"this transformers has no bf16 on the CPU: {error}")

    autocast = []
    counting = hf.linear_cross_entropy

    def autocast_state(*args, **kwargs):
        autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return counting(*args, **kwargs)

    monkeypatch.setattr(hf, "linear_cross_entropy", autocast_state)
    head_dtypes = []

    def make_model(patched):
        model = copies_of(init)(patched)
        if not patched:
            model.lm_head.register_forward_hook(lambda module, inputs, output: head_dtypes.append(output.dtype))
        return model

    def make_trainer(model, name):
        args = run_args(transformers.TrainingArguments, tmp_path / name, STEPS, bf16=True)
        return transformers.Trainer(model=model, args=args, train_dataset=data)

    patched, stock = run_pair(fused_calls, make_model, make_trainer)
    assert set(head_dtypes) == {torch.bfloat16}, f"the stock run's logits were {set(head_dtypes)}: no autocast"
    assert patched.calls == STEPS * ACCUMULATE and set(autocast) == {(True, torch.bfloat16)}, autocast
    assert_same_training(
        patched.losses,
        stock.losses,
        patched.model,
        stock.model,
        init,
        loss_rtol=BF16_LOSS_RTOL,
        param_rtol=BF16_PARAM_RTOL,
    )


def test_label_smoothing(tmp_path, fused_calls):
    """label_smoothing_factor in TrainingArguments: Trainer takes the labels out of the batch and
    smooths the loss from the logits itself, so the patched model, called without labels, runs the
    stock forward: the run is stock's exactly and fused_cel does not run (no memory saved). The way
    to fuse it is the patch's own option, fused_cel.patch(model, label_smoothing=0.1) with
    Trainer's label_smoothing_factor left at 0: that run matches the stock smoothed one."""
    init, data = tiny_llama(), corpus_data()

    def make_trainer(smoothing):
        def make(model, name):
            args = run_args(transformers.TrainingArguments, tmp_path / name, STEPS, label_smoothing_factor=smoothing)
            return transformers.Trainer(model=model, args=args, train_dataset=data)

        return make

    patched, stock = run_pair(fused_calls, copies_of(init), make_trainer(0.1))
    assert patched.calls == 0, "fused_cel ran, though Trainer called the model without labels"
    assert patched.losses == stock.losses
    for (name, p), stock_p in zip(patched.model.named_parameters(), stock.model.parameters()):
        assert torch.equal(p, stock_p), name

    smoothed, _ = run_pair(fused_calls, copies_of(init, label_smoothing=0.1), make_trainer(0.0))
    assert smoothed.calls == STEPS * ACCUMULATE, f"fused_cel ran {smoothed.calls} times"
    assert_same_training(smoothed.losses, stock.losses, smoothed.model, stock.model, init)
