"""What one forward pass shows about a model: call order and the spatial sizes each module sees.

Torch only. The pruner uses it to tell SE convs from projections (tp/structure.py) and to know each
DW layer's input and output sizes (HSR timing, geometry-aware tap importance).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .masks import is_depthwise


@dataclass
class ProbeRecord:
    """What one forward pass shows: first-call order and input/output spatial sizes of each module.

    ``example_in_hw``: input sizes at the example input's own resolution (equal to ``in_hw`` unless
    :func:`probe_structure` had to probe again on an upscaled input)."""

    order: dict[nn.Module, int] = field(default_factory=dict)
    in_hw: dict[nn.Module, tuple[int, int]] = field(default_factory=dict)
    out_hw: dict[nn.Module, tuple[int, int]] = field(default_factory=dict)
    example_in_hw: dict[nn.Module, tuple[int, int]] = field(default_factory=dict)


def _spatial(m: nn.Module, t) -> tuple[int, int]:
    if not hasattr(t, "shape") or t.dim() < 3:
        return (1, 1)
    # Linear layers of ConvNeXt-style blocks run on NHWC tensors.
    return tuple(t.shape[1:3]) if isinstance(m, nn.Linear) else tuple(t.shape[-2:])


def probe(model: nn.Module, inputs: tuple) -> ProbeRecord:
    """Run ``model(*inputs)`` once (caller sets eval / no_grad) and record a :class:`ProbeRecord`."""
    rec = ProbeRecord()

    def hook(mod, args, out):
        rec.order.setdefault(mod, len(rec.order))
        if args:
            rec.in_hw.setdefault(mod, _spatial(mod, args[0]))
        rec.out_hw.setdefault(mod, _spatial(mod, out))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    rec.example_in_hw = dict(rec.in_hw)
    return rec


def probe_structure(model: nn.Module, inputs: tuple) -> ProbeRecord:
    """:func:`probe`; if some DW output is 1x1 (tiny inputs, where an SE input looks like any other),
    probe again on the image input upscaled 4x, which every DSConv CNN accepts, to record the spatial
    sizes; keeps the first record if that fails."""
    rec = probe(model, inputs)
    dw_hw = [hw for m, hw in rec.out_hw.items() if is_depthwise(m)]
    x = inputs[0]
    if any(h * w == 1 for h, w in dw_hw) and hasattr(x, "dim") and x.dim() == 4 and x.is_floating_point():
        big = torch.nn.functional.interpolate(x[:1], scale_factor=4, mode="nearest")
        try:
            bigger = probe(model, (big,) + tuple(inputs[1:]))
            bigger.example_in_hw = rec.in_hw
            return bigger
        except Exception:  # noqa: BLE001 - the first record stays usable
            return rec
    return rec
