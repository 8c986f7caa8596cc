"""Sparsity-aware parameter and MAC counting.

``tp.utils.count_ops_and_params`` counts pruned (zero) taps as work and misses Conv2d subclasses; here a
conv's MACs per sample are ``Ho * Wo * kept weights`` (kept = mask nnz for masked DW convs, all weights
otherwise) and a Linear's are ``positions * in * out``. Only convs and linears are counted (BN, activations
and pooling are cheap and vanish when folded).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from .masks import tap_mask


PARAMS_LABEL = "params (pruned DW taps not counted)"
"""How every report labels :func:`count_params` (``deprune prune``, ``deprune inspect``, ``Summary``)."""


@dataclass(frozen=True)
class Cost:
    """Per-sample MACs and parameter count of a model."""

    macs: int
    params: int


def _kept_weights(m: nn.Module) -> int:
    mask = tap_mask(m)
    return int(mask.sum()) if mask is not None else m.weight.numel()


def count_params(model: nn.Module) -> int:
    """The one parameter count of the package: all parameters minus pruned DW taps (:data:`PARAMS_LABEL`)."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        mask = tap_mask(m)
        if mask is not None:
            total -= int((~mask).sum())
    return total


@torch.no_grad()
def layer_macs(model: nn.Module, example_inputs: tuple, nonzero: bool = False) -> dict[str, int]:
    """MACs per sample of every conv and linear, by module name (only kept taps of masked DW convs:
    ``Ho * Wo * kept``). ``nonzero=True`` counts only the non-zero weights of every layer, as the layer
    sees them in its forward (so other masks, e.g. ``torch.nn.utils.prune`` or 2:4, count too). The model
    runs once in eval mode; its training flag is restored."""
    macs: dict[str, int] = {}
    batch = max(1, int(example_inputs[0].shape[0])) if isinstance(example_inputs[0], torch.Tensor) else 1

    def conv_hook(name, m, inp, out):
        kept = int(torch.count_nonzero(m.weight)) if nonzero else _kept_weights(m)
        macs[name] = macs.get(name, 0) + out.shape[-1] * out.shape[-2] * kept * out.shape[0] // batch

    def linear_hook(name, m, inp, out):
        positions = inp[0].numel() // m.in_features
        kept = int(torch.count_nonzero(m.weight)) if nonzero else m.in_features * m.out_features
        macs[name] = macs.get(name, 0) + positions * kept // batch

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(partial(conv_hook, name)))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(partial(linear_hook, name)))
    was_training = model.training
    model.eval()
    try:
        model(*example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


def count_cost(model: nn.Module, example_inputs: tuple, nonzero: bool = False) -> Cost:
    """MACs per sample (only unpruned taps, the sum of :func:`layer_macs`; ``nonzero``: only non-zero
    weights) and parameters of ``model``."""
    return Cost(macs=sum(layer_macs(model, example_inputs, nonzero).values()), params=count_params(model))
