"""unsloth with fused_cel: ``fused_cel.integrations.unsloth.install()`` / ``uninstall()``.

unsloth's training forwards (FastLanguageModel's Llama, Mistral, Qwen, Gemma, ... forwards; the
forwards unsloth_zoo's compiler writes for FastModel; ``unsloth_fused_lm_head_loss``) compute the
loss of a batch with labels through one function, ``unsloth_fused_ce_loss(trainer, hidden_states,
lm_head_weight, lm_head_bias, labels, mask=None, n_items=None, scaling=None, target_gb=None,
torch_compile=True, overwrite=False, shift_labels=True, **kwargs)``, defined in
``unsloth_zoo.fused_losses.cross_entropy_loss``. Every caller looks it up as a module global at
call time; ``import unsloth`` binds it in about 17 modules, and the modules unsloth's compiler
writes later import it from ``unsloth_zoo.loss_utils``. There is no supported hook, so install()
rebinds that name, in every module in sys.modules that holds unsloth's function, to
``fused_ce_loss``: the same signature, computed by fused_cel.linear_cross_entropy. Modules
compiled afterwards import ours from ``unsloth_zoo.loss_utils``. uninstall() puts unsloth's
function back wherever ours is bound.

The arguments, as unsloth reads them:
    hidden_states      cast to the head's dtype (and device), as unsloth does
    labels             to the head's device; shift_labels=True -> shift=True (next token)
    lm_head_bias       bias
    n_items            num_items: None -> the number of counted tokens; 0 -> 1, as unsloth
                       (_nonzero_count): the loss is then the sum; a tensor of several elements
                       (DataParallel) -> its first
    scaling            the fp16 GradScaler (or its scale; trainer.accelerator.scaler wins when a
                       trainer is given): unsloth multiplies the gradients it stores in forward by
                       the scale and divides it out in backward, so that fp16 gradients do not
                       underflow; the loss and the gradients it returns are unscaled. fused_cel
                       does the same with num_items / scale and the loss / scale. 0 or None: 1.
    logit_scale_multiply m, logit_scale_divide d -> logit_scale = m / d (0 or None: off)
    logit_softcapping  softcap (0 or None: off)
    ignore_index, label_smoothing (keywords) -> the same options
    target_gb, torch_compile, overwrite: unsloth's memory and compile knobs; fused_cel plans its
        own memory (install(memory_budget_mib=...) sets a budget), so they change nothing.

What fused_cel does not serve goes to unsloth's own function, with a warning the first time and
a count in ``calls["delegated: <why>"]``: ``mask`` (unsloth's two paths disagree on it without
the shift), ``logits_bias`` and any other keyword, a shift_labels that is not a bool, a softcap
< 0, a non-finite option, a head not in float16/bfloat16/float32, a bias of another dtype,
labels not shaped like the hidden states' leading dims, a DeepSpeed ZeRO-3 head, and arguments
of types unsloth's callers do not pass. install() refuses (RuntimeError, nothing changed) an
unsloth whose function takes other parameters than the ones above.
"""

from __future__ import annotations

import collections
import importlib.metadata
import inspect
import math
import numbers
import sys
import warnings

import torch

from ..api import check_keywords, linear_cross_entropy

NAME = "unsloth_fused_ce_loss"
HOME = "unsloth_zoo.fused_losses.cross_entropy_loss"  # where unsloth defines it
SOURCE = "unsloth_zoo.loss_utils"  # where the modules unsloth compiles import it from
_EMPTY = inspect.Parameter.empty
# unsloth_fused_ce_loss's parameters: (name, default); then **kwargs.
PARAMETERS = (
    ("trainer", _EMPTY),
    ("hidden_states", _EMPTY),
    ("lm_head_weight", _EMPTY),
    ("lm_head_bias", _EMPTY),
    ("labels", _EMPTY),
    ("mask", None),
    ("n_items", None),
    ("scaling", None),
    ("target_gb", None),
    ("torch_compile", True),
    ("overwrite", False),
    ("shift_labels", True),
)
KEYWORDS = ("logit_softcapping", "logit_scale_multiply", "logit_scale_divide", "ignore_index", "label_smoothing")
OPTIONS = ("chunk_size", "memory_budget_mib", "check_labels", "backend")  # install()'s: linear_cross_entropy's own
HEADS = (torch.float16, torch.bfloat16, torch.float32)

calls: collections.Counter = collections.Counter()  # "fused", and "delegated: <why>" per reason
_warned: set = set()
_stock = None  # unsloth's function while fused_cel is installed
_options: dict = {}


def fused_ce_loss(
    trainer,
    hidden_states,
    lm_head_weight,
    lm_head_bias,
    labels,
    mask=None,
    n_items=None,
    scaling=None,
    target_gb=None,
    torch_compile=True,
    overwrite=False,
    shift_labels=True,
    **kwargs,
):
    """What install() binds in unsloth's modules: unsloth_fused_ce_loss, computed by fused_cel."""
    stock = _stock
    why = _not_served(trainer, hidden_states, lm_head_weight, lm_head_bias, labels, mask, n_items, scaling,
                      shift_labels, kwargs)  # fmt: skip
    if why is not None or stock is None:
        if stock is None:  # called through a reference kept across uninstall(): unsloth's is back
            stock = getattr(sys.modules[HOME], NAME)
            why = why or "not installed"
        calls[f"delegated: {why}"] += 1
        if why not in _warned and not torch.compiler.is_compiling():
            _warned.add(why)
            warnings.warn(f"fused_cel.integrations.unsloth: unsloth's loss computes this call ({why})", stacklevel=2)
        return stock(trainer, hidden_states, lm_head_weight, lm_head_bias, labels, mask=mask, n_items=n_items,
                     scaling=scaling, target_gb=target_gb, torch_compile=torch_compile, overwrite=overwrite,
                     shift_labels=shift_labels, **kwargs)  # fmt: skip
    calls["fused"] += 1
    device = lm_head_weight.device
    hidden = hidden_states.to(device=device, dtype=lm_head_weight.dtype)
    labels = labels.to(device)
    ignore_index = kwargs.get("ignore_index", -100)
    multiply = _off(kwargs.get("logit_scale_multiply"))
    divide = _off(kwargs.get("logit_scale_divide"))
    softcap = _off(kwargs.get("logit_softcapping"))
    scale = _scale(trainer, scaling, device) if torch.is_grad_enabled() else None
    num_items = _num_items(n_items, device)
    if scale is not None:  # num_items / scale: the loss and the gradients stored in forward are scaled
        if num_items is None:
            targets = labels[..., 1:] if shift_labels else labels
            num_items = (targets != ignore_index).sum().clamp(min=1)
        num_items = torch.as_tensor(num_items, dtype=torch.float32, device=device) / scale
    loss = linear_cross_entropy(
        hidden,
        lm_head_weight,
        labels,
        lm_head_bias,
        ignore_index=ignore_index,
        label_smoothing=float(kwargs.get("label_smoothing") or 0.0),
        softcap=softcap,
        logit_scale=(multiply or 1.0) / (divide or 1.0),
        shift=shift_labels,
        num_items=num_items,
        **_options,
    )
    return loss if scale is None else loss / scale  # backward: grad_output / scale times the scaled gradients


def install(**options) -> tuple[str, ...]:
    """Bind fused_cel in every module that holds unsloth_fused_ce_loss (again: those bound since, and
    the options); after ``import unsloth``. options: linear_cross_entropy's chunk_size,
    memory_budget_mib, check_labels, backend. Returns the names of the modules rebound now."""
    global _stock, _options
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid: {list(OPTIONS)}")
    check_keywords(options)
    home, source = sys.modules.get(HOME), sys.modules.get(SOURCE)
    if home is None or source is None:
        raise RuntimeError("fused_cel.integrations.unsloth: import unsloth before install()")
    current = getattr(home, NAME, None)
    stock = _stock if current is fused_ce_loss else current
    if stock is None or not _known(stock):
        raise RuntimeError(
            f"fused_cel.integrations.unsloth: unsloth_zoo {_version()}'s {NAME} takes {_describe(stock)}, not "
            f"{_describe(fused_ce_loss)}: an unknown function, so fused_cel is not installed"
        )
    if getattr(source, NAME, None) not in (stock, fused_ce_loss):
        raise RuntimeError(
            f"fused_cel.integrations.unsloth: {SOURCE}.{NAME} is not unsloth's function (patched by something "
            "else?): the modules unsloth compiles would not get fused_cel, so it is not installed"
        )
    _stock, _options = stock, dict(options)
    rebound = _rebind(stock, fused_ce_loss)
    return tuple(rebound)


def uninstall() -> None:
    """Give every module that holds fused_cel's function unsloth's own back (nothing to do if
    fused_cel is not installed)."""
    global _stock
    if _stock is None:
        return
    _rebind(fused_ce_loss, _stock)
    _stock = None


def installed() -> bool:
    source = sys.modules.get(SOURCE)
    return _stock is not None and source is not None and getattr(source, NAME, None) is fused_ce_loss


def rebound_modules() -> list[str]:
    """The names of the modules whose unsloth_fused_ce_loss is fused_cel's now."""
    return sorted(name for name, globals_ in _module_globals() if globals_.get(NAME) is fused_ce_loss)


def _module_globals():
    for name, module in list(sys.modules.items()):
        try:
            globals_ = vars(module)
        except TypeError:  # None or an object without a __dict__
            continue
        yield name, globals_


def _rebind(old, new) -> list[str]:
    names = []
    for name, globals_ in _module_globals():
        if globals_.get(NAME) is old:
            setattr(sys.modules[name], NAME, new)
            names.append(name)
    return sorted(names)


def _known(function) -> bool:
    """Whether ``function`` takes exactly PARAMETERS and **kwargs (annotations aside)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    if len(parameters) != len(PARAMETERS) + 1 or parameters[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        return False
    return all(
        p.name == name and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default == default
        for p, (name, default) in zip(parameters, PARAMETERS)
    )


def _describe(function) -> str:
    try:
        return f"({', '.join(inspect.signature(function).parameters)})"
    except (TypeError, ValueError):
        return repr(function)


def _version() -> str:
    try:
        return importlib.metadata.version("unsloth_zoo")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _off(value):
    """unsloth's logit options: None and 0 mean off (None here)."""
    return None if value is None or value == 0 else float(value)


def _scaler(trainer, scaling):
    """unsloth's choice: the trainer's accelerator's GradScaler, if any, else ``scaling``."""
    if trainer is not None:
        scaler = trainer.accelerator.scaler
        if scaler is not None:
            return scaler
    return scaling


def _scale(trainer, scaling, device):
    """The loss scale as a float or a 0-dim float32 tensor on ``device`` (no host sync); None for 1."""
    scaling = _scaler(trainer, scaling)
    if hasattr(scaling, "get_scale"):  # a GradScaler: its scale tensor, else (step 0, none yet) its initial scale
        if not getattr(scaling, "is_enabled", lambda: True)():
            return None
        tensor = getattr(scaling, "_scale", None)
        scaling = tensor if isinstance(tensor, torch.Tensor) else scaling.get_scale()
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.detach().reshape(()).to(device=device, dtype=torch.float32)
        return torch.where(scaling == 0, torch.ones_like(scaling), scaling)  # 0 counts as 1, as unsloth
    if scaling is None or scaling == 0 or scaling == 1:
        return None
    return float(scaling)


def _num_items(n_items, device):
    """linear_cross_entropy's num_items for unsloth's n_items (0 counts as 1, as unsloth)."""
    if isinstance(n_items, torch.Tensor):
        n = n_items.detach().reshape(-1)[0].to(device=device, dtype=torch.float32)
        return torch.where(n == 0, torch.ones_like(n), n)
    if n_items is None:
        return None
    return n_items if n_items != 0 else 1


def _not_served(trainer, hidden, weight, bias, labels, mask, n_items, scaling, shift_labels, kwargs) -> str | None:
    """Why fused_cel does not compute this call (None: it does)."""
    unknown = sorted(set(kwargs) - set(KEYWORDS) - ({"logits_bias"} if kwargs.get("logits_bias") is None else set()))
    if unknown:
        return f"keyword {', '.join(unknown)}"
    if mask is not None:
        return "mask"
    if not isinstance(shift_labels, bool):
        return f"shift_labels of type {type(shift_labels).__name__}"
    for name in ("logit_scale_multiply", "logit_scale_divide", "logit_softcapping"):
        value = kwargs.get(name)
        if value is not None and not (_real(value) and math.isfinite(value)):
            return f"{name} of type {type(value).__name__}" if not _real(value) else f"{name} not finite"
    if (kwargs.get("logit_softcapping") or 0) < 0:
        return "logit_softcapping < 0"
    ignore_index = kwargs.get("ignore_index", -100)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        return f"ignore_index of type {type(ignore_index).__name__}"
    smoothing = kwargs.get("label_smoothing")
    if smoothing is not None and not (_real(smoothing) and 0 <= smoothing <= 1):
        return "label_smoothing not in [0, 1]"
    if isinstance(n_items, torch.Tensor):
        if n_items.numel() == 0:
            return "n_items with no element"
    elif n_items is not None and not (_real(n_items) and 0 <= n_items < math.inf):
        return "n_items not a count" if _real(n_items) else f"n_items of type {type(n_items).__name__}"
    if trainer is not None and not hasattr(getattr(trainer, "accelerator", None), "scaler"):
        return "a trainer without accelerator.scaler"
    chosen = _scaler(trainer, scaling)
    if isinstance(chosen, torch.Tensor):
        if chosen.numel() != 1:
            return "scaling of several elements"
    elif not (chosen is None or hasattr(chosen, "get_scale") or (_real(chosen) and math.isfinite(chosen))):
        return "scaling not finite" if _real(chosen) else f"scaling of type {type(chosen).__name__}"
    for name, t in (("hidden_states", hidden), ("lm_head_weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            return f"{name} of type {type(t).__name__}"
    if bias is not None and not isinstance(bias, torch.Tensor):
        return f"lm_head_bias of type {type(bias).__name__}"
    if hasattr(weight, "ds_id"):
        return "DeepSpeed ZeRO-3 head"
    if weight.dtype not in HEADS or weight.dim() != 2:
        return f"head of {weight.dtype} [{', '.join(map(str, weight.shape))}]"
    if bias is not None and bias.dtype != weight.dtype:
        return f"bias in {bias.dtype}, the head in {weight.dtype}"
    if not hidden.is_floating_point() or labels.dtype not in (torch.int64, torch.int32):
        return f"hidden states in {hidden.dtype}, labels in {labels.dtype}"
    if hidden.dim() < 2 or labels.shape != hidden.shape[:-1]:
        return "labels not of the hidden states' leading shape"
    return None
