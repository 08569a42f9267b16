"""TRL's trainers with fused_cel: ``fused_cel.integrations.trl.install()`` / ``uninstall()``.

TRL's SFT, DPO, KTO, GRPO and RLOO trainers all give the model a fused LM head
(``trl.trainer.utils.add_fused_lm_head``) that scores tokens through one module global,
``trl.trainer.utils._ChunkedLogProbFunction``, called as ``.apply(hidden, weight, bias, targets,
temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`` and returning
(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), None for an output not asked for.
install() puts an object with that same ``apply`` in that slot, which computes them with
fused_cel.linear_log_probs; TRL's loss, metrics (entropy, mean_token_accuracy), dft, aux loss,
PEFT and FSDP2 code run around it unchanged.

SFTTrainer's default loss ("nll", no compute_loss_func, no label smoothing) is a mean of the
log-probabilities: every counted token gets the same gradient. install() wraps
SFTTrainer.compute_loss to say so (a context variable); where TRL passes only the counted
positions (Triton devices) the slot then asks linear_log_probs for uniform_grad=True: the
gradients come from the forward pass's 3 matmuls, as for linear_cross_entropy, instead of 4 (the
promise is checked, fused_cel.op). The other trainers weight tokens differently and take the
per-token path.

What fused_cel does not serve goes to TRL's own kernel, with a warning the first time and a count
in ``calls``: ZeRO-3 (TRL's kernel gathers the partitioned head again in its backward; fused_cel's
backward, which recomputes the logits, does not), an output it does not know, hidden states and a
head of different dtypes outside autocast (TRL's cast_lm_head_to_fp32). install() refuses a TRL
whose kernel takes other arguments than the ones above.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import importlib
import importlib.metadata
import inspect
import warnings

import torch

from ..api import linear_log_probs

ARGUMENTS = (
    "hidden",
    "weight",
    "bias",
    "targets",
    "temperature",
    "chunk_size",
    "final_logit_softcapping",
    "logit_scale",
    "outputs",
)
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
OPTIONS = ("chunk_size", "memory_budget_mib", "check_labels", "backend")  # install()'s: linear_log_probs's own

calls: collections.Counter = collections.Counter()  # "fused", "uniform_grad", and "delegated: <why>" per reason
_warned: set = set()
_nll = contextvars.ContextVar("fused_cel_sft_nll", default=False)  # inside SFTTrainer's NLL compute_loss


class FusedLogProbs:
    """What install() puts in TRL's slot: TRL's kernel's ``apply``, computed by fused_cel."""

    def __init__(self, stock, options: dict):
        self.stock, self.options = stock, options

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OUTPUTS[1:]):  # fmt: skip
        why = _not_served(hidden, weight, outputs)
        if why is not None:
            calls[f"delegated: {why}"] += 1
            if why not in _warned:
                _warned.add(why)
                warnings.warn(f"fused_cel.integrations.trl: TRL's own kernel computes this call ({why})", stacklevel=2)
            return self.stock.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                    logit_scale, outputs)  # fmt: skip
        calls["fused"] += 1
        uniform = _nll.get() and torch.is_grad_enabled() and _counted_only(hidden)
        calls["uniform_grad"] += uniform
        out = linear_log_probs(
            hidden,
            weight,
            targets,
            bias,
            softcap=final_logit_softcapping,
            logit_scale=float(logit_scale),
            temperature=float(temperature),
            entropy="entropy" in outputs,
            top1="is_top1" in outputs,
            mean_logit="mean_logits" in outputs,
            log_sum_sq_probs="log_sum_sq_probs" in outputs,
            uniform_grad=uniform,
            **self.options,
        )
        return out.log_probs, out.entropy, out.log_sum_sq_probs, out.mean_logit, out.top1


def install(**options) -> None:
    """Put fused_cel in TRL's slot for every trainer (again: no change but the options).
    options: linear_log_probs's chunk_size, memory_budget_mib, check_labels, backend."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid: {list(OPTIONS)}")
    utils = importlib.import_module("trl.trainer.utils")
    current = utils._ChunkedLogProbFunction
    if isinstance(current, FusedLogProbs):
        current.options = dict(options)
        return
    forward = getattr(current, "forward", None)
    names = tuple(inspect.signature(forward).parameters)[1:] if forward is not None else ()
    if names != ARGUMENTS:
        version = importlib.metadata.version("trl")
        raise RuntimeError(
            f"fused_cel.integrations.trl: TRL {version}'s _ChunkedLogProbFunction takes {list(names)}, not "
            f"{list(ARGUMENTS)}: an unknown kernel, so fused_cel is not installed"
        )
    utils._ChunkedLogProbFunction = FusedLogProbs(current, dict(options))
    sft = _sft_trainer()
    if sft is not None and not hasattr(sft.compute_loss, "stock"):
        sft.compute_loss = _marking_nll(sft.compute_loss)


def uninstall() -> None:
    """Give TRL its own kernel back (nothing to do if fused_cel is not installed)."""
    utils = importlib.import_module("trl.trainer.utils")
    if isinstance(utils._ChunkedLogProbFunction, FusedLogProbs):
        utils._ChunkedLogProbFunction = utils._ChunkedLogProbFunction.stock
    sft = _sft_trainer()
    if sft is not None and hasattr(sft.compute_loss, "stock"):
        sft.compute_loss = sft.compute_loss.stock


def _counted_only(hidden) -> bool:
    """Whether TRL passes only the counted positions (on Triton devices); elsewhere it scores all
    of them, ignored ones with label 0, and zeroes those log-probs after: not one gradient value."""
    use_triton = getattr(importlib.import_module("trl.trainer.utils"), "_use_triton", None)
    return use_triton is not None and use_triton(hidden.device)


def _sft_trainer():
    try:
        return importlib.import_module("trl.trainer.sft_trainer").SFTTrainer
    except (ImportError, AttributeError):
        return None


def _marking_nll(stock):
    """SFTTrainer.compute_loss, run with _nll set when its loss is the plain NLL mean."""

    @functools.wraps(stock)
    def compute_loss(self, *args, **kwargs):
        nll = self.args.loss_type == "nll" and self.compute_loss_func is None and self.label_smoother is None
        token = _nll.set(nll)
        try:
            return stock(self, *args, **kwargs)
        finally:
            _nll.reset(token)

    compute_loss.stock = stock
    return compute_loss


def installed() -> bool:
    utils = importlib.import_module("trl.trainer.utils")
    return isinstance(utils._ChunkedLogProbFunction, FusedLogProbs)


def _not_served(hidden, weight, outputs) -> str | None:
    """Why fused_cel does not compute this call (None: it does)."""
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        return f"outputs {sorted(unknown)}"
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3"
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        return f"hidden states in {hidden.dtype}, the head in {weight.dtype}"
    return None
