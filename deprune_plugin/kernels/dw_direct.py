"""Launcher of ``cuda/dw_direct.cu``: direct tap-sparse depth-wise conv + bias + activation.

Also holds the argument checking and geometry shared with :mod:`.dw_dr` (:func:`prepare_conv`,
:func:`run_kernel`, :data:`ACTIVATIONS`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..accel.compact import CompactTaps
from . import cupy_launch, emulation
from .sources import KernelArg, KernelSource, arg_i32, arg_ptr, scalar_define, specialize

__all__ = ["ACTIVATIONS", "BACKENDS", "ConvGeometry", "dw_direct", "prepare_conv", "run_kernel"]

#: Epilogue activation codes (must match ``deprune_activate`` in the .cu files). "gelu" is the exact erf GELU.
ACTIVATIONS: dict[str, int] = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3, "hardswish": 4, "gelu": 5}
BACKENDS = ("cupy", "emu")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GRID_YZ = 65535
_SMEM_DEFAULT = 48 * 1024  # no opt-in needed below this
_SMEM_MAX = 99 * 1024      # opt-in dynamic smem available on every sm_80+ part (sm_86/89: 99 KB)
ROWS_PER_THREAD = 4        # DEPRUNE_ROWS: NCHW outputs per thread along H
PIX_PER_THREAD = 4         # DEPRUNE_PIX: NHWC output pixels per thread


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one DW conv call: input ``[n, c, h, w]``, output ``[n, c, oh, ow]``, window ``kh x kw``."""

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
    ph: int
    pw: int
    dh: int
    dw: int
    nhwc: bool

    def kernel_args(self) -> list[KernelArg]:
        """``N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW`` as int32 kernel arguments."""
        return [arg_i32(v) for v in (self.n, self.c, self.h, self.w, self.oh, self.ow, self.kh, self.kw,
                                     self.sh, self.sw, self.ph, self.pw, self.dh, self.dw)]

    def input_window(self, tile_h: int, tile_w: int) -> tuple[int, int]:
        """Input rows/cols (with halo) read by a ``tile_h x tile_w`` output tile."""
        return ((tile_h - 1) * self.sh + (self.kh - 1) * self.dh + 1,
                (tile_w - 1) * self.sw + (self.kw - 1) * self.dw + 1)


def _pair(name: str, value: int | Sequence[int], minimum: int) -> tuple[int, int]:
    vals = (value, value) if isinstance(value, int) else tuple(value)
    if len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(vals) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return vals[0], vals[1]


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def prepare_conv(x: torch.Tensor, *, weight_name: str, weight_tensors: Sequence[torch.Tensor],
                 num_channels: int, kernel_size: tuple[int, int], bias: torch.Tensor | None, stride, padding,
                 dilation, act: str, backend: str
                 ) -> tuple[torch.Tensor, ConvGeometry, torch.Tensor | None, int, torch.Tensor]:
    """Check the arguments of a DW conv launch (no device sync) and allocate its output.

    Args:
        x: ``[N, C, H, W]`` fp32/fp16/bf16, NCHW-contiguous or channels_last (anything else is made
            NCHW-contiguous). ``backend="cupy"`` needs it on CUDA, ``"emu"`` on the CPU.
        weight_name: name of the compact-weight argument, for error messages.
        weight_tensors: its tensors; they must be on ``x``'s device.
        num_channels, kernel_size: of the compact weight.
        bias: ``[C]`` float32 or ``x.dtype``, or None.

    Returns:
        ``(x, geometry, bias fp32 contiguous or None, act code, y)``; ``y`` is ``[N, C, OH, OW]`` in x's
        memory format.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    dh, dw = _pair("dilation", dilation, 1)
    kh, kw = kernel_size
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"empty output {oh}x{ow} for input {h}x{w}, kernel {kh}x{kw}, stride {(sh, sw)}, "
                         f"padding {(ph, pw)}, dilation {(dh, dw)}")
    if n > _MAX_GRID_YZ:
        raise ValueError(f"batch size {n} exceeds {_MAX_GRID_YZ} (one grid z slice per image)")
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
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    geo = ConvGeometry(n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, nhwc)
    return x, geo, bias, ACTIVATIONS[act], y


def run_kernel(backend: str, src: KernelSource, entry: str, grid: tuple[int, int, int],
               block: tuple[int, int, int], smem: int, args: Sequence[KernelArg],
               device: torch.device) -> None:
    """Launch on the GPU through CuPy (``"cupy"``) or run the host emulation (``"emu"``)."""
    if backend == "cupy":
        cupy_launch.launch(src, entry, grid, block, smem, args, device)
    else:
        emulation.launch(src, entry, grid, block, smem, args)


def _plan_nchw(g: ConvGeometry) -> tuple[tuple[int, int, int], int, int, int]:
    """Block, tile_h, tile_w and dynamic smem bytes of the NCHW variant: the largest tile (up to 256
    threads, shrunk for small planes) whose fp32 halo tile fits the default 48 KB, else the opt-in limit."""
    bx = 32 if g.ow > 16 else 16 if g.ow > 8 else 8
    by = min(256 // bx, _next_pow2(math.ceil(g.oh / ROWS_PER_THREAD)))
    taps = g.kh * g.kw
    while True:
        in_h, in_w = g.input_window(by * ROWS_PER_THREAD, bx)
        smem = 4 * (2 * taps + in_h * in_w)
        if smem <= _SMEM_DEFAULT or (by == 1 and bx == 8):
            break
        if by > 1:
            by //= 2
        else:
            bx //= 2
    if smem > _SMEM_MAX:
        raise ValueError(f"kernel window {g.kh}x{g.kw} with dilation {(g.dh, g.dw)} needs {smem} bytes of "
                         f"shared memory, more than {_SMEM_MAX}")
    return (bx, by, 1), by * ROWS_PER_THREAD, bx, smem


def _plan_nhwc(g: ConvGeometry) -> tuple[tuple[int, int, int], int, int, int]:
    """Block (channels, pixel groups), tile_h, tile_w and smem bytes of the NHWC variant."""
    cb = 32 if g.c > 16 else 16 if g.c > 8 else 8
    py = min(256 // cb, _next_pow2(math.ceil(g.oh * g.ow / PIX_PER_THREAD)))
    while True:
        pixels = py * PIX_PER_THREAD
        tile_w = min(_next_pow2(g.ow), pixels)
        tile_h = pixels // tile_w
        in_h, in_w = g.input_window(tile_h, tile_w)
        smem = 4 * in_h * in_w * cb
        if smem <= _SMEM_DEFAULT or (py == 1 and cb == 8):
            break
        if py > 1:
            py //= 2
        else:
            cb //= 2
    if smem > _SMEM_MAX:
        raise ValueError(f"kernel window {g.kh}x{g.kw} with dilation {(g.dh, g.dw)} needs {smem} bytes of "
                         f"shared memory in channels_last, more than {_SMEM_MAX}")
    return (cb, py, 1), tile_h, tile_w, smem


def dw_direct(x: torch.Tensor, taps: CompactTaps, bias: torch.Tensor | None, *, stride=(1, 1), padding=(0, 0),
              dilation=(1, 1), act: str = "identity", backend: str = "cupy") -> torch.Tensor:
    """Tap-sparse depth-wise conv:
    ``act(F.conv2d(x, taps.to_dense(), bias, stride, padding, dilation, groups=C))``.

    Args:
        x: ``[N, C, H, W]`` float32/float16/bfloat16, NCHW-contiguous or channels_last.
        taps: kept taps of the ``[C, 1, kh, kw]`` weight (BN folded), on ``x``'s device.
        bias: ``[C]`` (float32 or ``x.dtype``) or None.
        stride, padding, dilation: int or ``(h, w)`` pairs.
        act: ``"identity"``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"`` or ``"gelu"`` (exact erf).
        backend: ``"cupy"`` (x on CUDA, async on the current stream) or ``"emu"`` (x on CPU, host emulation).

    Returns:
        ``[N, C, OH, OW]`` in ``x``'s dtype and memory format (fp32 accumulation).
    """
    if not isinstance(taps, CompactTaps):
        raise TypeError(f"taps must be a CompactTaps, got {type(taps).__name__}")
    x, g, bias, act_code, y = prepare_conv(
        x, weight_name="taps", weight_tensors=(taps.tap_ptr, taps.tap_idx, taps.tap_val),
        num_channels=taps.num_channels, kernel_size=taps.kernel_size, bias=bias, stride=stride,
        padding=padding, dilation=dilation, act=act, backend=backend)
    if g.n == 0:
        return y
    if g.nhwc:
        block, tile_h, tile_w, smem = _plan_nhwc(g)
        grid_y = math.ceil(g.c / block[0])
    else:
        block, tile_h, tile_w, smem = _plan_nchw(g)
        grid_y = g.c
    if grid_y > _MAX_GRID_YZ:
        raise ValueError(f"{g.c} channels exceed the launch grid limit ({_MAX_GRID_YZ} CTAs along y)")
    grid = (math.ceil(g.oh / tile_h) * math.ceil(g.ow / tile_w), grid_y, g.n)
    src = specialize("dw_direct.cu", {
        "DEPRUNE_SCALAR": scalar_define(x.dtype),
        "DEPRUNE_LAYOUT_NHWC": int(g.nhwc),
        "DEPRUNE_ROWS": ROWS_PER_THREAD,
        "DEPRUNE_PIX": PIX_PER_THREAD,
    })
    args = [arg_ptr(x), arg_ptr(y), arg_ptr(taps.tap_ptr), arg_ptr(taps.tap_idx), arg_ptr(taps.tap_val),
            arg_ptr(bias), *g.kernel_args(), arg_i32(tile_h), arg_i32(tile_w), arg_i32(act_code)]
    run_kernel(backend, src, "deprune_dw_direct", grid, block, smem, args, x.device)
    return y
