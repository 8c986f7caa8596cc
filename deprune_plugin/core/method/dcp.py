"""DCP: fine-grained magnitude pruning of one depth-wise layer (paper section 3).

Pruning one tap zeroes a whole column of the DR sub-GEMM, so the fine-grained pattern is
column-structured on the GPU. The target is layer-wise: ``floor(ratio * n)`` of the layer's
``n = C * kh * kw`` real weights (DR zero padding is never counted).
"""
from __future__ import annotations

import math

import torch

from ..checks import check_ratio


def n_to_prune(ratio: float, n: int) -> int:
    """``floor(ratio * n)``, robust to ratios computed as ``k / n`` in floating point."""
    return math.floor(ratio * n + 1e-9)


def prune_lowest(scores: torch.Tensor, keep: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep mask with the ``n_prune`` lowest-scoring entries of a flat range pruned.

    Entries already pruned in ``keep`` (``False``) rank first, so masks only grow (iterative pruning
    never revives a tap). Ties break by position (stable sort) for reproducibility.
    """
    flat_scores = scores.reshape(-1).to(torch.float64)
    flat_keep = keep.reshape(-1)
    ranked = torch.where(flat_keep, flat_scores, torch.full_like(flat_scores, -math.inf))
    n_prune = max(n_prune, int((~flat_keep).sum()))
    order = torch.argsort(ranked, stable=True)
    out = torch.ones_like(flat_keep)
    out[order[:n_prune]] = False
    return out.reshape(keep.shape)


def dcp_keep_mask(scores: torch.Tensor, ratio: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """DCP keep mask of one DW layer.

    Args:
        scores: tap importance, shape ``[C, 1, kh, kw]`` (usually ``weight.abs()``).
        ratio: layer target in ``[0, 1)``; ``floor(ratio * C*kh*kw)`` taps are pruned.
        keep: current keep mask (same shape, bool) from an earlier step; ``None`` = all kept.

    Returns:
        bool tensor shaped like ``scores``; ``True`` = tap kept.
    """
    check_ratio(ratio)
    if keep is None:
        keep = torch.ones_like(scores, dtype=torch.bool)
    return prune_lowest(scores, keep, n_to_prune(ratio, scores.numel()))
