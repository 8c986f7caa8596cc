"""Whole-forward CUDA graphs: capture once per input signature, replay afterwards.

At batch 1 a DSConv model is ~150 small kernels whose launch cost exceeds their run time; replaying a
captured graph launches them all at once. :class:`CUDAGraphModel` wraps an accelerated model: the first call
with a new signature warms the model up on a side stream (kernel selection and compilation happen there,
never during capture), captures one forward into a graph with static input/output buffers, and replays it
for every later call of that signature (inputs copied in, outputs cloned out). Where capture is impossible
(CPU inputs, gradients wanted, an op that synchronises with the host, ...) the model runs eagerly, with
one warning per reason, and the report says so.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["CUDAGraphModel", "Captured", "capture_cuda_graph"]


@dataclass
class Captured:
    """A replayable forward: ``replay()`` recomputes ``outputs`` from whatever is in ``inputs``."""

    inputs: list[torch.Tensor]
    outputs: Any
    replay: Callable[[], None]


def capture_cuda_graph(model: nn.Module, args: tuple, warmup: int = 2) -> Captured:
    """Warm ``model`` up on a side stream with copies of ``args``, then capture one forward on CUDA."""
    static = [a.clone(memory_format=torch.preserve_format) if isinstance(a, torch.Tensor) else a for a in args]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            model(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(*static)
    return Captured([a for a in static if isinstance(a, torch.Tensor)], out, graph.replay)


def _signature(args: tuple) -> tuple[Hashable, ...]:
    flat, spec = tree_flatten(args)
    key = [str(spec)]
    for a in flat:
        if isinstance(a, torch.Tensor):
            key.append((tuple(a.shape), tuple(a.stride()), a.dtype, str(a.device)))
        else:
            key.append(repr(a))
    return tuple(key)


class CUDAGraphModel(nn.Module):
    """Run ``model`` through one captured CUDA graph per input signature (see the module doc).

    Args:
        model: the (accelerated) model; its outputs must be tensors or nested containers of tensors.
        capture: ``capture(model, args) -> Captured``; default :func:`capture_cuda_graph` (injectable so the
            plumbing is testable without a GPU).

    Attributes:
        status: ``{signature: "captured" | "eager: <reason>"}`` of every signature seen.
    """

    def __init__(self, model: nn.Module, capture: Callable[[nn.Module, tuple], Captured] | None = None) -> None:
        super().__init__()
        self.model = model
        self._capture = capture or capture_cuda_graph
        self._graphs: dict[tuple, Captured] = {}
        self.status: dict[tuple, str] = {}
        self._warned: set[str] = set()

    def _eager(self, key: tuple | None, reason: str, args: tuple) -> Any:
        if key is not None:
            self.status.setdefault(key, f"eager: {reason}")
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"deprune_plugin: CUDA graph not used ({reason}); running eagerly", RuntimeWarning,
                          stacklevel=3)
        return self.model(*args)

    def forward(self, *args: Any) -> Any:
        tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
        if not tensors or not all(t.is_cuda for t in tensors):
            return self._eager(None, "inputs are not all CUDA tensors", args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self._eager(None, "an input requires grad", args)
        key = _signature(args)
        captured = self._graphs.get(key)
        if captured is None:
            if key in self.status:  # captured before and failed
                return self.model(*args)
            try:
                captured = self._capture(self.model, args)
            except Exception as e:  # noqa: BLE001 - capture is an optimisation: report and run eagerly
                return self._eager(key, f"capture failed: {type(e).__name__}: {e}", args)
            self._graphs[key] = captured
            self.status[key] = "captured"
        flat = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
        for dst, src in zip(captured.inputs, flat):
            dst.copy_(src)
        captured.replay()
        # The graph's output buffers are overwritten by the next replay: hand out copies.
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, captured.outputs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "model" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["model"], name)  # get_classifier(), pretrained_cfg, ...

