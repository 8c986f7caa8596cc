"""Measured HSR alpha: time the layer's DR sub-GEMMs at K' and at the aligned K' on the GPU."""
from __future__ import annotations

import math

import torch


def _time_bmm(a: torch.Tensor, b: torch.Tensor, reps: int = 20) -> float:
    for _ in range(3):
        torch.bmm(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        torch.bmm(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measured_alpha(kept: int, tile: int, group_size: int, channels: int, out_hw: tuple[int, int],
                   batch: int = 32) -> float:
    """``t(K') / t(tile * floor(K'/tile)) - 1`` for the layer's ``ceil(C/group_size)`` sub-GEMMs
    (``group_size x K'`` times ``K' x P``, fp16, ``P = batch * Ho * Wo``)."""
    aligned = tile * (kept // tile)
    if aligned == 0:
        return math.inf
    groups = math.ceil(channels / group_size)
    p = batch * out_hw[0] * out_hw[1]
    dev = torch.device("cuda")

    def t(k: int) -> float:
        a = torch.randn(groups, group_size, k, device=dev, dtype=torch.float16)
        b = torch.randn(groups, k, p, device=dev, dtype=torch.float16)
        return _time_bmm(a, b)

    return max(t(kept) / t(aligned) - 1.0, 0.0)
