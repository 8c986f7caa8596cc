"""Memory report: parameter bytes and peak activation memory of one forward pass.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` minus what was allocated before. On CPU it is
measured by tracking every tensor an op returns (a ``TorchDispatchMode``) until its storage is freed:
the peak of live activation bytes at op granularity, parameters and the input excluded.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class MemoryReport:
    """Bytes: stored parameters and buffers, the same counting only kept (non-pruned) DW taps, and the
    peak activation memory of one forward pass."""

    param_bytes: int
    kept_param_bytes: int
    peak_activation_bytes: int


class _LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def _free(self, key: int) -> None:
        self.live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.live:
                    self.live[key] = st.nbytes()
                    weakref.finalize(t, self._free, key)  # a view keeps its base storage alive
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _bytes(model: nn.Module) -> tuple[int, int]:
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                if t.is_floating_point())
    pruned = 0
    for m in model.modules():
        keep = getattr(m, "dw_tap_mask", None)
        if keep is None:
            keep = getattr(m, "keep", None)
        if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and hasattr(m, "weight"):
            pruned += int((~keep).sum()) * m.weight.element_size()
    return total, total - pruned


@torch.inference_mode()
def memory_report(model: nn.Module, example_inputs: tuple) -> MemoryReport:
    """Parameter bytes and peak activation bytes of ``model(*example_inputs)`` (eval mode)."""
    total, kept = _bytes(model)
    was_training = model.training
    model.eval()
    try:
        x = example_inputs[0]
        if x.is_cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            model(*example_inputs)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            mode = _LiveBytes()
            with mode:
                out = model(*example_inputs)
            peak = mode.peak
            del out
    finally:
        model.train(was_training)
    return MemoryReport(total, kept, peak)
