"""Find conv -> BatchNorm -> activation chains and fold BatchNorm into the conv (inference only).

Chains are read off one traced forward pass (:func:`trace_calls`), which records every leaf module call
and, through a ``TorchFunctionMode``, every use of every tensor by a torch operation. A value is keyed by
``(id(tensor), tensor._version)``, so an in-place op (``ReLU(inplace=True)``) makes a new value and its
later readers count as readers of the new value, not of the old one. Then:

- a BatchNorm is folded into a conv only when the conv's output has exactly one reader, that BatchNorm
  (nobody else may see the unnormalised value), and the BatchNorm uses running statistics;
- an activation is fused only when the value it reads (the BatchNorm's, or the conv's) has exactly one
  reader, that activation (``y = bn(x); out = pw(relu(y)) + skip(y)`` keeps ``y`` un-activated for ``skip``);
- timm's ``BatchNormAct2d`` carries its activation inside: nobody can read its pre-activation value.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..kernels.activations import activation_of_module

__all__ = ["Call", "Trace", "Chain", "trace_calls", "find_chains", "fold_bn", "bn_fold_problem"]

_EVAL_NOOP_DROPS = (nn.Identity, nn.Dropout)
# Calls that look at a tensor's metadata, not its values (property getters arrive as `__get__`).
_METADATA = frozenset({"__get__", "dim", "ndimension", "size", "stride", "numel", "nelement", "is_contiguous",
                       "element_size", "data_ptr", "storage_offset", "is_floating_point", "is_complex",
                       "get_device", "__len__", "_assert"})


@dataclass
class Call:
    """One module call: its first tensor input and its output, with the output's version when produced."""

    module: nn.Module
    inp: torch.Tensor | None
    out: torch.Tensor | None
    out_version: int = 0

    def out_value(self) -> tuple[int, int] | None:
        return None if self.out is None else (id(self.out), self.out_version)


@dataclass
class Trace:
    """Leaf-module calls of one forward pass, in order, and how often each tensor value was read."""

    calls: list[Call] = field(default_factory=list)
    count: dict[nn.Module, int] = field(default_factory=dict)
    reads: Counter = field(default_factory=Counter)

    def call_of(self, m: nn.Module) -> Call | None:
        return next((c for c in self.calls if c.module is m), None)

    def next_call(self, m: nn.Module) -> Call | None:
        for i, c in enumerate(self.calls):
            if c.module is m:
                return self.calls[i + 1] if i + 1 < len(self.calls) else None
        return None

    def readers(self, call: Call) -> int:
        """How many torch operations read the output of ``call`` (before any in-place change of it)."""
        value = call.out_value()
        return 0 if value is None else self.reads[value]


class _CountReads(TorchFunctionMode):
    def __init__(self, reads: Counter) -> None:
        super().__init__()
        self.reads = reads
        self.alive: list[torch.Tensor] = []  # no tensor dies during the trace, so no id is reused


    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _METADATA:
            return func(*args, **kwargs)
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                self.reads[(id(t), t._version)] += 1
                self.alive.append(t)
        out = func(*args, **kwargs)
        self.alive += [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def trace_calls(model: nn.Module, inputs: tuple) -> Trace:
    """Record every leaf-like module call (convs, norms, activations...) of ``model(*inputs)`` and every
    tensor read, without gradients (and outside inference mode, where tensors have no versions)."""
    tr = Trace()

    def hook(mod, args, out):
        tr.count[mod] = tr.count.get(mod, 0) + 1
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        out_t = out if isinstance(out, torch.Tensor) else None
        tr.calls.append(Call(mod, inp, out_t, out_t._version if out_t is not None else 0))

    leaves = [m for m in model.modules() if not list(m.children()) or isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode(False), torch.no_grad(), _CountReads(tr.reads):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    # BatchNormAct2d's inner act runs (and is recorded) before the BN's own hook fires: drop those.
    inner = {id(c) for m in leaves if isinstance(m, nn.BatchNorm2d) for c in m.children()}
    tr.calls = [c for c in tr.calls if id(c.module) not in inner]
    return tr


def bn_fold_problem(bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into the conv before it, or None if it can."""
    if not isinstance(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not a BatchNorm2d"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "BatchNorm uses batch statistics at inference (track_running_stats=False): not folded"
    return None


@torch.no_grad()
def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w', b')`` with ``conv(x, w', b') == bn(conv(x, w, b))`` in eval mode (float64 math)."""
    problem = bn_fold_problem(bn)
    if problem:
        raise ValueError(problem)
    scale = bn.weight.double() if bn.weight is not None else torch.ones_like(bn.running_var, dtype=torch.float64)
    shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
    inv = scale / torch.sqrt(bn.running_var.double() + bn.eps)
    w = weight.double() * inv.reshape(-1, *([1] * (weight.dim() - 1)))
    b = (bias.double() if bias is not None else torch.zeros_like(inv)) - bn.running_mean.double()
    return w.to(weight.dtype), (b * inv + shift).to(weight.dtype)


@dataclass
class Chain:
    """A conv with the BatchNorm (and activation) that directly follow it, and why anything was left out."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None = None
    act: nn.Module | None = None         # separate activation module (torchvision style)
    inner_act: nn.Module | None = None   # activation inside timm's BatchNormAct2d
    notes: list[str] = field(default_factory=list)


def _inner_act(bn: nn.Module) -> nn.Module | None:
    inner = getattr(bn, "act", None)
    drop = getattr(bn, "drop", None)
    if isinstance(inner, nn.Module) and (drop is None or isinstance(drop, _EVAL_NOOP_DROPS)):
        return inner
    return None


def _fusable_act_after(tr: Trace, producer: Call) -> nn.Module | None:
    after = tr.next_call(producer.module)
    if (after is None or after.inp is not producer.out or tr.count.get(after.module) != 1
            or activation_of_module(after.module) is None or isinstance(after.module, nn.Identity)):
        return None
    return after.module


def find_chains(tr: Trace, convs: list[nn.Conv2d]) -> dict[nn.Conv2d, Chain]:
    """For each conv called once, the BN that is the only reader of its output and the activation after
    that (see the module doc for the single-reader rules)."""
    chains = {}
    for conv in convs:
        ch = Chain(conv)
        chains[conv] = ch
        conv_call = tr.call_of(conv)
        if conv_call is None or tr.count.get(conv) != 1:
            continue
        nxt = tr.next_call(conv)
        produced_by = conv_call
        if nxt is not None and isinstance(nxt.module, nn.BatchNorm2d) and nxt.inp is conv_call.out \
                and tr.count.get(nxt.module) == 1:
            problem = bn_fold_problem(nxt.module)
            if tr.readers(conv_call) != 1:
                ch.notes.append("conv output has another reader besides its BatchNorm: BN not folded")
            elif problem:
                ch.notes.append(problem)
            else:
                ch.bn = nxt.module
                ch.inner_act = _inner_act(ch.bn)
                produced_by = nxt
        if ch.bn is not None and ch.inner_act is not None:
            continue
        if ch.bn is None and produced_by is conv_call and nxt is not None and isinstance(nxt.module, nn.BatchNorm2d):
            continue  # an unfoldable BN sits between the conv and any activation
        act = _fusable_act_after(tr, produced_by)
        if act is not None:
            if tr.readers(produced_by) == 1:
                ch.act = act
            else:
                ch.notes.append("activation input has another reader: activation not fused")
    return chains
