"""Measured HSR alpha: time the layer's DR sub-GEMMs at K' and at the aligned K' on the GPU."""
from __future__ import annotations

import math

import torch

from ..timing import interleaved_medians

_REPS, _WARMUP = 20, 3


def measured_alpha(kept: int, tile: int, group_size: int, channels: int, out_hw: tuple[int, int],
                   batch: int = 32) -> float:
    """``t(K') / t(tile * floor(K'/tile)) - 1`` for the layer's ``ceil(C/group_size)`` sub-GEMMs
    (``group_size x K'`` times ``K' x P``, fp16, ``P = batch * Ho * Wo``).

    Timed with the package's one timer (:mod:`deprune_plugin.core.timing`): CUDA device time (kernel
    time, free of launch overhead), the two shapes interleaved so drift hits both alike, medians."""
    aligned = tile * (kept // tile)
    if aligned == 0:
        return math.inf
    groups = math.ceil(channels / group_size)
    p = batch * out_hw[0] * out_hw[1]
    dev = torch.device("cuda")

    def bmm_at(k: int):
        a = torch.randn(groups, group_size, k, device=dev, dtype=torch.float16)
        b = torch.randn(groups, k, p, device=dev, dtype=torch.float16)
        return lambda: torch.bmm(a, b)

    t = interleaved_medians({"kept": bmm_at(kept), "aligned": bmm_at(aligned)}, reps=_REPS, warmup=_WARMUP,
                            device=dev, clock="device")
    return max(t["kept"] / t["aligned"] - 1.0, 0.0)
