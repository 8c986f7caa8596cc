"""Importance criteria for DEPrune (torch-pruning glue)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp

from ..core.masks import is_depthwise, tap_mask


class DEPruneImportance(tp.importance.Importance):
    """l2 filter importance of a PW-conv2 group that also counts the depth-wise convs in it.

    For a group (torch-pruning's coupled channels), every member whose **output** channels are pruned
    contributes one score per channel: the l2 norm of its filter (Conv2d ``weight[c]``, Linear row ``c``);
    a depth-wise conv contributes the l2 norm of its kept taps (torch-pruning's
    ``GroupMagnitudeImportance`` silently skips DW convs). Each member's scores are divided by their mean,
    so a 9-tap DW filter and a 576-wide PW filter weigh the same, and averaged over members. Dispatch is by
    layer type and handler name, not function identity, so it also works for customized pruners.

    DW taps themselves are scored by :meth:`tap_scores` (``|w|``, the paper's magnitude criterion).

    Args:
        p: norm order of filter scores (2 = the paper's l2 criterion).
    """

    def __init__(self, p: float = 2.0) -> None:
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        self.p = p

    def tap_scores(self, weight: torch.Tensor) -> torch.Tensor:
        """Score of each DW tap, shape of ``weight`` (``[C, 1, kh, kw]``): ``|w|``."""
        return weight.detach().abs()

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        """Scores of the group's root channels (1-D, higher = more important), ``None`` to skip."""
        total = None
        count = 0
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            handler = getattr(dep.handler, "__name__", "")
            if not isinstance(layer, (nn.Conv2d, nn.Linear)) or handler != "prune_out_channels":
                continue
            w = layer.weight.detach()
            if is_depthwise(layer) and tap_mask(layer) is not None:
                w = w * tap_mask(layer)
            idx = torch.as_tensor(idxs, dtype=torch.long, device=w.device)
            scores = w.index_select(0, idx).flatten(1).norm(p=self.p, dim=1).float()
            mean = scores.mean()
            scores = scores / mean if mean > 0 else scores
            if total is None:
                total = torch.zeros(len(group[0].idxs), device=w.device)
            root = torch.as_tensor(group[i].root_idxs, dtype=torch.long, device=w.device)
            total.scatter_add_(0, root, scores)
            count += 1
        return None if total is None else total / count
