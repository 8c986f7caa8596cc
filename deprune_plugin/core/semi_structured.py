"""N:M semi-structured sparsity (e.g. NVIDIA's 2:4), the baseline the paper's rebuttal compares DEPrune-B
with: in every group of M consecutive weights along a filter's reduction axis, the N largest are kept.

For a 1x1 conv the reduction axis is the input channels; for a depth-wise conv it is the channel's own
``kh * kw`` taps in row-major order, zero-padded to a multiple of M (a 3x3 filter keeps 2 + 2 + 1 = 5 of 9).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from .masks import attach_tap_mask, is_depthwise

__all__ = ["nm_keep_mask", "apply_nm_sparsity"]


def nm_keep_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Bool keep mask shaped like ``weight`` (``[out, ...]``): in each group of ``m`` consecutive entries of
    a filter's flattened reduction axis, the ``n`` largest ``|w|`` are kept (ties: the earlier entry). A last
    group shorter than ``m`` keeps ``min(n, its length)``."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"need integers 0 < n <= m, got n={n!r}, m={m!r}")
    flat = weight.detach().abs().reshape(weight.shape[0], -1).float()
    k = flat.shape[1]
    groups = -(-k // m)
    padded = torch.full((flat.shape[0], groups * m), -1.0, device=flat.device)  # padding ranks below any |w|
    padded[:, :k] = flat
    g = padded.reshape(flat.shape[0], groups, m)
    # Stable descending order: equal magnitudes keep the earlier position.
    order = torch.argsort(-g, dim=2, stable=True)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(2, order[:, :, :n], True)
    keep = keep.reshape(flat.shape[0], -1)[:, :k] & (padded[:, :k] >= 0)
    return keep.reshape(weight.shape)


def apply_nm_sparsity(model: nn.Module, n: int = 2, m: int = 4,
                      skip: Iterable[nn.Module] = ()) -> int:
    """Prune ``model`` in place to N:M sparsity on every depth-wise conv (as DEPrune tap masks) and every 1x1
    conv whose input channels are a multiple of ``m`` (``torch.nn.utils.prune`` masks), except ``skip`` and
    its submodules. Masks stay applied through training. Returns the number of layers pruned."""
    skipped = {s for mod in skip for s in mod.modules()}
    count = 0
    for mod in list(model.modules()):
        if mod in skipped or not isinstance(mod, nn.Conv2d):
            continue
        if is_depthwise(mod):
            attach_tap_mask(mod, nm_keep_mask(mod.weight, n, m))
        elif mod.kernel_size == (1, 1) and mod.groups == 1 and mod.in_channels % m == 0:
            torch_prune.custom_from_mask(mod, "weight", nm_keep_mask(mod.weight, n, m))
        else:
            continue
        count += 1
    return count
