"""Geometry-aware tap importance (beyond the paper): a DW tap that only ever multiplies zero padding at the
resolution the model runs at contributes nothing, whatever its magnitude.

At 32x32 inputs the last DW layers of MobileNetV2 run on 2x2 and 1x1 maps, where only the centre tap (or 4
of 9) ever reads an input pixel; plain ``|w|`` ranking keeps edge taps that multiply padding only. Here a
tap's score is ``|w| * coverage``, ``coverage`` the fraction of the layer's output positions at which the tap
reads a real input pixel. BWT / HSR still decide how many taps each range keeps; this decides which.
"""
from __future__ import annotations

import torch

__all__ = ["axis_coverage", "blind_channels", "tap_coverage", "geometry_tap_scores", "with_channel_floor"]


def axis_coverage(size: int, kernel: int, stride: int, pad_before: int, pad_after: int,
                  dilation: int) -> list[float]:
    """Per tap position ``i`` along one spatial axis: the fraction of output positions ``o`` whose input
    index ``o * stride - pad_before + i * dilation`` lies inside ``[0, size)``. ``[kernel]`` floats."""
    out = (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1
    if out <= 0:
        return [0.0] * kernel
    fractions = []
    for i in range(kernel):
        inside = sum(1 for o in range(out) if 0 <= o * stride - pad_before + i * dilation < size)
        fractions.append(inside / out)
    return fractions


def tap_coverage(in_hw: tuple[int, int], kernel_size: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int, int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """``[kh, kw]`` float32: for each tap, the fraction of the ``[OH, OW]`` output positions at which it
    reads a real input pixel of an ``in_hw`` input (``padding = (top, bottom, left, right)``). Rows and
    columns are independent, so the map is the outer product of the two axes' fractions."""
    fy = axis_coverage(in_hw[0], kernel_size[0], stride[0], padding[0], padding[1], dilation[0])
    fx = axis_coverage(in_hw[1], kernel_size[1], stride[1], padding[2], padding[3], dilation[1])
    return torch.outer(torch.tensor(fy, dtype=torch.float32), torch.tensor(fx, dtype=torch.float32))


def geometry_tap_scores(weight: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """``|w| * coverage`` (``weight [C, 1, kh, kw]``, ``coverage [kh, kw]``): taps that only ever read
    padding score exactly zero."""
    if coverage.shape != weight.shape[-2:]:
        raise ValueError(f"coverage must be {tuple(weight.shape[-2:])} (the kernel size), got {tuple(coverage.shape)}")
    return weight.detach().abs() * coverage.to(weight.device, torch.float32).to(weight.dtype)


def with_channel_floor(scores: torch.Tensor) -> torch.Tensor:
    """Scores ``[C, 1, kh, kw]`` with each channel's best tap lifted above every other tap of the layer (when
    it scores > 0), so a range that keeps at least as many taps as it has channels keeps one
    input-reading tap per channel. Order among the lifted taps, and among the rest, is unchanged."""
    flat = scores.reshape(scores.shape[0], -1).to(torch.float64)
    lift = float(flat.max()) + 1.0 if flat.numel() else 0.0
    best = flat.argmax(dim=1)
    rows = torch.arange(flat.shape[0])
    top = flat[rows, best]
    out = flat.clone()
    out[rows, best] = torch.where(top > 0, top + lift, top)
    return out.reshape(scores.shape)


def blind_channels(keep: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Indices (``[n]`` long) of the channels of a DW tap mask ``keep [C, 1, kh, kw]`` none of whose kept taps
    ever reads an input pixel (``coverage [kh, kw]`` from :func:`tap_coverage`): their output is a constant
    (the conv's bias), at the resolution ``coverage`` describes."""
    if coverage.shape != keep.shape[-2:]:
        raise ValueError(f"coverage must be {tuple(keep.shape[-2:])} (the kernel size), got {tuple(coverage.shape)}")
    reads = keep.bool() & (coverage.to(keep.device) > 0)
    return torch.nonzero(~reads.flatten(1).any(dim=1)).flatten()
