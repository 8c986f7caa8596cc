"""Launch glue shared by the kernel launchers: argument checks, output geometry, output allocation, and the
switch between the GPU (CuPy) and the host emulation.
"""
from __future__ import annotations

import contextlib
import numbers
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..core.checks import pair
from . import cupy_launch, emulation
from .activations import ACTIVATIONS
from .sources import KernelArg, KernelSource, arg_i32

__all__ = ["KERNEL_BACKENDS", "CapturedLaunch", "ConvGeometry", "DEFAULT_SMEM_LIMIT", "capture_launches",
           "conv_output_size", "conv_padding", "dynamic_smem_limit", "prepare_conv", "run_kernel", "MAX_GRID_YZ"]

#: Where a kernel runs: ``"cupy"`` (CUDA tensors, NVRTC through CuPy) or ``"emu"`` (CPU tensors, host emulation).
KERNEL_BACKENDS = ("cupy", "emu")
MAX_GRID_YZ = 65535
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_SMEM_LIMIT = cupy_launch.DEFAULT_SMEM_LIMIT


def conv_padding(padding) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding from an int (all four sides), an ``(h, w)`` pair
    (symmetric: ``(h, h, w, w)``) or a ``(top, bottom, left, right)`` 4-tuple (e.g. TensorFlow "SAME")."""
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        vals: tuple = (padding,) * 4
    else:
        try:
            vals = tuple(padding)
        except TypeError:
            vals = ()
        if len(vals) == 2:
            vals = (vals[0], vals[0], vals[1], vals[1])
    if len(vals) != 4 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in vals):
        raise TypeError(f"padding must be an int, an (h, w) pair or (top, bottom, left, right) ints, got {padding!r}")
    if min(vals) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return int(vals[0]), int(vals[1]), int(vals[2]), int(vals[3])


def conv_output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    """Output length of one spatial dim (as ``F.conv2d`` after ``F.pad``)."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def dynamic_smem_limit(backend: str, device: torch.device) -> int:
    """Most dynamic shared memory one CTA may request: the device's opt-in maximum on the GPU
    (:func:`.cupy_launch.max_dynamic_smem`), the default 48 KB where no device is known (host emulation)."""
    return cupy_launch.max_dynamic_smem(device) if backend == "cupy" else DEFAULT_SMEM_LIMIT


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one DW conv call: input ``[n, c, h, w]``, output ``[n, c, oh, ow]``, window ``kh x kw``,
    zero padding ``pad = (top, bottom, left, right)``. The kernels only take the top and left padding (where
    the first window starts); the bottom and right padding only size ``oh`` / ``ow``."""

    n: int
    c: int
    h: int
    w: int
    oh: int
    ow: int
    kh: int
    kw: int
    sh: int
    sw: int
    pad: tuple[int, int, int, int]
    dh: int
    dw: int
    nhwc: bool

    def kernel_args(self) -> list[KernelArg]:
        """``N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW`` as int32 kernel arguments (``PH`` / ``PW``:
        the top / left padding)."""
        return [arg_i32(v) for v in (self.n, self.c, self.h, self.w, self.oh, self.ow, self.kh, self.kw,
                                     self.sh, self.sw, self.pad[0], self.pad[2], self.dh, self.dw)]

    def input_window(self, tile_h: int, tile_w: int) -> tuple[int, int]:
        """Input rows/cols (with halo) read by a ``tile_h x tile_w`` output tile."""
        return ((tile_h - 1) * self.sh + (self.kh - 1) * self.dh + 1,
                (tile_w - 1) * self.sw + (self.kw - 1) * self.dw + 1)


def prepare_conv(x: torch.Tensor, *, weight_name: str, weight_tensors: Sequence[torch.Tensor],
                 num_channels: int, kernel_size: tuple[int, int], bias: torch.Tensor | None, stride, padding,
                 dilation, act: str, backend: str, out_channels: int | None = None
                 ) -> tuple[torch.Tensor, ConvGeometry, torch.Tensor | None, int, torch.Tensor]:
    """Check the arguments of a DW conv launch (no device sync) and allocate its output.

    Args:
        x: ``[N, C, H, W]`` fp32/fp16/bf16, NCHW-contiguous or channels_last (anything else is made
            NCHW-contiguous). ``backend="cupy"`` needs it on CUDA, ``"emu"`` on the CPU.
        weight_name: name of the compact-weight argument, for error messages.
        weight_tensors: its tensors; they must be on ``x``'s device.
        num_channels, kernel_size: of the compact weight.
        bias: ``[C]`` float32 or ``x.dtype``, or None.
        stride, dilation: int or ``(h, w)`` pair.
        padding: int, ``(h, w)`` pair (symmetric) or ``(top, bottom, left, right)`` (see :func:`conv_padding`).
        act: a key of :data:`.activations.ACTIVATIONS` (the epilogue activation).
        backend: one of :data:`KERNEL_BACKENDS`: ``"cupy"`` (x on CUDA, async on the current stream) or
            ``"emu"`` (x on CPU, host emulation).
        out_channels: channels of the output (default C; a fused DW + 1x1 pair writes the 1x1's).

    Returns:
        ``(x, geometry, bias fp32 contiguous or None, act code, y)``; ``y`` is ``[N, out_channels, OH, OW]``
        in x's memory format.
    """
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if backend == "cupy" and x.device.type != "cuda":
        raise ValueError(f"backend='cupy' needs x on a CUDA device, got {x.device}; "
                         "use backend='emu' on the CPU")
    if backend == "emu" and x.device.type != "cpu":
        raise ValueError(f"backend='emu' runs on the CPU, got x on {x.device}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    n, c, h, w = x.shape
    if c != num_channels:
        raise ValueError(f"x has {c} channels but {weight_name} has {num_channels}")
    for t in weight_tensors:
        if t.device != x.device:
            raise ValueError(f"{weight_name} is on {t.device} but x is on {x.device}; "
                             f"move it once with {weight_name}.to(x.device)")
        if not t.is_contiguous():
            raise ValueError(f"{weight_name} tensors must be contiguous")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (c,):
            raise ValueError(f"bias must have shape [{c}], got {tuple(bias.shape)}")
        if bias.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"bias must be float32 or x.dtype ({x.dtype}), got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        bias = bias.to(torch.float32).contiguous()
    sh, sw = pair(stride, "stride", 1)
    pad = conv_padding(padding)
    dh, dw = pair(dilation, "dilation", 1)
    kh, kw = kernel_size
    oh = conv_output_size(h, kh, sh, pad[0], pad[1], dh)
    ow = conv_output_size(w, kw, sw, pad[2], pad[3], dw)
    if oh < 1 or ow < 1:
        raise ValueError(f"empty output {oh}x{ow} for input {h}x{w}, kernel {kh}x{kw}, stride {(sh, sw)}, "
                         f"padding {pad} (top, bottom, left, right), dilation {(dh, dw)}")
    if n > MAX_GRID_YZ:
        raise ValueError(f"batch size {n} exceeds {MAX_GRID_YZ} (one grid z slice per image)")
    if max(c * h * w, c * oh * ow) >= 2**31:
        raise ValueError(f"one image of {c}x{h}x{w} (output {c}x{oh}x{ow}) exceeds 2^31 elements; the kernels "
                         "index inside an image with 32-bit ints")

    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    if channels_last and (not x.is_contiguous() or x.stride(1) < x.stride(3)):
        nhwc = True  # the stride test settles tensors contiguous in both formats (e.g. H = W = 1)
    elif x.is_contiguous():
        nhwc = False
    else:
        x, nhwc = x.contiguous(), False
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    y = torch.empty((n, c if out_channels is None else out_channels, oh, ow), dtype=x.dtype, device=x.device,
                    memory_format=fmt)
    geo = ConvGeometry(n, c, h, w, oh, ow, kh, kw, sh, sw, pad, dh, dw, nhwc)
    return x, geo, bias, ACTIVATIONS[act].code, y


@dataclass(frozen=True)
class CapturedLaunch:
    """A launch :func:`run_kernel` was asked for inside :func:`capture_launches` (and did not run)."""

    backend: str
    src: KernelSource
    entry: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int
    args: tuple[KernelArg, ...]
    device: torch.device


# Per thread: a launcher called on another thread meanwhile must launch as usual.
_CAPTURE = threading.local()


@contextlib.contextmanager
def capture_launches() -> Iterator[list[CapturedLaunch]]:
    """Inside the ``with`` block, :func:`run_kernel` calls made by this thread are recorded as
    :class:`CapturedLaunch` instead of run. The launchers still check their arguments, plan, specialise and
    allocate their output, so a launcher called here hands back its (unwritten) output and the exact launch
    it would make: :mod:`.planned` turns that into a per-signature launch plan."""
    records: list[CapturedLaunch] = []
    outer = getattr(_CAPTURE, "records", None)
    _CAPTURE.records = records
    try:
        yield records
    finally:
        _CAPTURE.records = outer


def run_kernel(backend: str, src: KernelSource, entry: str, grid: tuple[int, int, int],
               block: tuple[int, int, int], smem: int, args: Sequence[KernelArg],
               device: torch.device) -> None:
    """Launch on the GPU through CuPy (``"cupy"``) or run the host emulation (``"emu"``); inside
    :func:`capture_launches` only record the launch."""
    records = getattr(_CAPTURE, "records", None)
    if records is not None:
        records.append(CapturedLaunch(backend, src, entry, tuple(grid), tuple(block), int(smem), tuple(args),
                                      device))
        return
    if backend == "cupy":
        cupy_launch.launch(src, entry, grid, block, smem, args, device)
    else:
        emulation.launch(src, entry, grid, block, smem, args)
