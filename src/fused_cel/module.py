"""nn.Module wrapper of fused_cel.linear_cross_entropy."""

from __future__ import annotations

import inspect

import torch

from .functional import check_num_items, check_options, check_parallel_options, linear_cross_entropy

_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(linear_cross_entropy).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}


def check_keyword_options(options: dict) -> None:
    """Every keyword option of linear_cross_entropy in ``options`` is known and valid."""
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid: {sorted(_DEFAULTS)}")
    merged = {**_DEFAULTS, **options}
    check_num_items(merged.pop("num_items"), merged["reduction"])
    check_parallel_options(
        *(merged.pop(k) for k in ("process_group", "vocab_start", "vocab_size", "reduce_hidden_grad"))
    )
    check_options(**merged)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """``FusedLinearCrossEntropyLoss(**options)(hidden, weight, labels, bias=None)``.

    Takes the keyword options of fused_cel.linear_cross_entropy; hidden states come first.
    Options are checked here, so a bad one fails at construction, not at the first step.
    """

    def __init__(self, **options) -> None:
        super().__init__()
        check_keyword_options(options)
        self.options = dict(options)

    def forward(self, hidden, weight, labels, bias=None, *, num_items=None) -> torch.Tensor:
        """``num_items`` given here (e.g. each batch's num_items_in_batch) overrides the option."""
        options = self.options if num_items is None else {**self.options, "num_items": num_items}
        return linear_cross_entropy(hidden, weight, labels, bias, **options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
