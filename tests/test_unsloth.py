"""unsloth's fused loss computed by fused_cel (fused_cel.integrations.unsloth), on the CPU.

unsloth pins transformers <= 5.17 and trl <= 1.15, below this project's main environment, so
scripts/test.sh runs this file in a separate one (.venv-unsloth) with FUSED_CEL_REQUIRE_UNSLOTH=1,
which makes a failed import an error; elsewhere, without unsloth, the module is skipped.

The reference is unsloth's own unsloth_fused_ce_loss on the same inputs, through both of its
paths: the default one (chunked, unsloth_zoo's fused linear kernel) and the older one
(UnslothFusedLoss, taken with target_gb, run eagerly): the loss and the gradients of the hidden
states, the head and its bias must agree within float32 rounding (torch.testing's defaults).
"""

import collections
import importlib.util
import os
import sys
import types
import warnings

import pytest
import torch

os.environ.setdefault("UNSLOTH_ALLOW_CPU", "1")  # unsloth imports and runs its loss on a CPU machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REQUIRED = os.environ.get("FUSED_CEL_REQUIRE_UNSLOTH") == "1"
if importlib.util.find_spec("unsloth") is None and not REQUIRED:
    pytest.skip(
        "unsloth is not installed here (it pins transformers<=5.17 and trl<=1.15; scripts/test.sh runs this "
        "file in .venv-unsloth)",
        allow_module_level=True,
    )
try:
    import unsloth  # noqa: F401  (first: it patches transformers, trl and peft as they import)
except Exception as error:  # an ImportError, or unsloth's own refusal of this machine
    if REQUIRED:
        raise
    pytest.skip(f"unsloth cannot be imported here: {type(error).__name__}: {error}", allow_module_level=True)

import transformers  # noqa: E402

from fused_cel.integrations import unsloth as fu  # noqa: E402

HOME = sys.modules[fu.HOME]
STOCK = HOME.unsloth_fused_ce_loss  # unsloth's, as import unsloth left it
B, T, D, V = 2, 9, 16, 40
# The keywords llama.py's forward passes (0: a transform off); the cases override some of them.
LLAMA_CALL = dict(
    trainer=None,
    mask=None,
    n_items=None,
    scaling=None,
    target_gb=None,
    torch_compile=True,
    logit_softcapping=0,
    logit_scale_multiply=0,
    logit_scale_divide=0,
    shift_labels=True,
)
# The older path: target_gb (any) leaves the chunked one; eager, as torch_compile=False.
PATHS = {"chunked": {}, "legacy": dict(target_gb=1.0, torch_compile=False)}


def _scaler(step):
    """The fp16 GradScaler unsloth's forwards pass as scaling: at step 0 (no scale tensor yet,
    get_scale() gives the initial scale) or after its first scale()."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    if step:
        scaler.scale(torch.ones(()))
    return scaler


def _trainer():
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(scaler=_scaler(1)))


# name: (inputs, keywords); a callable keyword is called per run.
CASES = {
    "llama": ({}, {}),
    "mistral (no shift_labels)": ({}, dict(shift_labels=None)),
    "pre-shifted labels": ({}, dict(shift_labels=False)),
    "n_items int": ({}, dict(n_items=11)),
    "n_items tensor": ({}, dict(n_items=torch.tensor(11))),
    "n_items 0": ({}, dict(n_items=0)),
    "n_items tensor 0": ({}, dict(n_items=torch.tensor(0))),
    "n_items per replica": ({}, dict(n_items=torch.tensor([11, 11]))),
    "softcap": ({}, dict(logit_softcapping=5.0)),
    "multiply": ({}, dict(logit_scale_multiply=2.5)),
    "divide": ({}, dict(logit_scale_divide=4.0)),
    "all transforms": ({}, dict(logit_softcapping=3.0, logit_scale_multiply=2.0, logit_scale_divide=1.5, n_items=9)),
    "scaling float": ({}, dict(scaling=1024.0)),
    "scaling 0": ({}, dict(scaling=0.0)),
    "GradScaler at step 0": ({}, dict(scaling=lambda: _scaler(0))),
    "GradScaler": ({}, dict(scaling=lambda: _scaler(1), n_items=torch.tensor(5))),
    "trainer's GradScaler": ({}, dict(trainer=_trainer)),
    "bias": (dict(bias=True), {}),
    "bias, softcap, no shift": (dict(bias=True), dict(logit_softcapping=4.0, shift_labels=False)),
    "ignore_index 7": (dict(ignore_index=7), dict(ignore_index=7)),
    "label_smoothing": ({}, dict(label_smoothing=0.1)),
    "every label ignored": (dict(ignored=True), {}),
    "hidden in bfloat16, head in float32": (dict(hidden_dtype=torch.bfloat16), {}),
}


@pytest.fixture(autouse=True)
def clean():
    """Every test starts and ends with unsloth's own function everywhere, and fresh counts."""
    fu.calls.clear()
    fu._warned.clear()
    assert not fu.installed() and not fu.rebound_modules()
    yield
    fu.uninstall()
    assert not fu.rebound_modules()


def _holders(function):
    return sorted(name for name, m in list(sys.modules.items()) if getattr(m, "__dict__", {}).get(fu.NAME) is function)


def _inputs(bias=False, ignore_index=-100, ignored=False, hidden_dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=g).to(hidden_dtype)
    weight = torch.randn(V, D, generator=g) * 0.4
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[labels == ignore_index] = (ignore_index + 1) % V
    labels[0, :3] = ignore_index  # a prompt
    labels[1, -2:] = ignore_index  # padding
    if ignored:
        labels[:] = ignore_index
    return hidden, weight, torch.randn(V, generator=g) if bias else None, labels


def _run(function, inputs, keywords, path="chunked", grad_output=0.75):
    """(loss, gradients of hidden, weight and bias) of one call like llama.py's."""
    inputs = dict(inputs)
    zero3 = inputs.pop("zero3", False)
    hidden, weight, bias, labels = (t if t is None or t.dtype == torch.int64 else t.clone().requires_grad_()
                                    for t in _inputs(**inputs))  # fmt: skip
    if zero3:
        weight.ds_id = 3  # what DeepSpeed ZeRO-3 puts on its parameters
    call = {**LLAMA_CALL, **PATHS[path], **{k: v() if callable(v) else v for k, v in keywords.items()}}
    if call["shift_labels"] is None:  # mistral.py passes no shift_labels: the default, True
        del call["shift_labels"]
    loss = function(hidden_states=hidden, lm_head_weight=weight, lm_head_bias=bias, labels=labels, **call)
    (loss * grad_output).backward()
    return [loss.detach()] + [t.grad for t in (hidden, weight, bias) if t is not None]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_matches_unsloth(case, path):
    """Each argument set unsloth's callers use: loss and gradients equal to unsloth's own."""
    if path == "legacy" and case == "scaling 0":
        pytest.skip("unsloth's older path raises in backward with scaling=0 (its default path counts 0 as 1)")
    inputs, keywords = CASES[case]
    want = _run(STOCK, inputs, keywords, path)
    fu.install()
    caller = sys.modules["unsloth.models.llama"].unsloth_fused_ce_loss  # as llama.py looks it up
    assert caller is fu.fused_ce_loss
    got = _run(caller, inputs, keywords, path)
    assert fu.calls == {"fused": 1}
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    if case == "every label ignored":
        assert got[0].item() == 0 and all(not t.any() for t in got[1:])


def test_n_items_zero_is_the_sum():
    """unsloth divides by 1 where n_items is 0 (_nonzero_count): the loss is the sum over counted tokens."""
    fu.install()
    mean = _run(fu.fused_ce_loss, {}, {})[0]
    total = _run(fu.fused_ce_loss, {}, dict(n_items=0))[0]
    counted = (_inputs()[3][:, 1:] != -100).sum()
    torch.testing.assert_close(total, mean * counted)


@pytest.mark.parametrize("budget", [None, 0.003], ids=["default plan", "dX rounded in forward"])
def test_scaling_scales_the_stored_gradients(budget):
    """fp16 training: unsloth keeps the gradients it computes in forward multiplied by the
    GradScaler's scale (so that they do not underflow) and divides the scale out in backward.
    fused_cel does the same; it matters where fused_cel rounds dX in forward (a tight
    memory_budget_mib: the low-memory plan), where a tiny gradient survives only with scaling."""
    fu.install(memory_budget_mib=budget)
    hidden, weight, _, labels = (t.half() if t is not None and t.is_floating_point() else t for t in _inputs())
    results = {}
    for n_items, scaling in ((1, None), (10**6, None), (10**6, 2.0**16)):
        h = hidden.clone().requires_grad_()
        loss = fu.fused_ce_loss(None, h, weight * 1e-3, None, labels, n_items=n_items, scaling=scaling)
        (loss * (scaling or 1.0)).backward()  # what GradScaler.scale(loss).backward() does
        results[n_items, scaling] = h.grad.float() / (scaling or 1.0)
    counted = torch.zeros(B, T, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != -100
    assert (results[1, None] != 0).all(-1).equal(counted)  # the gradient of a sum: no underflow
    assert not results[10**6, None].any()  # a million times smaller: every element underflows to 0
    torch.testing.assert_close(results[10**6, 2.0**16], results[1, None] / 10**6, rtol=2e-3, atol=1e-12)


def test_install_rebinds_every_holder_and_uninstall_restores():
    before = _holders(STOCK)
    assert len(before) > 10 and fu.SOURCE in before and "unsloth.models.llama" in before
    assert fu.install() == tuple(before)
    assert fu.installed() and fu.rebound_modules() == before
    assert _holders(STOCK) == []
    assert all(getattr(sys.modules[name], fu.NAME) is fu.fused_ce_loss for name in before)
    assert fu.install(backend="torch") == ()  # idempotent: nothing more to rebind; the options change
    assert fu._options == {"backend": "torch"}
    fu.uninstall()
    assert not fu.installed() and fu.rebound_modules() == [] and _holders(STOCK) == before
    fu.uninstall()  # nothing to do
    assert _holders(STOCK) == before


def _compiled_module(name):
    """A module like those unsloth's compiler writes (unsloth_compiled_cache): source that imports
    the loss from unsloth_zoo.loss_utils, executed into a module registered in sys.modules."""
    source = (
        "from unsloth_zoo.loss_utils import unsloth_fused_ce_loss\n"
        "def loss(self, hidden_states, labels, n_items):\n"
        "    return unsloth_fused_ce_loss(\n"
        "        trainer=None, hidden_states=hidden_states, lm_head_weight=self.lm_head.weight,\n"
        "        lm_head_bias=getattr(self.lm_head, 'bias', None), labels=labels, mask=None, n_items=n_items,\n"
        "        scaling=getattr(self, 'accelerator_scaler', None), target_gb=None, torch_compile=True,\n"
        "        logit_scale_multiply=0, logit_scale_divide=0, logit_softcapping=0, shift_labels=True,\n"
        "    )\n"
    )
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, f"<{name}>", "exec"), vars(module))
    return module


def test_modules_compiled_before_and_after_install():
    early = _compiled_module("unsloth_compiled_cache.fused_cel_test_early")
    try:
        fu.install()
        late = _compiled_module("unsloth_compiled_cache.fused_cel_test_late")
        assert early.unsloth_fused_ce_loss is fu.fused_ce_loss and late.unsloth_fused_ce_loss is fu.fused_ce_loss
        hidden, weight, bias, labels = _inputs(bias=True)
        owner = types.SimpleNamespace(lm_head=torch.nn.Linear(D, V), accelerator_scaler=_scaler(1))
        with torch.no_grad():
            owner.lm_head.weight.copy_(weight)
            owner.lm_head.bias.copy_(bias)
        got = late.loss(owner, hidden, labels, torch.tensor(8))
        assert fu.calls == {"fused": 1}
        fu.uninstall()
        assert early.unsloth_fused_ce_loss is STOCK and late.unsloth_fused_ce_loss is STOCK
        torch.testing.assert_close(got, late.loss(owner, hidden, labels, torch.tensor(8)))
    finally:
        sys.modules.pop("unsloth_compiled_cache.fused_cel_test_early", None)
        sys.modules.pop("unsloth_compiled_cache.fused_cel_test_late", None)


def _tiny_llama(**transforms):
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, **transforms,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


@pytest.mark.parametrize(
    "transforms",
    [{}, dict(final_logit_softcapping=4.0), dict(logit_scale=2.0), dict(logits_scaling=3.0)],
    ids=["plain", "softcap", "multiply", "divide"],
)
@pytest.mark.parametrize("n_items", [None, 13], ids=["mean", "num_items_in_batch"])
def test_fast_language_model_forward(transforms, n_items):
    """unsloth's Llama forward (FastLanguageModel's; unsloth.models.llama.CausalLM_fast_forward) on a
    tiny model: with fused_cel installed its loss and every parameter's gradient are unsloth's."""
    model = _tiny_llama(**transforms)
    forward = sys.modules["unsloth.models.llama"].CausalLM_fast_forward(None)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    count = {} if n_items is None else dict(num_items_in_batch=torch.tensor(n_items))
    results = []
    for install in (False, True):
        if install:
            fu.install()
        model.zero_grad()
        loss = forward(model, input_ids=ids, labels=labels, **count).loss
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    assert fu.calls == {"fused": 1}
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


def test_fused_lm_head_loss_path():
    """FastModel's forwards (unsloth_zoo's compiler, AST rewrite) call unsloth_fused_lm_head_loss,
    which looks unsloth_fused_ce_loss up in its own module: fused_cel's once installed."""
    adapter = sys.modules["unsloth_zoo.fused_losses.forward_adapter"].unsloth_fused_lm_head_loss
    hidden, weight, bias, labels = _inputs(bias=True)
    head = torch.nn.Linear(D, V)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    results = []
    for install in (False, True):
        if install:
            fu.install()
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        loss = adapter(h, head, labels, vocab_size=V, num_items_in_batch=torch.tensor(12),
                       logit_softcapping=6.0, accelerator_scaler=_scaler(1))  # fmt: skip
        loss.backward()
        results.append((loss.detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone()))
    assert fu.calls == {"fused": 1}
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


def _mask():
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0
    return mask


# name: (inputs, keywords, the reason counted)
DELEGATED = {
    "mask": ({}, dict(mask=_mask), "mask"),
    "logits_bias": ({}, dict(logits_bias=lambda: torch.randn(V)), "keyword logits_bias"),
    "an unknown keyword": ({}, dict(n_chunks=2, torch_compile=False), "keyword n_chunks"),
    "a negative softcap": ({}, dict(logit_softcapping=-5.0), "logit_softcapping < 0"),
    "a ZeRO-3 head": (dict(zero3=True), {}, "DeepSpeed ZeRO-3 head"),
}


@pytest.mark.parametrize("case", DELEGATED)
def test_delegated(case):
    """What fused_cel does not serve is unsloth's own computation, with a warning the first time
    and a count per reason."""
    inputs, keywords, why = DELEGATED[case]
    torch.manual_seed(0)
    want = _run(STOCK, inputs, keywords)
    fu.install()
    torch.manual_seed(0)  # the same logits_bias
    with pytest.warns(UserWarning, match=f"unsloth's loss computes this call \\({why}\\)"):
        got = _run(fu.fused_ce_loss, inputs, keywords)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        torch.manual_seed(0)
        _run(fu.fused_ce_loss, inputs, keywords)
    assert fu.calls == collections.Counter({f"delegated: {why}": 2})
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_refuses_an_unknown_function(monkeypatch):
    def other(trainer, hidden_states, lm_head_weight, lm_head_bias, labels, mask=None, n_items=None, **kwargs):
        raise AssertionError("not to be called")

    before = _holders(STOCK)
    for name in before:
        monkeypatch.setattr(sys.modules[name], fu.NAME, other)
    with pytest.raises(RuntimeError, match="an unknown function, so fused_cel is not installed"):
        fu.install()
    assert not fu.installed() and _holders(other) == before and not fu.rebound_modules()


def test_refuses_a_patched_loss_utils(monkeypatch):
    def wrapper(*args, **kwargs):
        return STOCK(*args, **kwargs)

    monkeypatch.setattr(sys.modules[fu.SOURCE], fu.NAME, wrapper)
    with pytest.raises(RuntimeError, match="not unsloth's function"):
        fu.install()
    assert not fu.installed() and not fu.rebound_modules()


def test_options():
    with pytest.raises(TypeError, match="unknown option"):
        fu.install(z_loss=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fu.install(chunk_size=0)
    assert not fu.rebound_modules()
    fu.install(chunk_size=5, backend="torch")  # passed on to linear_cross_entropy
    want = _run(STOCK, {}, {})
    torch.testing.assert_close(_run(fu.fused_ce_loss, {}, {}), want)


def test_no_grad_scoring():
    """Evaluation (no gradient): unsloth skips the GradScaler there; the loss is the same."""
    hidden, weight, _, labels = _inputs()
    with torch.no_grad():
        want = STOCK(None, hidden, weight, None, labels, n_items=torch.tensor(6), scaling=_scaler(1))
        fu.install()
        got = fu.fused_ce_loss(None, hidden, weight, None, labels, n_items=torch.tensor(6), scaling=_scaler(1))
    assert fu.calls == {"fused": 1} and not got.requires_grad
    torch.testing.assert_close(got, want)
