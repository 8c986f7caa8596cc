"""Where DEPrune acts in a model, read off torch-pruning's dependency graph.

A DSConv block is ``PW-conv1 -> DW-conv -> PW-conv2``. Its PW-conv2 layers are the point-wise layers
(1x1 conv or Linear) that consume the DW output channels. DEPrune filter-prunes the output channels of
PW-conv2 only (paper section 4.2), i.e. the dependency groups that hold a PW-conv2's outputs, provided

- the group contains no DW conv (pruning it would remove DW channels: ConvNeXt's residual stream),
- it is not an SE bottleneck: an SE reduce conv sees the DW output globally pooled (1x1 where the DW
  output is larger). When the DW output itself is 1x1 (tiny inputs) the tie is broken by the gate: the
  group feeds back into the same DW's channels through a layer that runs after the DW conv,
- something downstream consumes it (a classifier output is never a target),
- on a DW conv that sits in a residual stream (ConvNeXt, FastViT: later layers of the stage write into the
  DW's channels), it returns to that stream (a block's MLP hidden width). A layer that reads the stream
  and never writes back is an exit of the stream: the head conv after the last block (FastViT's
  ``final_conv``), never a PW-conv2,
- it does not pass through both a concat and a split (timm MixNet's grouped PW convs): torch-pruning
  1.6.1 maps indices inconsistently there (observed on ``mixnet_s``: a 24-channel stream pruned 6+6 at the
  producer's concat but 11+1 at the consumer's split), so such streams are left unpruned.

On MobileNetV2/V3 and EfficientNet these are the residual streams; on ConvNeXt the MLP hidden widths.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn
from torch_pruning import ops

from ..core.masks import is_depthwise
from ..core.probe import ProbeRecord
from .limits import GroupSearchTooLong


@dataclass
class DSConvBlock:
    """One depth-wise conv and the point-wise layers around it."""

    dw_name: str
    dw: nn.Conv2d
    pw2: list[nn.Module] = field(default_factory=list)       # projection layers of this block
    pw2_names: list[str] = field(default_factory=list)


def find_depthwise(model: nn.Module, ignored: set[nn.Module] = frozenset()) -> list[tuple[str, nn.Conv2d]]:
    """``(name, conv)`` of every depth-wise conv (kernel > 1) not in ``ignored``, in module order."""
    return [(n, m) for n, m in model.named_modules() if is_depthwise(m) and m not in ignored]


def is_pointwise(m: nn.Module) -> bool:
    """A Linear, or a 1x1 conv whose every output mixes several input channels. A 1x1 conv with one input
    channel per group (MobileOne's ``conv_scale`` branch, ``groups == in_channels``) only scales channels:
    it is the 1x1 branch of a DW conv, not a point-wise layer."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)
                                        and m.in_channels // m.groups > 1)


def _members(DG, group, out: bool) -> list[nn.Module]:
    test = DG.is_out_channel_pruning_fn if out else DG.is_in_channel_pruning_fn
    return [dep.target.module for dep, _ in group if test(dep.handler)]


def channel_group(DG, module: nn.Module):
    """The full dependency group of ``module``'s output channels (a :class:`GroupSearchTooLong` raised
    inside, under :func:`.limits.bounded_groups`, carries ``module``)."""
    pruner = DG.get_pruner_of_module(module)
    try:
        return DG.get_pruning_group(module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module))))
    except GroupSearchTooLong as e:
        e.module = module
        raise


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


@dataclass
class DEPruneStructure:
    """Result of :func:`analyse`: the blocks and the PW-conv2 groups to filter-prune."""

    blocks: list[DSConvBlock]
    pw_target_layers: set[nn.Module]          # conv/linear whose OUTPUT channels DEPrune may remove
    pw_group_roots: list[nn.Module]           # one representative PW-conv2 per target group
    hidden_layers: set[nn.Module]             # out-channel members of the DW groups (prune_dw_channels)


def _is_se(c: nn.Module, dw: nn.Module, g_out: set, og_in: list, rec: ProbeRecord) -> bool:
    dw_hw = rec.out_hw.get(dw, (1, 1))
    c_hw = rec.in_hw.get(c, (1, 1))
    if dw_hw[0] * dw_hw[1] > 1:
        return c_hw[0] * c_hw[1] < dw_hw[0] * dw_hw[1]
    return any(m in g_out and rec.order.get(m, -1) > rec.order.get(dw, -1) for m in og_in)


def _in_stream(dw: nn.Module, g_out: set, rec: ProbeRecord) -> bool:
    """True when a conv / Linear that runs after ``dw`` writes into its channels at its output's spatial
    size: ``dw`` sits in a residual stream. (An SE gate writes into them too, but from a pooled 1x1 input.)"""
    dw_hw = rec.out_hw.get(dw)
    if dw_hw is None or dw_hw[0] * dw_hw[1] <= 1:
        return False  # 1x1 maps cannot tell a stream from an SE gate: keep the DSConv reading
    return any(isinstance(m, (nn.Conv2d, nn.Linear)) and m is not dw and not is_depthwise(m)
               and rec.order.get(m, -1) > rec.order.get(dw, -1) and rec.in_hw.get(m) == dw_hw for m in g_out)


def analyse(DG, model: nn.Module, dw_convs: list[tuple[str, nn.Conv2d]], rec: ProbeRecord) -> DEPruneStructure:
    """Find the PW-conv2 of every DW conv and the groups DEPrune filter-prunes.

    Args:
        DG: torch-pruning dependency graph of ``model``.
        dw_convs: ``(name, conv)`` of the DW convs to consider.
        rec: a :func:`probe` of the model.
    """
    names = {m: n for n, m in model.named_modules()}
    blocks: list[DSConvBlock] = []
    targets: dict[frozenset, nn.Module] = {}
    target_layers: set[nn.Module] = set()
    hidden: set[nn.Module] = set()
    out_group_cache: dict[nn.Module, object] = {}
    for dw_name, dw in dw_convs:
        if dw not in DG.module2node:
            continue
        g = channel_group(DG, dw)
        g_out = set(_members(DG, g, out=True))
        hidden |= g_out
        stream = _in_stream(dw, g_out, rec)
        consumers = [m for m in _members(DG, g, out=False)
                     if is_pointwise(m) and m not in g_out and m in DG.module2node]
        projections = []
        for c in consumers:
            if c not in out_group_cache:
                out_group_cache[c] = channel_group(DG, c)
            og = out_group_cache[c]
            og_out = _members(DG, og, out=True)
            og_in = _members(DG, og, out=False)
            if _is_se(c, dw, g_out, og_in, rec):
                continue
            if stream and not any(m in g_out for m in og_in):
                continue  # leaves the stream for good: a head conv (or a stage exit), not a PW-conv2
            projections.append(c)
            if any(is_depthwise(m) for m in og_out + og_in):
                continue  # removing these channels would remove DW channels
            if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in og_in):
                continue  # nothing consumes it: a model output
            node_types = {dep.target.type for dep, _ in og}
            if ops.OPTYPE.CONCAT in node_types and ops.OPTYPE.SPLIT in node_types:
                continue  # torch-pruning's concat->split index mapping is unreliable
            key = frozenset(id(m) for m in og_out)
            if key not in targets:
                targets[key] = c
                target_layers.update(m for m in og_out if isinstance(m, (nn.Conv2d, nn.Linear)))
        if projections:  # keep the projection(s) of this very block, by name proximity
            best = max(_common_prefix(dw_name, names[p]) for p in projections)
            projections = [p for p in projections if _common_prefix(dw_name, names[p]) == best]
        blocks.append(DSConvBlock(dw_name, dw, projections, [names[p] for p in projections]))
    return DEPruneStructure(blocks, target_layers, list(targets.values()), hidden)
