"""Find conv -> BatchNorm -> activation chains and fold BatchNorm into the conv (inference only).

Chains are read off one forward pass: a BatchNorm is folded into a conv when it is the next module
called and its input *is* the conv's output tensor (so no other consumer sees the unnormalised value).
timm's ``BatchNormAct2d`` carries its activation inside; torchvision puts it in the next module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..kernels.activations import activation_of_module

@dataclass
class Call:
    module: nn.Module
    inp: torch.Tensor | None
    out: torch.Tensor | None


@dataclass
class Trace:
    """Leaf-module calls of one forward pass, in order."""

    calls: list[Call] = field(default_factory=list)
    count: dict[nn.Module, int] = field(default_factory=dict)

    def next_call(self, m: nn.Module) -> Call | None:
        for i, c in enumerate(self.calls):
            if c.module is m:
                return self.calls[i + 1] if i + 1 < len(self.calls) else None
        return None


@torch.no_grad()
def trace_calls(model: nn.Module, inputs: tuple) -> Trace:
    """Record every leaf-like module call (convs, norms, activations...) of ``model(*inputs)``."""
    tr = Trace()

    def hook(mod, args, out):
        tr.count[mod] = tr.count.get(mod, 0) + 1
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        tr.calls.append(Call(mod, inp, out if isinstance(out, torch.Tensor) else None))

    leaves = [m for m in model.modules() if not list(m.children()) or isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    # BatchNormAct2d's inner act runs (and is recorded) before the BN's own hook fires: drop those.
    inner = {id(c) for m in leaves if isinstance(m, nn.BatchNorm2d) for c in m.children()}
    tr.calls = [c for c in tr.calls if id(c.module) not in inner]
    return tr


@torch.no_grad()
def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w', b')`` with ``conv(x, w', b') == bn(conv(x, w, b))`` in eval mode (float64 math)."""
    scale = bn.weight.double() if bn.weight is not None else torch.ones_like(bn.running_var, dtype=torch.float64)
    shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
    inv = scale / torch.sqrt(bn.running_var.double() + bn.eps)
    w = weight.double() * inv.reshape(-1, *([1] * (weight.dim() - 1)))
    b = (bias.double() if bias is not None else torch.zeros_like(inv)) - bn.running_mean.double()
    return w.to(weight.dtype), (b * inv + shift).to(weight.dtype)


@dataclass
class Chain:
    """A conv with the BatchNorm (and activation) that directly follow it."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None = None
    act: nn.Module | None = None         # separate activation module (torchvision style)
    inner_act: nn.Module | None = None   # activation inside timm's BatchNormAct2d


def find_chains(tr: Trace, convs: list[nn.Conv2d]) -> dict[nn.Conv2d, Chain]:
    """For each conv, the BN that consumes exactly its output and the activation after that."""
    chains = {}
    for conv in convs:
        ch = Chain(conv)
        nxt = tr.next_call(conv)
        conv_call = next((c for c in tr.calls if c.module is conv), None)
        if (nxt is not None and conv_call is not None and isinstance(nxt.module, nn.BatchNorm2d)
                and nxt.inp is conv_call.out and tr.count.get(nxt.module) == 1 and tr.count.get(conv) == 1):
            ch.bn = nxt.module
            inner = getattr(ch.bn, "act", None)
            drop = getattr(ch.bn, "drop", None)
            if isinstance(inner, nn.Module) and (drop is None or isinstance(drop, nn.Identity)):
                ch.inner_act = inner
            else:
                after = tr.next_call(ch.bn)
                if after is not None and after.inp is nxt.out and tr.count.get(after.module) == 1 \
                        and activation_of_module(after.module) is not None and not isinstance(after.module, nn.Identity):
                    ch.act = after.module
        chains[conv] = ch
    return chains
