"""Launcher of ``cuda/dw_direct.cu``: direct tap-sparse depth-wise conv + bias + activation."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .formats import CompactTaps
from .launch import DEFAULT_SMEM_LIMIT, MAX_GRID_YZ, ConvGeometry, dynamic_smem_limit, prepare_conv, run_kernel
from .sources import arg_i32, arg_ptr, scalar_define, specialize

__all__ = ["dw_direct", "dw_direct_defines", "plan_tile", "ROWS_PER_THREAD", "PIX_PER_THREAD"]

ROWS_PER_THREAD = 4        # DEPRUNE_ROWS: NCHW outputs per thread along H
PIX_PER_THREAD = 4         # DEPRUNE_PIX: NHWC output pixels per thread
_MIN_BLOCK_X = 8           # narrowest block along x (output columns in NCHW, channels in NHWC)


def dw_direct_defines(dtype: torch.dtype, nhwc: bool) -> dict[str, object]:
    """The ``#define`` set :func:`dw_direct` specialises ``cuda/dw_direct.cu`` with, for inputs of ``dtype``
    in NCHW (``nhwc=False``) or channels_last (``nhwc=True``)."""
    return {"DEPRUNE_SCALAR": scalar_define(dtype), "DEPRUNE_LAYOUT_NHWC": int(nhwc),
            "DEPRUNE_ROWS": ROWS_PER_THREAD, "DEPRUNE_PIX": PIX_PER_THREAD}


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _shrink_to_fit(g: ConvGeometry, by: int, bx: int, smem_of: Callable[[int, int], int],
                   limit: int) -> tuple[int, int, int]:
    """Halve the block's y extent (down to 1), then its x extent (down to 8), until ``smem_of(by, bx)`` fits
    the default 48 KB (no opt-in; ``limit`` if lower). Only the smallest block may use more, up to ``limit``.
    Returns ``(by, bx, smem bytes)``; ValueError if even the smallest block needs more than ``limit``."""
    target = min(DEFAULT_SMEM_LIMIT, limit)
    smem = smem_of(by, bx)
    while smem > target and (by > 1 or bx > _MIN_BLOCK_X):
        if by > 1:
            by //= 2
        else:
            bx //= 2
        smem = smem_of(by, bx)
    if smem > limit:
        layout = " in channels_last" if g.nhwc else ""
        raise ValueError(f"kernel window {g.kh}x{g.kw} with dilation {(g.dh, g.dw)} needs {smem} bytes of shared "
                         f"memory{layout}, more than the {limit} the device allows")
    return by, bx, smem


def _nhwc_tile(g: ConvGeometry, py: int) -> tuple[int, int]:
    """``(tile_h, tile_w)`` of an NHWC block of ``py`` pixel groups: as wide as the output, then rows."""
    pixels = py * PIX_PER_THREAD
    tile_w = min(_next_pow2(g.ow), pixels)
    return pixels // tile_w, tile_w


def plan_tile(g: ConvGeometry, smem_limit: int = DEFAULT_SMEM_LIMIT
              ) -> tuple[tuple[int, int, int], int, int, int]:
    """Launch plan ``(block, tile_h, tile_w, dynamic smem bytes)`` of ``deprune_dw_direct`` for ``g``: the
    largest block (up to 256 threads, fewer for small outputs) whose fp32 input tile with halo fits the
    default 48 KB; a window so large that even the smallest block needs more may use up to ``smem_limit``
    (the device's opt-in maximum, see :func:`.launch.dynamic_smem_limit`; default 48 KB: no device known).

    NCHW: block ``(tile_w, tile_h / ROWS_PER_THREAD)``; smem = tap values and offsets + the input tile.
    NHWC: block ``(channels, tile_h * tile_w / PIX_PER_THREAD)``; smem = the input tile x channels.
    """
    if g.nhwc:
        cb = 32 if g.c > 16 else 16 if g.c > 8 else 8
        py = min(256 // cb, _next_pow2(math.ceil(g.oh * g.ow / PIX_PER_THREAD)))
        py, cb, smem = _shrink_to_fit(
            g, py, cb, lambda py, cb: 4 * cb * math.prod(g.input_window(*_nhwc_tile(g, py))), smem_limit)
        return (cb, py, 1), *_nhwc_tile(g, py), smem
    bx = 32 if g.ow > 16 else 16 if g.ow > 8 else 8
    by = min(256 // bx, _next_pow2(math.ceil(g.oh / ROWS_PER_THREAD)))
    by, bx, smem = _shrink_to_fit(
        g, by, bx, lambda by, bx: 4 * (2 * g.kh * g.kw + math.prod(g.input_window(by * ROWS_PER_THREAD, bx))),
        smem_limit)
    return (bx, by, 1), by * ROWS_PER_THREAD, bx, smem


def dw_direct(x: torch.Tensor, taps: CompactTaps, bias: torch.Tensor | None, *, stride=(1, 1), padding=(0, 0),
              dilation=(1, 1), act: str = "identity", backend: str = "cupy") -> torch.Tensor:
    """Tap-sparse depth-wise conv:
    ``act(F.conv2d(x, taps.to_dense(), bias, stride, padding, dilation, groups=C))``.

    Args:
        taps: kept taps of the ``[C, 1, kh, kw]`` weight (BN folded), on ``x``'s device.
        x, bias, stride, padding, dilation, act, backend: as in :func:`.launch.prepare_conv` (``padding`` an int,
            ``(h, w)`` or ``(top, bottom, left, right)``; ``act`` a key of :data:`.activations.ACTIVATIONS`).

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
    block, tile_h, tile_w, smem = plan_tile(g, dynamic_smem_limit(backend, x.device))
    grid_y = math.ceil(g.c / block[0]) if g.nhwc else g.c
    if grid_y > MAX_GRID_YZ:
        raise ValueError(f"{g.c} channels exceed the launch grid limit ({MAX_GRID_YZ} CTAs along y)")
    grid = (math.ceil(g.oh / tile_h) * math.ceil(g.ow / tile_w), grid_y, g.n)
    src = specialize("dw_direct.cu", dw_direct_defines(x.dtype, g.nhwc))
    args = [arg_ptr(x), arg_ptr(y), arg_ptr(taps.tap_ptr), arg_ptr(taps.tap_idx), arg_ptr(taps.tap_val),
            arg_ptr(bias), *g.kernel_args(), arg_i32(tile_h), arg_i32(tile_w), arg_i32(act_code)]
    run_kernel(backend, src, "deprune_dw_direct", grid, block, smem, args, x.device)
    return y
