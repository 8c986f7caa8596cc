"""BWT: Balanced Workload Tuning (paper section 5).

Every balanced range prunes ``floor(ratio * n_g)`` of its ``n_g`` weights, so all full ranges keep the same
K' and the layer's real ratio (minimum over ranges) equals the target up to floor rounding.
Channels inside one range may keep different numbers of taps.
"""
from __future__ import annotations

import torch

from ..checks import check_ratio
from .dcp import n_to_prune, prune_lowest
from .ranges import range_bounds


def bwt_keep_mask(scores: torch.Tensor, ratio: float, group_size: int = 32,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """BWT keep mask of one DW layer.

    Args:
        scores: tap importance ``[C, 1, kh, kw]``.
        ratio: target in ``[0, 1)`` applied inside every range (a last partial range the same way).
        group_size: channels per balanced range (one DR sub-GEMM).
        keep: current keep mask from an earlier step, or ``None``.

    Returns:
        bool keep mask shaped like ``scores``.
    """
    check_ratio(ratio)
    if keep is None:
        keep = torch.ones_like(scores, dtype=torch.bool)
    out = keep.clone()
    for s, e in range_bounds(scores.shape[0], group_size):
        n = scores[s:e].numel()
        out[s:e] = prune_lowest(scores[s:e], keep[s:e], n_to_prune(ratio, n))
    return out
