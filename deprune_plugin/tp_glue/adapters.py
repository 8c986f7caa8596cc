"""Fix-ups for model code that caches channel counts outside its parameters.

torch-pruning slices weights, but a Python attribute that records a width (timm's ``MixedConv2d.splits``)
goes stale and the next forward fails. Each fix-up re-derives such attributes from the pruned layers; the
pruner runs them after every pruned group. Register more with :func:`register_fixup`.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

Fixup = Callable[[nn.Module], None]
_FIXUPS: list[Fixup] = []


def register_fixup(fn: Fixup) -> Fixup:
    """Add ``fn(module)``, called on every module of a model after channel pruning."""
    _FIXUPS.append(fn)
    return fn


def run_fixups(model: nn.Module) -> None:
    for m in model.modules():
        for fn in _FIXUPS:
            fn(m)


@register_fixup
def mixed_conv_splits(m: nn.Module) -> None:
    """timm ``MixedConv2d``: a ModuleDict of convs fed by ``torch.split(x, self.splits)``."""
    if isinstance(m, nn.ModuleDict) and isinstance(getattr(m, "splits", None), list):
        convs = list(m.values())
        if convs and all(isinstance(c, nn.Conv2d) for c in convs):
            m.splits = [c.in_channels for c in convs]
            m.in_channels = sum(m.splits)
            m.out_channels = sum(c.out_channels for c in convs)
