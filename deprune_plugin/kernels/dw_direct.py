"""Launcher of ``cuda/dw_direct.cu``: direct tap-sparse depth-wise conv + bias + activation."""
from __future__ import annotations

import math

import torch

from .formats import CompactTaps
from .launch import MAX_GRID_YZ, ConvGeometry, prepare_conv, run_kernel
from .sources import arg_i32, arg_ptr, scalar_define, specialize

__all__ = ["dw_direct", "ROWS_PER_THREAD", "PIX_PER_THREAD"]

_SMEM_DEFAULT = 48 * 1024  # no opt-in needed below this
_SMEM_MAX = 99 * 1024      # opt-in dynamic smem available on every sm_80+ part (sm_86/89: 99 KB)
ROWS_PER_THREAD = 4        # DEPRUNE_ROWS: NCHW outputs per thread along H
PIX_PER_THREAD = 4         # DEPRUNE_PIX: NHWC output pixels per thread


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


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
    if grid_y > MAX_GRID_YZ:
        raise ValueError(f"{g.c} channels exceed the launch grid limit ({MAX_GRID_YZ} CTAs along y)")
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
