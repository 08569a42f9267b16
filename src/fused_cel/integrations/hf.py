"""Hugging Face causal LMs: fused_cel.patch(model) / fused_cel.unpatch(model).

No model's forward is copied. The patch wraps three things on the model instance, and each
wrapper calls the stock code:

- ``model.forward``: when the model is training and labels are given, it arms the head for this
  call (labels, shift_labels, num_items_in_batch, ignore_index) and calls the stock forward;
  afterwards it puts ``None`` where the logits would be.
- ``lm_head.forward`` (the output embedding): when armed, it computes the fused loss from its
  input, the final hidden states, and returns an empty placeholder instead of the logits. The
  weight is read inside the head's own forward, where FSDP and DeepSpeed ZeRO-3 have gathered it.
- ``model.loss_function``: returns the loss the head computed; the stock forward calls it as
  usual, so whatever it does around the logits (softcap, scaling) runs on the placeholder.

Logit transforms the stock forward applies after the head are read from the model at patch time
(Gemma 2/3 ``final_logit_softcapping`` -> softcap, Cohere ``logit_scale``, Granite
``logits_scaling``); ``patch`` then checks that the stock forward transforms the head's output
exactly so, and refuses the model with a clear error if it does not.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect

import torch

from ..api import check_keywords, linear_cross_entropy
from ..backends.torch import transform

_ATTR = "_fused_cel_patch"


@dataclasses.dataclass
class _PatchState:
    options: dict  # keyword options of linear_cross_entropy
    loss_options: dict  # those patch() was given (a deep copy of the model is patched with them)
    return_logits: bool
    head: torch.nn.Module
    stock_forward: object  # the model's forward before the patch
    saved: dict = dataclasses.field(default_factory=dict)  # replaced attributes: (obj, name) -> old
    installed: dict = dataclasses.field(default_factory=dict)  # (obj, name) -> our wrapper
    active: bool = True  # False after unpatch: a wrapper still called from elsewhere passes through
    armed: dict | None = None  # this call's labels etc., set by the model forward wrapper
    loss: torch.Tensor | None = None  # the fused loss, from the head to loss_function
    placeholder: torch.Tensor | None = None


_MISSING = object()


def patch(model: torch.nn.Module, *, return_logits: bool = False, verify: bool = True, **loss_options):
    """Make ``model``'s training loss come from fused_cel; returns the model.

    loss_options: keyword options of fused_cel.linear_cross_entropy (softcap and logit_scale are
    read from the model unless given; shift, num_items and ignore_index come from each call).
    return_logits: also compute and return the logits in training (they cost their memory).
    verify: check that the stock forward transforms the head's output as the options say.
    """
    outer, model = model, _transformers_model(model)
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("this model is already patched by fused_cel; call fused_cel.unpatch(model) first")
    head = _linear_head(model)
    per_call = {"shift", "num_items", "ignore_index"} & loss_options.keys()
    if per_call:
        raise TypeError(f"{sorted(per_call)} come from each forward call (labels, shift_labels, num_items_in_batch)")
    if loss_options.get("return_token_stats"):
        raise TypeError("return_token_stats does not apply to a patched model (its loss_function returns the loss)")
    options = {**_model_logit_options(model), **loss_options}
    check_keywords(options)

    state = _PatchState(options, dict(loss_options), return_logits, head, stock_forward=model.forward)
    _patch_head(state, head)
    _replace(state, model, "forward", _model_forward(state, model))
    _replace(state, model, "_loss_function", _loss_function(state, model.loss_function))
    _replace(state, model, "__deepcopy__", _deepcopy(state, model))
    setattr(model, _ATTR, state)
    if verify:
        try:
            _verify(model, state)
        except Exception:
            unpatch(model)
            raise
    return outer


def unpatch(model: torch.nn.Module):
    """Restore the stock behaviour of a model patched by fused_cel.patch; returns the model."""
    outer, model = model, _transformers_model(model)
    state = getattr(model, _ATTR, None)
    if state is None:
        raise RuntimeError("this model is not patched by fused_cel")
    for (obj, name), value in state.saved.items():
        if obj.__dict__.get(name) is not state.installed[obj, name]:
            continue  # replaced again after the patch (TRL's SFTTrainer sets its own forward): left as is
        _put(obj, name, value)
    state.active = False
    delattr(model, _ATTR)
    return outer


def _put(obj, name, value):
    if value is _MISSING:
        delattr(obj, name)
    else:
        setattr(obj, name, value)


def _deepcopy(state, model):
    """The patched model's __deepcopy__: the copy gets a patch of its own. The wrappers close over
    this model, so copying them would leave the copy computing this model's loss."""

    def __deepcopy__(memo):
        ours = [(obj, name, fn) for (obj, name), fn in state.installed.items() if obj.__dict__.get(name) is fn]
        for obj, name, _ in ours:  # the stock attributes while the copy is made
            _put(obj, name, state.saved[obj, name])
        delattr(model, _ATTR)
        try:
            copied = copy.deepcopy(model, memo)
        finally:
            for obj, name, fn in ours:
                setattr(obj, name, fn)
            setattr(model, _ATTR, state)
        return patch(copied, return_logits=state.return_logits, verify=False, **state.loss_options)

    return __deepcopy__


def _patch_head(state, head):
    _replace(state, head, "forward", _head_forward(state, head.forward))
    _replace(state, head, "__deepcopy__", _head_deepcopy(state, head))


def _head_deepcopy(state, head):
    """The patched head's __deepcopy__: a copy whose forward is its own. PEFT's
    modules_to_save=["lm_head"] deep-copies the head into the trainable copy it then runs; a
    copied wrapper would compute that copy's logits from this head's weight."""

    def __deepcopy__(memo):
        ours = [
            (name, fn) for (obj, name), fn in state.installed.items() if obj is head and head.__dict__.get(name) is fn
        ]
        for name, _ in ours:
            _put(head, name, state.saved[head, name])
        try:
            copied = copy.deepcopy(head, memo)
        finally:
            for name, fn in ours:
                setattr(head, name, fn)
        if state.active:
            _patch_head(state, copied)
        return copied

    return __deepcopy__


def _transformers_model(model):
    """The transformers model inside a PEFT wrapper (its forward computes logits and the loss)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _linear_head(model):
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None)")
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise TypeError(
            f"the LM head of {type(model).__name__} is a PEFT adapter layer ({type(head).__name__}), whose output is "
            "not x @ weight.T: keep lm_head out of the LoRA target modules (modules_to_save=['lm_head'] is served)"
        )
    # PEFT's modules_to_save wrapper forwards to a trainable copy; head.weight resolves to it.
    inner = head.original_module if hasattr(head, "original_module") and hasattr(head, "modules_to_save") else head
    if not isinstance(inner, torch.nn.Linear):
        raise TypeError(f"the LM head of {type(model).__name__} is a {type(inner).__name__}, not a torch.nn.Linear")
    return head


def _current_head(state, model):
    """The head to take the weight from in this call: PEFT may have wrapped the patched one since
    (modules_to_save: its weight is the trainable copy's; a LoRA layer: refused); other wrappers
    (FSDP1's unit around the head) leave the patched head as it is."""
    head = model.get_output_embeddings()
    if head is state.head or not (
        hasattr(head, "lora_A") or hasattr(head, "base_layer") or hasattr(head, "modules_to_save")
    ):
        return state.head
    return _linear_head(model)


def _model_logit_options(model) -> dict:
    """softcap / logit_scale that the stock forward applies after the head."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    options = {}
    softcap = getattr(text, "final_logit_softcapping", None)
    if softcap is not None:
        options["softcap"] = float(softcap)
    scale = getattr(model, "logit_scale", None)  # Cohere: logits * logit_scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        options["logit_scale"] = float(scale)
    scaling = getattr(text, "logits_scaling", None)  # Granite: logits / logits_scaling
    if isinstance(scaling, (int, float)) and scaling:
        options["logit_scale"] = options.get("logit_scale", 1.0) / float(scaling)
    return options


def _replace(state, obj, name, value):
    state.saved[obj, name] = obj.__dict__.get(name, _MISSING)
    state.installed[obj, name] = value
    setattr(obj, name, value)


def _head_forward(state, stock_forward):
    def forward(hidden_states):
        armed, state.armed = state.armed, None
        if armed is None:
            return stock_forward(hidden_states)
        if "probe" in armed:  # _verify: return the chosen logits
            return armed["probe"]
        head = state.head
        shift_labels = armed["shift_labels"]
        target = armed["labels"] if shift_labels is None else shift_labels
        state.loss = linear_cross_entropy(
            hidden_states,
            head.weight,
            target.to(hidden_states.device),
            head.bias,
            **state.options,
            ignore_index=armed["ignore_index"],
            shift=shift_labels is None,
            num_items=armed["num_items"],
        )
        if state.return_logits:
            return stock_forward(hidden_states)
        # With a trainable head, part of the graph (loss_function adds its empty sum), so that
        # backward reaches the head's output as it does the stock logits: DeepSpeed ZeRO-3 and
        # FSDP1 prepare a module's parameters for backward from a hook on its output. Created
        # requiring grad (not requires_grad_() after): torch.compile then traces it without a
        # graph break.
        grad = torch.is_grad_enabled() and head.weight.requires_grad
        state.placeholder = hidden_states.new_empty((*hidden_states.shape[:-1], 0), requires_grad=grad)
        return state.placeholder

    return forward


def _model_forward(state, model):
    stock_forward = state.stock_forward
    signature = inspect.signature(stock_forward)

    # The stock signature, name and docstring: Trainer keeps only the batch keys the forward's
    # signature names (remove_unused_columns=True), and other tools read it too.
    @functools.wraps(stock_forward)
    def forward(*args, **kwargs):
        labels = signature.bind_partial(*args, **kwargs).arguments.get("labels")
        shift_labels = kwargs.get("shift_labels")
        if (labels is None and shift_labels is None) or not model.training or not state.active:
            return stock_forward(*args, **kwargs)
        state.head = _current_head(state, model)
        state.armed = {
            "labels": labels,
            "shift_labels": shift_labels,
            "num_items": kwargs.get("num_items_in_batch"),
            "ignore_index": kwargs.get("ignore_index", -100),
        }
        try:
            out = stock_forward(*args, **kwargs)
        finally:
            state.armed, state.loss = None, None
        placeholder, state.placeholder = state.placeholder, None
        if placeholder is None:
            return out
        if isinstance(out, tuple):
            return tuple(None if t is placeholder else t for t in out)
        out["logits"] = None
        return out

    return forward


def _loss_function(state, stock_loss_function):
    def loss_function(*args, **kwargs):
        if state.loss is None:  # not armed: eval with labels, or the stock path in verify
            return stock_loss_function(*args, **kwargs)
        loss, state.loss = state.loss, None
        logits = kwargs["logits"] if "logits" in kwargs else (args[0] if args else None)
        if isinstance(logits, torch.Tensor) and logits.numel() == 0 and state.placeholder is not None:
            # The placeholder as the model sees it: hooks on the head (DeepSpeed's) may have
            # replaced the head's output by another tensor object; this one goes to the output.
            state.placeholder = logits
            if logits.requires_grad:
                loss = loss + logits.sum()  # + 0.0 exactly, and backward reaches the head's output
        return loss

    return loss_function


def _verify(model, state):
    """The stock forward's transform of the head's output is the one the options describe.

    The armed head returns chosen logits z (std 10, so a softcap shows) instead of computing
    them; the stock forward applies whatever it applies after the head, and the result must be
    softcap * tanh(logit_scale * z / softcap) (or logit_scale * z).
    """
    head = state.head
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = min(head.weight.shape[0], getattr(text_config, "vocab_size", head.weight.shape[0]))
    ids = torch.randint(0, vocab, (1, 8), device=head.weight.device)
    z = torch.randn(1, 8, head.weight.shape[0], device=head.weight.device) * 10
    softcap, scale = state.options.get("softcap"), state.options.get("logit_scale", 1.0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            state.armed = {"probe": z.to(head.weight.dtype)}
            got = state.stock_forward(input_ids=ids).logits.float()
    finally:
        state.armed = None
        model.train(was_training)
    want = transform(z.to(head.weight.dtype).float(), scale, softcap)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item()):
        raise ValueError(
            f"fused_cel cannot serve {type(model).__name__}: its forward does not turn the LM head's output z "
            f"into softcap * tanh(logit_scale * z / softcap) with softcap={softcap}, logit_scale={scale} "
            "(pass softcap= / logit_scale= if you know its transform)"
        )
