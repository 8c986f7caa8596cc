"""Plain torch-pruning channel pruning, the baseline DEPrune is compared with (``deprune compare``).

torch-pruning's own recipe: l2 group magnitude importance, one ratio for every prunable group (PW-conv1 /
DW hidden channels and residual streams alike), the classifier left alone.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

__all__ = ["channel_prune", "expanded_prune", "ratio_for_macs"]


def channel_prune(model: nn.Module, example_inputs: torch.Tensor | tuple, ratio: float,
                  ignored_layers: Sequence[nn.Module] = (), round_to: int | None = None) -> nn.Module:
    """Remove ``ratio`` of the channels of every group of ``model`` in place (``tp.pruner.MagnitudePruner``,
    ``GroupMagnitudeImportance(p=2)``, one step); returns ``model``. ``round_to``: keep channel counts a
    multiple of it (torch-pruning's ``round_to``; e.g. 8 for 16-byte fp16 vectors), None: any count."""
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if ratio == 0:
        return model
    was_training = model.training
    pruner = tp.pruner.MagnitudePruner(model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=float(ratio), ignored_layers=list(ignored_layers),
                                       round_to=round_to)
    pruner.step()
    model.train(was_training)
    return model


def expanded_prune(model: nn.Module, example_inputs: torch.Tensor, ratio: float,
                   ignored_layers: Sequence[nn.Module] = (), align: int = 8) -> nn.Module:
    """Remove ``ratio`` of every block's expanded channels (the DW channel groups that live inside one block:
    PW-conv1 outputs, DW convs, PW-conv2 inputs), least l2-important first, kept counts a multiple of
    ``align``; residual streams, taps and everything else kept. Returns ``model`` (pruned in place)."""
    from .latency_search import _block_modules, find_units
    from .pruner import DEPruner

    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    was_training = model.training
    model.eval()  # the block probe runs a forward: BN statistics must not move
    p = DEPruner(model, example_inputs, latency_budget=1.0, target="torch", dw_pruning_ratio=0.0,
                 ignored_layers=list(ignored_layers))
    inputs = (example_inputs,)
    blocks = _block_modules(model, p.structure, inputs)
    ignored = {s for m in ignored_layers for s in m.modules()}
    for u in find_units(p.DG, model, p.structure, blocks, p.importance, ignored, 1.0):
        idxs = u.order[:u.width - u.kept(ratio, align)]
        if u.block is None or not idxs:
            continue
        mod = model.get_submodule(u.name)
        p.DG.get_pruning_group(mod, p.DG.get_pruner_of_module(mod).prune_out_channels, idxs).prune()
    model.train(was_training)
    return model


def ratio_for_macs(macs_of_ratio: Callable[[float], int], target_macs: int, high: float = 0.95,
                   iterations: int = 12) -> float:
    """The channel ratio whose MACs (``macs_of_ratio(r)``, decreasing in ``r``) are closest to
    ``target_macs``, by bisection over ``[0, high]``."""
    lo, hi = 0.0, high
    best, best_gap = 0.0, abs(macs_of_ratio(0.0) - target_macs)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        macs = macs_of_ratio(mid)
        if abs(macs - target_macs) < best_gap:
            best, best_gap = mid, abs(macs - target_macs)
        if macs > target_macs:
            lo = mid
        else:
            hi = mid
    return best
