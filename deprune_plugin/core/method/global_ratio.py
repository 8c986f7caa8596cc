"""Per-layer DW targets from one model-wide magnitude threshold (``global_pruning=True``).

Scores are divided by each layer's mean so layers of different scale compete fairly (torch-pruning's
"mean" normalizer); each layer is capped at ``floor(max_ratio * n_l)`` pruned taps. The threshold is the
smallest one whose capped count reaches ``floor(ratio * total)``, found by bisection over sorted scores.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def global_layer_ratios(scores: Sequence[torch.Tensor], ratio: float, max_ratio: float = 1.0) -> list[float]:
    """Per-layer pruning ratios whose weight-weighted mean is the model-wide ``ratio``.

    Args:
        scores: tap scores of each DW layer (any shape).
        ratio: model-wide fraction of DW taps to prune, in ``[0, 1)``.
        max_ratio: cap of any single layer's ratio, in ``(0, 1]``.

    Returns:
        ``pruned_l / n_l`` for each layer (apply with floor rounding afterwards).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if not 0.0 < max_ratio <= 1.0:
        raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio!r}")
    if not scores:
        return []
    flat = []
    for s in scores:
        f = s.detach().reshape(-1).to(torch.float64)
        mean = f.mean()
        flat.append(torch.sort(f / mean if mean > 0 else f).values)
    sizes = [f.numel() for f in flat]
    caps = [math.floor(max_ratio * n) for n in sizes]
    target = min(math.floor(ratio * sum(sizes)), sum(caps))

    def counts(thr: float) -> list[int]:
        return [min(int(torch.searchsorted(f, thr, right=True)), c) for f, c in zip(flat, caps)]

    candidates = torch.unique(torch.cat(flat))
    lo, hi = 0, candidates.numel() - 1
    if target == 0:
        return [0.0] * len(flat)
    while lo < hi:  # smallest threshold reaching the target
        mid = (lo + hi) // 2
        if sum(counts(float(candidates[mid]))) >= target:
            hi = mid
        else:
            lo = mid + 1
    per_layer = counts(float(candidates[lo]))
    # Ties at the threshold can overshoot: give the excess back from the layers that hold ties.
    excess = sum(per_layer) - target
    for i in range(len(per_layer) - 1, -1, -1):
        if excess <= 0:
            break
        below = min(int(torch.searchsorted(flat[i], float(candidates[lo]), right=False)), caps[i])
        give = min(excess, per_layer[i] - below)
        per_layer[i] -= give
        excess -= give
    return [p / n for p, n in zip(per_layer, sizes)]
