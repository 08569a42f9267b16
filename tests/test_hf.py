"""fused_cel.patch on tiny Hugging Face causal LMs built from configs (random weights, no
downloads): loss and every parameter's gradient equal to the stock model's."""

import copy
import inspect

import pytest
import torch

import fused_cel

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(num_key_value_heads=2, head_dim=16, final_logit_softcapping=5.0),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(num_key_value_heads=2, head_dim=16, final_logit_softcapping=5.0),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(num_key_value_heads=2, logit_scale=0.5)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(num_key_value_heads=2, logits_scaling=4.0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}


def tiny_model(family):
    config_name, model_name, extra = FAMILIES[family]
    if extra is None:  # GPT-2 names its sizes differently; tied embeddings
        config = transformers.GPT2Config(
            vocab_size=300, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
    else:
        config = getattr(transformers, config_name)(**COMMON, **extra)
    return getattr(transformers, model_name)(config).train()


def batch(pad=True):
    ids = torch.randint(0, 300, (2, 12))
    labels = ids.clone()
    if pad:
        labels[0, :4] = -100
    return ids, labels


def compare(stock, patched, **kwargs):
    """Run both with the same inputs; assert equal loss and gradients; return patched output."""
    out_s = stock(**kwargs)
    out_s.loss.backward()
    out_p = patched(**kwargs)
    out_p.loss.backward()
    torch.testing.assert_close(out_p.loss, out_s.loss, rtol=1e-5, atol=1e-6)
    grads_s = {n: p.grad for n, p in stock.named_parameters()}
    for name, p in patched.named_parameters():
        if grads_s[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, grads_s[name], rtol=1e-4, atol=1e-6, msg=name)
    return out_p


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_stock(family):
    stock = tiny_model(family)
    patched = fused_cel.patch(copy.deepcopy(stock))
    ids, labels = batch()
    out = compare(stock, patched, input_ids=ids, labels=labels)
    assert out.logits is None  # not computed in training


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_shift_labels_and_num_items(family):
    stock = tiny_model(family)
    patched = fused_cel.patch(copy.deepcopy(stock))
    ids, labels = batch()
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    compare(stock, patched, input_ids=ids, labels=labels, shift_labels=shift)
    compare(stock, patched, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(37))


def test_return_dict_false_and_eval_and_unpatch():
    stock = tiny_model("llama")
    patched = fused_cel.patch(copy.deepcopy(stock))
    ids, labels = batch()
    loss, logits = patched(input_ids=ids, labels=labels, return_dict=False)[:2]
    assert logits is None and loss.ndim == 0
    patched.eval()  # without training, stock behaviour: logits, and the stock loss with labels
    out = patched(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 12, 300)
    fused_cel.unpatch(patched).train()
    assert patched(input_ids=ids, labels=labels).logits.shape == (2, 12, 300)
    assert "forward" not in patched.__dict__ and "_loss_function" not in patched.__dict__


def test_deepcopy_of_a_patched_model_has_its_own_patch():
    """A deep copy computes its own loss (the wrappers close over their model: copied as they are,
    the copy would silently compute the original's loss); both can be unpatched."""
    stock = tiny_model("llama")
    patched = fused_cel.patch(copy.deepcopy(stock))
    copied, stock_copy = copy.deepcopy(patched), copy.deepcopy(stock)
    with torch.no_grad():  # make the copies differ from the originals
        for model in (copied, stock_copy):
            model.lm_head.weight.mul_(3.0)
    ids, labels = batch()
    compare(stock_copy, copied, input_ids=ids, labels=labels)
    compare(stock, patched, input_ids=ids, labels=labels)
    for model in (copied, patched):
        fused_cel.unpatch(model)
        assert "forward" not in model.__dict__ and "__deepcopy__" not in model.__dict__


def test_patched_forward_keeps_the_stock_signature():
    """Trainer keeps the batch keys the forward's signature names (remove_unused_columns)."""
    stock = tiny_model("llama")
    patched = fused_cel.patch(copy.deepcopy(stock))
    assert inspect.signature(patched.forward) == inspect.signature(stock.forward)


def test_return_logits_option():
    stock = tiny_model("llama")
    patched = fused_cel.patch(copy.deepcopy(stock), return_logits=True)
    ids, labels = batch()
    out = compare(stock, patched, input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 12, 300)


def test_frozen_head_gets_no_gradient():
    stock = tiny_model("llama")
    patched = fused_cel.patch(copy.deepcopy(stock))
    for model in (stock, patched):
        model.lm_head.weight.requires_grad_(False)
    ids, labels = batch()
    compare(stock, patched, input_ids=ids, labels=labels)
    assert patched.lm_head.weight.grad is None


def test_refuses_what_it_cannot_serve():
    model = tiny_model("gemma2")
    with pytest.raises(ValueError, match="cannot serve Gemma2ForCausalLM: its forward does not turn"):
        fused_cel.patch(model, softcap=None)  # the stock forward softcaps: a mismatch is caught
    assert "forward" not in model.__dict__  # refused patches leave the model as it was
    fused_cel.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        fused_cel.patch(model)
    with pytest.raises(TypeError, match="come from each forward call"):
        fused_cel.patch(tiny_model("llama"), shift=True)
    with pytest.raises(TypeError, match=r"Module has no output embedding \(get_output_embeddings\(\) is None\)"):
        fused_cel.patch(torch.nn.Module())
    odd = tiny_model("llama")
    odd.set_output_embeddings(torch.nn.Sequential(odd.lm_head))
    with pytest.raises(TypeError, match="the LM head of LlamaForCausalLM is a Sequential, not a torch.nn.Linear"):
        fused_cel.patch(odd)


def test_gradient_checkpointing():
    stock = tiny_model("llama")
    patched = fused_cel.patch(copy.deepcopy(stock))
    for model in (stock, patched):
        model.gradient_checkpointing_enable()
    ids, labels = batch()
    compare(stock, patched, input_ids=ids, labels=labels)


def test_compiled_model_and_generate():
    """torch.compile of the patched model: no graph break, trains as stock; generate after patching
    is stock's."""
    stock = tiny_model("llama")
    patched = fused_cel.patch(copy.deepcopy(stock))
    ids, labels = batch()
    explained = torch._dynamo.explain(patched)(input_ids=ids, labels=labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = [torch.compile(m, backend="aot_eager") for m in (stock, patched)]
    compare(*compiled, input_ids=ids, labels=labels)
    prompt = ids[:1, :4]
    tokens = [m.eval().generate(prompt, max_new_tokens=5, do_sample=False) for m in (stock, patched)]
    assert torch.equal(tokens[0], tokens[1])


peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    "lora", [dict(target_modules=["q_proj", "v_proj"]), dict(target_modules=["q_proj"], modules_to_save=["lm_head"])]
)
def test_peft_lora(lora):
    """LoRA with a frozen head (no dW work), and with the head trained via modules_to_save."""
    base = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora)
    stock = peft.get_peft_model(copy.deepcopy(base), config)
    patched = fused_cel.patch(peft.get_peft_model(copy.deepcopy(base), config))
    patched.load_state_dict(stock.state_dict())  # the same LoRA initialisation
    ids, labels = batch()
    compare(stock, patched, input_ids=ids, labels=labels)
    head = patched.get_base_model().lm_head
    if "modules_to_save" in lora:
        assert head.modules_to_save["default"].weight.grad is not None
    else:
        assert head.weight.grad is None
    fused_cel.unpatch(patched)


def test_peft_lora_on_the_head_is_refused():
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TypeError, match="is a PEFT adapter layer .*keep lm_head out of the LoRA target modules"):
        fused_cel.patch(model)


def test_trainer_gradient_accumulation(tmp_path):
    """4 micro-batches of uneven token counts through Trainer: one optimizer step equals stock's
    (Trainer's num_items_in_batch normalisation comes out exactly as without the patch)."""
    pytest.importorskip("accelerate")
    data = []
    for i in range(8):
        ids, labels = torch.randint(0, 300, (12,)), None
        labels = ids.clone()
        labels[: 1 + i] = -100  # a different number of counted tokens in every sequence
        data.append({"input_ids": ids, "labels": labels})
    base = tiny_model("llama")
    results = []
    for name, model in (("stock", copy.deepcopy(base)), ("patched", fused_cel.patch(copy.deepcopy(base)))):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            max_steps=1,
            learning_rate=0.1,
            optim="sgd",
            lr_scheduler_type="constant",
            report_to=[],
            use_cpu=True,
            remove_unused_columns=False,
            save_strategy="no",
            seed=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        loss = trainer.train().training_loss
        results.append((loss, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_s, params_s), (loss_p, params_p) = results
    assert loss_p == pytest.approx(loss_s, rel=1e-5)
    moved = 0
    for n, p in params_s.items():
        torch.testing.assert_close(params_p[n], p, rtol=1e-5, atol=1e-7, msg=n)
        moved += not torch.equal(p, dict(base.named_parameters())[n])
    assert moved > 0  # the step did something
