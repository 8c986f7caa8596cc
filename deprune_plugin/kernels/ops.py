"""The kernels as ``torch.library`` custom ops, so compiled and exported graphs can hold them.

``torch.ops.deprune.dw_direct`` and ``torch.ops.deprune.dw_dr`` take the compact weight formats as plain
tensors. Their CUDA implementation launches the CUDA kernels (:func:`.dw_direct.dw_direct`,
:func:`.dw_dr.dw_dr`); every other device runs a torch reference (the dense conv on the weight rebuilt from
the format), and a fake (meta) implementation gives the output's shape and memory format, so
``torch.compile(..., fullgraph=True)`` traces them without graph breaks and ``torch.export`` keeps them as
single nodes. Eager calls from :class:`deprune_plugin.accel.FastDWConv` bypass the op layer (its dispatch
costs several microseconds) and call the launchers directly.

Padding is ``(top, bottom, left, right)``; ``act`` a key of :data:`.activations.ACTIVATIONS`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .activations import apply_activation
from .launch import conv_output_size

__all__ = ["dw_direct_op", "dw_dr_op", "conv_output_size"]


def _reference(x: torch.Tensor, dense: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
               padding: list[int], dilation: list[int], act: str) -> torch.Tensor:
    top, bottom, left, right = padding
    xp = F.pad(x, (left, right, top, bottom))
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv2d(xp, dense.to(x.dtype), b, stride, 0, dilation, x.shape[1])
    y = apply_activation(act, y)
    fmt = torch.channels_last if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def _fake(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
          dilation: list[int]) -> torch.Tensor:
    n, c, h, w = x.shape
    oh = conv_output_size(h, kernel_size[0], stride[0], padding[0], padding[1], dilation[0])
    ow = conv_output_size(w, kernel_size[1], stride[1], padding[2], padding[3], dilation[1])
    fmt = torch.channels_last if not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format
    return x.new_empty((n, c, oh, ow)).contiguous(memory_format=fmt)


def _taps_dense(tap_ptr: torch.Tensor, tap_idx: torch.Tensor, tap_val: torch.Tensor,
                kernel_size: list[int]) -> torch.Tensor:
    c = tap_ptr.numel() - 1
    kh, kw = kernel_size
    counts = (tap_ptr[1:] - tap_ptr[:-1]).long()
    chan = torch.repeat_interleave(torch.arange(c, device=tap_val.device), counts)
    dense = torch.zeros(c, kh * kw, dtype=torch.float32, device=tap_val.device)
    dense[chan, tap_idx.long()] = tap_val
    return dense.reshape(c, 1, kh, kw)


@torch.library.custom_op("deprune::dw_direct", mutates_args=())
def dw_direct_op(x: torch.Tensor, tap_ptr: torch.Tensor, tap_idx: torch.Tensor, tap_val: torch.Tensor,
                 bias: Optional[torch.Tensor], kernel_size: list[int], stride: list[int], padding: list[int],
                 dilation: list[int], act: str) -> torch.Tensor:
    """Tap-sparse DW conv: ``act(conv2d(pad(x), taps, bias))`` (reference implementation off CUDA)."""
    return _reference(x, _taps_dense(tap_ptr, tap_idx, tap_val, kernel_size), bias, stride, padding, dilation, act)


@dw_direct_op.register_kernel("cuda")
def _dw_direct_cuda(x, tap_ptr, tap_idx, tap_val, bias, kernel_size, stride, padding, dilation, act):
    from .dw_direct import dw_direct
    from .formats import CompactTaps

    taps = CompactTaps(tap_ptr, tap_idx, tap_val, tuple(kernel_size))
    return dw_direct(x, taps, bias, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                     act=act, backend="cupy")


@dw_direct_op.register_fake
def _dw_direct_fake(x, tap_ptr, tap_idx, tap_val, bias, kernel_size, stride, padding, dilation, act):
    return _fake(x, kernel_size, stride, padding, dilation)


def _dr_dense(col_chan: torch.Tensor, col_tap: torch.Tensor, col_val: torch.Tensor, channels: int,
              kernel_size: list[int]) -> torch.Tensor:
    kh, kw = kernel_size
    dense = torch.zeros(channels, kh * kw, dtype=torch.float32, device=col_val.device)
    dense.index_put_((col_chan.long(), col_tap.long()), col_val, accumulate=True)  # padding columns add 0
    return dense.reshape(channels, 1, kh, kw)


@torch.library.custom_op("deprune::dw_dr", mutates_args=())
def dw_dr_op(x: torch.Tensor, col_ptr: torch.Tensor, col_chan: torch.Tensor, col_tap: torch.Tensor,
             col_val: torch.Tensor, col_kept: torch.Tensor, bias: Optional[torch.Tensor], kernel_size: list[int],
             group_size: int, tile: int, stride: list[int], padding: list[int], dilation: list[int],
             act: str) -> torch.Tensor:
    """DW conv as the DR sub-GEMMs of DEPrune (reference implementation off CUDA)."""
    dense = _dr_dense(col_chan, col_tap, col_val, x.shape[1], kernel_size)
    return _reference(x, dense, bias, stride, padding, dilation, act)


@dw_dr_op.register_kernel("cuda")
def _dw_dr_cuda(x, col_ptr, col_chan, col_tap, col_val, col_kept, bias, kernel_size, group_size, tile, stride,
                padding, dilation, act):
    from .dw_dr import dw_dr
    from .formats import DRColumns

    cols = DRColumns(col_ptr, col_chan, col_tap, col_val, col_kept, tuple(kernel_size), group_size, tile, x.shape[1])
    return dw_dr(x, cols, bias, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), act=act,
                 backend="cupy")


@dw_dr_op.register_fake
def _dw_dr_fake(x, col_ptr, col_chan, col_tap, col_val, col_kept, bias, kernel_size, group_size, tile, stride,
                padding, dilation, act):
    return _fake(x, kernel_size, stride, padding, dilation)
