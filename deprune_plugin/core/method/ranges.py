"""Balanced ranges: the unit of work of one DR sub-GEMM.

A depth-wise weight has shape ``[C, 1, kh, kw]`` (or ``[C, kh, kw]``). Range ``g`` holds channels
``[g * group_size, min((g + 1) * group_size, C))`` with all their taps, i.e. ``n_g = channels_g * kh * kw``
weights; the last range is partial when ``C % group_size != 0``.
"""
from __future__ import annotations

import torch


def range_bounds(num_channels: int, group_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` channel bounds of each balanced range."""
    if group_size <= 0:
        raise ValueError(f"group_size must be > 0, got {group_size}")
    return [(s, min(s + group_size, num_channels)) for s in range(0, num_channels, group_size)]


def _per_channel(mask: torch.Tensor) -> torch.Tensor:
    """Kept-tap counts per channel, shape ``[C]``."""
    return mask.reshape(mask.shape[0], -1).sum(dim=1)


def kept_per_range(keep: torch.Tensor, group_size: int) -> list[int]:
    """K'_g: kept weights (DR columns) of each range of a boolean keep mask ``[C, ...]``."""
    per_channel = _per_channel(keep)
    return [int(per_channel[s:e].sum()) for s, e in range_bounds(keep.shape[0], group_size)]


def range_ratios(keep: torch.Tensor, group_size: int) -> list[float]:
    """Pruning ratio of each balanced range (pruned / real weights of the range)."""
    taps = keep[0].numel()
    return [1.0 - k / ((e - s) * taps)
            for k, (s, e) in zip(kept_per_range(keep, group_size), range_bounds(keep.shape[0], group_size))]


def real_ratio(keep: torch.Tensor, group_size: int) -> float:
    """The layer's real DW ratio: the minimum over its ranges (the slowest sub-GEMM sets the time)."""
    return min(range_ratios(keep, group_size))
