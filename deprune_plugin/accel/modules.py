"""The inference module that replaces a depth-wise conv (+ folded BN + activation)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.activations import ACTIVATIONS, apply_activation
from ..kernels.formats import CompactTaps, DRColumns


class FastDWConv(nn.Module):
    """Depth-wise conv with BN folded and the activation fused, holding its kept taps compacted.

    Args:
        weight: folded, masked DW weight ``[C, 1, kh, kw]`` (pruned taps exactly 0).
        bias: folded bias ``[C]``.
        keep: bool keep mask ``[C, 1, kh, kw]``.
        stride, padding, dilation: as in the original conv (``padding`` as a pair of ints).
        act: epilogue activation name (a key of :data:`deprune_plugin.kernels.ACTIVATIONS`).
        backend: ``"torch"`` (dense conv on masked weights, channels_last) or ``"cupy"`` (CUDA kernels via
            CuPy on CUDA inputs, chosen per input shape by measurement among dense / direct / DR).
        group_size, tile: DR balanced range and K tile.

    Shapes: input ``[N, C, H, W]`` -> output ``[N, C, Ho, Wo]``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor, stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], act: str, backend: str = "torch",
                 group_size: int = 32, tile: int = 32) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.register_buffer("weight", weight.detach().clone().contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", bias.detach().clone())
        self.register_buffer("keep", keep.detach().to(torch.bool).clone())
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups = weight.shape[0]
        self.act = act
        self.backend = backend
        self.group_size, self.tile = group_size, tile
        self.taps = CompactTaps.from_dense(self.weight.float(), self.keep)
        self.dr = DRColumns.from_dense(self.weight.float(), self.keep, group_size=group_size, tile=tile)
        self._dispatcher = None

    def extra_repr(self) -> str:
        return (f"{self.groups}, kernel={tuple(self.weight.shape[2:])}, stride={self.stride}, kept_taps="
                f"{int(self.keep.sum())}/{self.keep.numel()}, act={self.act}, backend={self.backend}")

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Reference path: dense conv on the masked weight, then the activation."""
        y = F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding, self.dilation,
                     self.groups)
        return apply_activation(self.act, y)

    def _kernel_dispatcher(self):
        if self._dispatcher is None:
            from ..kernels.dispatch import KernelDispatcher
            from ..kernels.dw_direct import dw_direct
            from ..kernels.dw_dr import dw_dr
            geo = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, act=self.act)
            self.taps = self.taps.to(self.weight.device)
            self.dr = self.dr.to(self.weight.device)
            self._dispatcher = KernelDispatcher({
                "dense": self.dense,
                "direct": lambda x: dw_direct(x, self.taps, self.bias.float(), backend="cupy", **geo),
                "dr": lambda x: dw_dr(x, self.dr, self.bias.float(), backend="cupy", **geo),
            })
        return self._dispatcher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "cupy" and x.is_cuda and not torch.jit.is_tracing():
            return self._kernel_dispatcher()(x)
        return self.dense(x)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_dispatcher"] = None  # holds compiled kernels and lambdas: rebuilt on first use
        return state
