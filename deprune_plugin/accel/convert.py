"""The edits :func:`deprune_plugin.accelerate` makes to its copy of a model, each one reversible.

An :class:`Edit` replaces one conv (+ its BatchNorm and activation) by folded / fused modules. Edits are
planned from one traced forward pass (:mod:`.fold`), applied together, and any edit that breaks the
model's output is reverted (:mod:`.selfcheck`). What is left alone is reported with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..core.masks import is_depthwise, tap_mask
from ..core.padding import conv_padding, plain_forward
from ..kernels.activations import activation_of_module
from .fold import Chain, Trace, fold_bn
from .modules import FastDWConv

__all__ = ["Edit", "ReportEntry", "plan_edits", "conv_padding"]


@dataclass
class ReportEntry:
    """One line of the report: ``action`` is ``"replaced"``, ``"folded"`` or ``"left"``."""

    name: str
    action: str
    detail: str


@dataclass
class Edit:
    """Module replacements ``[(qualified name, new module)]`` for one chain, undoable."""

    name: str                     # the conv's name
    entry: ReportEntry            # what the report says once the edit stays
    swaps: list[tuple[str, nn.Module]] = field(default_factory=list)
    _old: list[tuple[str, nn.Module]] = field(default_factory=list)

    def apply(self, root: nn.Module) -> None:
        self._old = [(name, _get(root, name)) for name, _ in self.swaps]
        for name, new in self.swaps:
            _set(root, name, new)

    def revert(self, root: nn.Module) -> None:
        for name, old in reversed(self._old):
            _set(root, name, old)
        self._old = []


def _get(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _identity_or(module: nn.Module | None) -> nn.Module:
    return module if module is not None else nn.Identity()


def plan_edits(fast: nn.Module, trace: Trace, chains: dict[nn.Conv2d, Chain], *, backend: str,
               fold_batchnorm: bool, group_size: int, tile: int,
               filter_fn: Callable[[nn.Module, str], bool] | None) -> tuple[list[Edit], list[ReportEntry]]:
    """Plan an edit for every depth-wise conv (-> :class:`FastDWConv`) and, with ``fold_batchnorm``, every
    other conv followed by a foldable BatchNorm; return ``(edits, entries for what is left alone)``."""
    names = {m: n for n, m in fast.named_modules()}
    edits: list[Edit] = []
    left: list[ReportEntry] = []
    for conv, ch in chains.items():
        name = names[conv]
        dw = is_depthwise(conv)
        padding = conv_padding(conv)
        if dw and filter_fn is not None and not filter_fn(conv, name):
            left.append(ReportEntry(name, "left", "rejected by filter_fn"))
            continue
        if dw and trace.count.get(conv, 0) != 1:
            left.append(ReportEntry(name, "left", "not called exactly once in a forward pass"))
            continue
        if not dw and not (fold_batchnorm and ch.bn is not None and plain_forward(conv)):
            continue
        if dw and padding is None:
            left.append(ReportEntry(name, "left", f"{type(conv).__name__} with padding_mode={conv.padding_mode!r}"
                                                  " is not a plain zero-padded conv"))
            continue
        keep = tap_mask(conv) if tap_mask(conv) is not None else torch.ones_like(conv.weight, dtype=torch.bool)
        weight, bias = conv.weight.detach() * keep, (conv.bias.detach() if conv.bias is not None else None)
        if ch.bn is not None:
            weight, bias = fold_bn(weight, bias, ch.bn)
        notes = list(ch.notes)
        if not dw:
            # Conv2dSame keeps its own (input-size dependent) padding: fold into a fresh conv of its class.
            if padding == "same":
                new = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                                 conv.dilation, conv.groups, bias=True, device=weight.device, dtype=weight.dtype)
            else:
                new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                                device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                new.weight.copy_(weight)
                new.bias.copy_(bias)
            new.requires_grad_(False)
            entry = ReportEntry(name, "folded", f"BatchNorm {names[ch.bn]} folded" + "".join(f"; {n}" for n in notes))
            edits.append(Edit(name, entry, [(name, new), (names[ch.bn], _identity_or(ch.inner_act))]))
            continue
        if bias is None:
            bias = torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype)
        act_mod = ch.inner_act if ch.inner_act is not None else ch.act
        act = activation_of_module(act_mod) if act_mod is not None else "identity"
        unfused = act_mod if act is None else None  # an activation the epilogue cannot compute stays a module
        new = FastDWConv(weight * keep, bias, keep, conv.stride, padding, conv.dilation, act or "identity",
                         backend=backend, group_size=group_size, tile=tile, label=name)
        swaps: list[tuple[str, nn.Module]] = [(name, new)]
        if ch.bn is not None:
            keep_act = unfused is not None and ch.inner_act is not None
            swaps.append((names[ch.bn], unfused if keep_act else nn.Identity()))
        if ch.act is not None and unfused is None:
            swaps.append((names[ch.act], nn.Identity()))
        parts = [f"{int(keep.sum())}/{keep.numel()} taps kept"]
        if padding == "same":
            parts.append("TF SAME padding per input size")
        if ch.bn is not None:
            parts.append(f"BN {names[ch.bn]} folded")
        parts.append(f"act {act or 'identity'} fused" if unfused is None else
                     f"act {type(unfused).__name__} kept as a module (no kernel epilogue for it)")
        parts += notes
        edits.append(Edit(name, ReportEntry(name, "replaced", f"FastDWConv[{backend}], " + ", ".join(parts)), swaps))
    return edits, left
