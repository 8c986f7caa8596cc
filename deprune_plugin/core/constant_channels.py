"""Constant channels in front of a BatchNorm, and folding them into its bias.

A pruned DW channel whose kept taps never read an input pixel at the resolution the model runs at (they
only multiply padding) outputs a constant. BatchNorm statistics re-estimated on such a channel have variance
exactly 0, so in eval mode BN divides by ``sqrt(eps)`` (~300x for ``eps=1e-5``) whatever rounding noise
reaches it: the model is numerically fragile (its fp32 output drifts from its float64 value, and any
reordering of its sums, BN folding or another runtime, looks like a wrong result).

A constant channel is a bias: :func:`fold_constant_channels_` writes the BN's output for that constant into
its ``bias`` and sets ``weight`` to 0 and the running statistics to ``(0, 1)``, so the channel outputs
exactly that value, with no division by ``sqrt(eps)`` left. Torch only.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn as nn

__all__ = ["ConstantChannelTracker", "RTOL_CONSTANT", "constant_channels", "fold_constant_channels_"]

#: a channel is constant when ``max - min <= RTOL_CONSTANT * max(|max|, |min|)`` over every sample and
#: position seen (exact equality in practice: the channel is a bias plus products with zero padding).
RTOL_CONSTANT = 1e-6

BatchNorms = nn.modules.batchnorm._BatchNorm


def _affine_bns(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, BatchNorms) and m.affine and m.track_running_stats and m.running_var is not None}


class ConstantChannelTracker:
    """Per BatchNorm of a model, the per-channel minimum and maximum of its input over every forward while
    active (a forward pre-hook each; inputs ``[N, C, ...]``). Use as a context manager."""

    def __init__(self, model: nn.Module) -> None:
        self.bns = _affine_bns(model)
        self.low: dict[str, torch.Tensor] = {}
        self.high: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            lo, hi = x.amin(dim=dims).double(), x.amax(dim=dims).double()
            if name in self.low:
                lo, hi = torch.minimum(self.low[name], lo), torch.maximum(self.high[name], hi)
            self.low[name], self.high[name] = lo, hi
        return pre

    def __enter__(self) -> ConstantChannelTracker:
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.bns.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def constant(self) -> dict[str, dict[int, float]]:
        """``{bn name: {channel: its constant input value}}`` for the channels that never varied."""
        out: dict[str, dict[int, float]] = {}
        for name, lo in self.low.items():
            hi = self.high[name]
            flat = (hi - lo) <= RTOL_CONSTANT * torch.maximum(hi.abs(), lo.abs())
            flat &= torch.isfinite(lo) & torch.isfinite(hi)
            idx = torch.nonzero(flat).flatten().tolist()
            if idx:
                out[name] = {int(c): float(lo[c] + hi[c]) / 2 for c in idx}
        return out


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.train(training)


def constant_channels(model: nn.Module, batches: Iterable, num_batches: int = 4,
                      device: torch.device | str | None = None) -> dict[str, dict[int, float]]:
    """Run up to ``num_batches`` batches (tensors ``[N, C, H, W]`` or ``(inputs, labels)``) through ``model`` in
    eval mode and return ``{bn name: {channel: constant input value}}`` of every BN input channel that
    never varied. The model's training flags are restored; nothing else changes."""
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    used = 0
    with _eval_no_grad(model), ConstantChannelTracker(model) as tracker:
        for item in batches:
            if used >= num_batches:
                break
            x = item[0] if isinstance(item, (tuple, list)) else item
            model(x.to(device))
            used += 1
    return tracker.constant() if used else {}


@torch.no_grad()
def fold_constant_channels_(model: nn.Module, constants: dict[str, dict[int, float]]) -> dict[str, list[int]]:
    """Make each listed BN channel output exactly what it outputs (in eval mode) for its constant input:
    ``bias = bias + weight * (value - running_mean) / sqrt(running_var + eps)`` (computed in float64), then
    ``weight = 0``, ``running_mean = 0``, ``running_var = 1``. Returns ``{bn name: [channels]}`` folded.

    Args:
        model: edited in place.
        constants: ``{bn name: {channel: input value}}``, e.g. from :func:`constant_channels` or a
            :class:`ConstantChannelTracker`.

    Raises:
        ValueError: a name that is no affine BatchNorm with running statistics, or a channel out of range
            (checked for every entry before anything changes).
    """
    bns = _affine_bns(model)
    for name, chans in constants.items():
        if name not in bns:
            raise ValueError(f"constants: {name!r} is not an affine BatchNorm with running statistics")
        n = bns[name].num_features
        bad = [c for c in chans if not 0 <= c < n]
        if bad:
            raise ValueError(f"constants[{name!r}]: channel(s) {bad} out of range for {n} features")
    folded: dict[str, list[int]] = {}
    for name, chans in constants.items():
        if not chans:
            continue
        bn = bns[name]
        idx = torch.tensor(sorted(chans), dtype=torch.long, device=bn.weight.device)
        value = torch.tensor([chans[c] for c in sorted(chans)], dtype=torch.float64, device=idx.device)
        mean, var = bn.running_mean[idx].double(), bn.running_var[idx].double()
        out = bn.bias[idx].double() + bn.weight[idx].double() * (value - mean) / torch.sqrt(var + bn.eps)
        bn.bias[idx] = out.to(bn.bias.dtype)
        bn.weight[idx] = 0
        bn.running_mean[idx] = 0
        bn.running_var[idx] = 1
        folded[name] = idx.tolist()
    return folded
