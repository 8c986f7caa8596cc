"""Plain torch-pruning channel pruning, the baseline DEPrune is compared with (``deprune compare``).

torch-pruning's own recipe: l2 group magnitude importance, one ratio for every prunable group (PW-conv1 /
DW hidden channels and residual streams alike), the classifier left alone.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

__all__ = ["channel_prune", "ratio_for_macs"]


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
