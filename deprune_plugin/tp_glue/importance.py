"""Importance criteria for DEPrune (torch-pruning glue)."""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch_pruning as tp

from ..core.masks import is_depthwise, tap_mask
from ..core.method.geometry import geometry_tap_scores, with_channel_floor

TAP_CRITERIA = ("magnitude", "geometry")


class DEPruneImportance(tp.importance.Importance):
    """l2 filter importance of a PW-conv2 group that also counts the depth-wise convs in it.

    For a group (torch-pruning's coupled channels), every member whose **output** channels are pruned
    contributes one score per channel: the l2 norm of its filter (Conv2d ``weight[c]``, Linear row ``c``);
    a depth-wise conv contributes the l2 norm of its kept taps (torch-pruning's
    ``GroupMagnitudeImportance`` silently skips DW convs). Each member's scores are divided by their mean,
    so a 9-tap DW filter and a 576-wide PW filter weigh the same, and averaged over members. Dispatch is by
    layer type and handler name, not function identity, so it also works for customized pruners.

    DW taps themselves are scored by :meth:`tap_scores`: ``|w|`` (the paper's magnitude criterion) or, with
    ``taps="geometry"`` (beyond the paper), ``|w|`` times the fraction of the layer's output positions at
    which the tap reads real input at the example input's resolution, so taps that only ever multiply zero
    padding score zero (:mod:`deprune_plugin.core.method.geometry`).

    Args:
        p: norm order of filter scores (2 = the paper's l2 criterion).
        taps: ``"magnitude"`` or ``"geometry"`` (see above).
        channel_floor: lift each channel's best (input-reading) tap above the rest of the layer, so every
            channel keeps one wherever BWT keeps at least one tap per channel of a range.
    """

    def __init__(self, p: float = 2.0, taps: str = "magnitude", channel_floor: bool = False) -> None:
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or p <= 0:
            raise ValueError(f"p must be a number > 0, got {p!r}")
        if taps not in TAP_CRITERIA:
            raise ValueError(f"taps must be one of {TAP_CRITERIA}, got {taps!r}")
        if not isinstance(channel_floor, bool):
            raise TypeError(f"channel_floor must be a bool, got {channel_floor!r}")
        self.p = p
        self.taps = taps
        self.channel_floor = channel_floor

    def __repr__(self) -> str:
        return f"DEPruneImportance(p={self.p}, taps={self.taps!r}, channel_floor={self.channel_floor})"

    def tap_scores(self, weight: torch.Tensor, coverage: torch.Tensor | None = None) -> torch.Tensor:
        """Score of each DW tap, shape of ``weight`` (``[C, 1, kh, kw]``).

        Args:
            weight: the DW conv's weight.
            coverage: ``[kh, kw]`` fraction of output positions at which each tap reads real input (the
                pruner passes it, from the example input); ignored by ``taps="magnitude"``, and ``None``
                (unknown geometry) falls back to the magnitude.
        """
        if self.taps == "geometry" and coverage is not None:
            scores = geometry_tap_scores(weight, coverage)
        else:
            scores = weight.detach().abs()
        return with_channel_floor(scores) if self.channel_floor else scores

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
