"""DW + PW fused pairs: a depth-wise conv and the 1x1 conv that alone reads its output, as one module.

A DW conv is memory bound and tap pruning does not cut its traffic; never writing the (expanded) DW output
to memory does. :class:`FusedDSConv` holds a :class:`FastDWConv` (BN folded, activation fused) and the PW
conv after it (its BN folded too) and chooses per input signature, by the same checked measurement as every
kernel, between

- ``"unfused"``: the DW layer (its own kernel choice) then the 1x1 conv (cuDNN on CUDA), and
- ``"fused"``: one kernel (``deprune_plugin.kernels.dw_pw_fused``) that keeps the DW result on chip and
  multiplies it by the PW weights there.

Pairs are found in a traced forward of the already accelerated model: the PW conv must be the next module
called, its input must *be* the DW module's output, and nothing else may read that output (an SE block,
which pools the DW output before the PW conv, or a skip from the DW output prevents fusion; the report
says which). The residual add of an inverted residual stays a separate op (the model's own forward).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.dispatch import KernelDispatcher, dispatch_key
from .convert import Edit, ReportEntry
from .fold import Trace, trace_calls
from .modules import DISPATCHER_LOCK, FastDWConv

__all__ = ["FusedDSConv", "fused_kernel_available", "plan_pair_edits"]


def fused_kernel_available() -> bool:
    """Whether the kernels package provides the fused DW+PW kernel."""
    import deprune_plugin.kernels as kernels

    return hasattr(kernels, "dw_pw_fused")


def _unfused(x: torch.Tensor, mod: "FusedDSConv") -> torch.Tensor:
    return mod.unfused(x)


def _fused(x: torch.Tensor, mod: "FusedDSConv") -> torch.Tensor:
    return mod.run_fused(x)


class FusedDSConv(nn.Module):
    """``pw(dw(x))`` with ``dw`` a :class:`FastDWConv` and ``pw`` a 1x1 conv with folded BN.

    Args:
        dw: the depth-wise layer (BN folded, activation fused).
        pw_weight: ``[C_out, C, 1, 1]`` folded weight of the PW conv.
        pw_bias: ``[C_out]`` folded bias (zeros if the conv had none).
        label: the pair's name in reports.

    Shapes: ``[N, C, H, W]`` -> ``[N, C_out, Ho, Wo]``.
    """

    def __init__(self, dw: FastDWConv, pw_weight: torch.Tensor, pw_bias: torch.Tensor, label: str = "") -> None:
        super().__init__()
        if pw_weight.dim() != 4 or pw_weight.shape[1] != dw.groups or tuple(pw_weight.shape[2:]) != (1, 1):
            raise ValueError(f"pw_weight must be [C_out, {dw.groups}, 1, 1], got {tuple(pw_weight.shape)}")
        self.dw = dw
        self.register_buffer("pw_weight", pw_weight.detach().clone())
        self.register_buffer("pw_bias", pw_bias.detach().clone())
        self.label = label
        self.choices: dict[tuple, str] = {}
        self._dispatcher: KernelDispatcher | None = None

    def extra_repr(self) -> str:
        return f"pw {self.pw_weight.shape[1]} -> {self.pw_weight.shape[0]}"

    def unfused(self, x: torch.Tensor) -> torch.Tensor:
        """The DW layer, then the 1x1 conv."""
        y = self.dw(x)
        return F.conv2d(y, self.pw_weight.to(y.dtype), self.pw_bias.to(y.dtype))

    def run_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The fused kernel (DW taps + bias + act, then the PW GEMM + bias, in one pass)."""
        import deprune_plugin.kernels as kernels

        dw = self.dw
        fmt = dw.formats()
        backend = "emu" if dw.backend == "emu" else "cupy"
        return kernels.dw_pw_fused(x, fmt["taps"], fmt["bias"], self.pw_weight, self.pw_bias.float(),
                                   stride=dw.stride, padding=dw.pads(x), dilation=dw.dilation, act=dw.act,
                                   backend=backend)

    def dispatcher(self) -> KernelDispatcher:
        with DISPATCHER_LOCK:
            if self._dispatcher is None:
                d = KernelDispatcher({"unfused": _unfused, "fused": _fused}, label=self.label)
                for key, name in self.choices.items():
                    d.restore(key, name)
                self._dispatcher = d
        return self._dispatcher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or not self.dw._uses_kernels(x):
            return self.unfused(x)
        key = dispatch_key(x)
        name = self.choices.get(key)
        if name is None:
            name = self.choices[key] = self.dispatcher().select(x, self).name
        return self.unfused(x) if name == "unfused" else self.run_fused(x)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_dispatcher"] = None
        return state


def _pairable_pw(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1)
            and m.padding in ((0, 0), "valid") and m.dilation == (1, 1) and m.padding_mode == "zeros")


def plan_pair_edits(model: nn.Module, example_inputs: tuple) -> tuple[list[Edit], list[ReportEntry]]:
    """Edits fusing each :class:`FastDWConv` with the 1x1 conv that alone reads its output, and report
    entries for the DW layers left unfused (with the reason)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    trace: Trace = trace_calls(model, tuple(example_inputs))
    names = {m: n for n, m in model.named_modules()}
    edits, left = [], []
    for i, call in enumerate(trace.calls):
        if not isinstance(call.module, FastDWConv):
            continue
        dw, name = call.module, names[call.module]
        j = i + 1  # skip the Identity modules left where BN / activation used to be
        while j < len(trace.calls) and type(trace.calls[j].module) is nn.Identity and trace.calls[j].inp is call.out:
            j += 1
        nxt = trace.calls[j] if j < len(trace.calls) else None
        if nxt is None or not _pairable_pw(nxt.module):
            what = "nothing" if nxt is None else type(nxt.module).__name__
            left.append(ReportEntry(name, "unfused", f"next op is {what}, not a plain 1x1 conv (e.g. an SE block)"))
            continue
        if nxt.inp is not call.out:
            left.append(ReportEntry(name, "unfused", f"the next 1x1 conv ({names[nxt.module]}) does not read the DW "
                                                     "output directly (an SE block or another op in between)"))
            continue
        if trace.readers(call) != 1 or trace.count.get(nxt.module) != 1:
            left.append(ReportEntry(name, "unfused", "the DW output is read by more than the 1x1 conv after it"))
            continue
        pw = nxt.module
        bias = pw.bias.detach() if pw.bias is not None else torch.zeros(pw.out_channels, device=pw.weight.device,
                                                                          dtype=pw.weight.dtype)
        pair = FusedDSConv(dw, pw.weight.detach(), bias, label=f"{name}+{names[pw]}")
        entry = ReportEntry(name, "fused", f"paired with {names[pw]} ({pw.in_channels} -> {pw.out_channels})")
        edits.append(Edit(name, entry, [(name, pair), (names[pw], nn.Identity())]))
    return edits, left
