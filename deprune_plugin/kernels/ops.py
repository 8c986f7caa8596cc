"""The kernels as ``torch.library`` custom ops, so compiled and exported graphs can hold them.

``torch.ops.deprune.dw_direct`` and ``torch.ops.deprune.dw_dr`` take the compact weight formats as plain
tensors. Their CUDA implementation launches the CUDA kernels (:func:`.dw_direct.dw_direct`,
:func:`.dw_dr.dw_dr`); every other device runs a torch reference (the dense conv on the weight rebuilt from
the format), and a fake (meta) implementation gives the output's shape and memory format, so
``torch.compile(..., fullgraph=True)`` traces them without graph breaks and ``torch.export`` keeps them as
single nodes. Eager calls from :class:`deprune_plugin.accel.FastDWConv` bypass the op layer (its dispatch
costs several microseconds) and run their own launch plans.

The CUDA implementations (what a compiled or exported graph calls) keep launch plans too
(:mod:`.planned`), keyed by the input's :func:`.planned.plan_key`, the static arguments and, per weight
tensor, its pointer, shape, dtype and version counter (an in-place write starts a new plan); at most
:data:`MAX_OP_PLANS`, least recently used dropped. A bias that is not fp32 is cast once per (tensor,
version) and the copy kept, so a graph passing the model's fp16 bias buffer costs no cast launch per call.

Padding is ``(top, bottom, left, right)``; ``act`` a key of :data:`.activations.ACTIVATIONS`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .activations import apply_activation
from .launch import conv_output_size
from .planned import PlannedCall, plan_call, plan_key

__all__ = ["MAX_OP_PLANS", "dw_direct_op", "dw_dr_op", "conv_output_size"]

#: Launch plans the custom ops' GPU implementations keep (least recently used dropped beyond).
MAX_OP_PLANS = 256
_PLANS: "OrderedDict[tuple, PlannedCall]" = OrderedDict()
_BIAS32: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_LOCK = threading.Lock()


def _tensor_key(t: Optional[torch.Tensor]) -> tuple:
    return () if t is None else (t.data_ptr(), tuple(t.shape), t.dtype, t._version)


def _bias32(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``bias`` as fp32: itself when it is, else a copy made once per (tensor, version) and kept."""
    if bias is None or bias.dtype == torch.float32:
        return bias
    key = _tensor_key(bias)
    with _LOCK:
        cast = _BIAS32.get(key)
        if cast is not None:
            _BIAS32.move_to_end(key)
            return cast
    cast = bias.float().contiguous()
    with _LOCK:
        _BIAS32[key] = cast
        while len(_BIAS32) > MAX_OP_PLANS:
            _BIAS32.popitem(last=False)
    return cast


def _planned(kind: str, launcher: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             tensors: Sequence[Optional[torch.Tensor]], static: tuple) -> torch.Tensor:
    """``launcher(x)`` through a kept launch plan for (x's signature, ``tensors``, ``static``)."""
    key = (kind, plan_key(x), static, tuple(_tensor_key(t) for t in tensors))
    with _LOCK:
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
    if plan is not None:
        return plan(x)
    plan, y, _ = plan_call(launcher, x, [t for t in tensors if t is not None])
    if plan is not None:
        with _LOCK:
            _PLANS[key] = plan
            while len(_PLANS) > MAX_OP_PLANS:
                _PLANS.popitem(last=False)
    return y


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


def _direct_call(x, tap_ptr, tap_idx, tap_val, bias, kernel_size, stride, padding, dilation, act,
                 backend: str = "cupy") -> torch.Tensor:
    """The direct kernel on ``x`` through a kept plan (``backend="emu"``: the host emulation, for tests)."""
    from .dw_direct import dw_direct
    from .formats import CompactTaps

    bias = _bias32(bias)
    conv = dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), act=act, backend=backend)

    def launch(t: torch.Tensor) -> torch.Tensor:  # (only without a plan: the format's checks sync the device)
        return dw_direct(t, CompactTaps(tap_ptr, tap_idx, tap_val, tuple(kernel_size)), bias, **conv)
    return _planned("direct", launch, x, (tap_ptr, tap_idx, tap_val, bias), (tuple(kernel_size), *conv.values()))


@dw_direct_op.register_kernel("cuda")
def _dw_direct_cuda(x, tap_ptr, tap_idx, tap_val, bias, kernel_size, stride, padding, dilation, act):
    return _direct_call(x, tap_ptr, tap_idx, tap_val, bias, kernel_size, stride, padding, dilation, act)


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


def _dr_call(x, col_ptr, col_chan, col_tap, col_val, col_kept, bias, kernel_size, group_size, tile, stride,
             padding, dilation, act, backend: str = "cupy") -> torch.Tensor:
    """The DR kernel on ``x`` through a kept plan (``backend="emu"``: the host emulation, for tests)."""
    from .dw_dr import dw_dr
    from .formats import DRColumns

    bias = _bias32(bias)
    conv = dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), act=act, backend=backend)

    def launch(t: torch.Tensor) -> torch.Tensor:  # (only without a plan: the format's checks sync the device)
        cols = DRColumns(col_ptr, col_chan, col_tap, col_val, col_kept, tuple(kernel_size), group_size, tile,
                         t.shape[1])
        return dw_dr(t, cols, bias, **conv)
    return _planned("dr", launch, x, (col_ptr, col_chan, col_tap, col_val, col_kept, bias),
                    (tuple(kernel_size), group_size, tile, *conv.values()))


@dw_dr_op.register_kernel("cuda")
def _dw_dr_cuda(x, col_ptr, col_chan, col_tap, col_val, col_kept, bias, kernel_size, group_size, tile, stride,
                padding, dilation, act):
    return _dr_call(x, col_ptr, col_chan, col_tap, col_val, col_kept, bias, kernel_size, group_size, tile, stride,
                    padding, dilation, act)


@dw_dr_op.register_fake
def _dw_dr_fake(x, col_ptr, col_chan, col_tap, col_val, col_kept, bias, kernel_size, group_size, tile, stride,
                padding, dilation, act):
    return _fake(x, kernel_size, stride, padding, dilation)
