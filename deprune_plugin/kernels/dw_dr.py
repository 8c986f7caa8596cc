"""Launcher of ``cuda/dw_dr.cu``: the paper's DR form, one compacted 32 x K'_g sub-GEMM per balanced range."""
from __future__ import annotations

import math

import torch

from .formats import DRColumns
from .launch import MAX_GRID_YZ, prepare_conv, run_kernel
from .sources import arg_i32, arg_ptr, scalar_define, specialize

__all__ = ["dw_dr", "dr_static_smem_bytes"]

_THREADS_PER_AXIS = 16      # DR_T in cuda/dw_dr.cu: the CTA is 16 x 16 threads
POSITIONS_PER_THREAD = 4    # DEPRUNE_DR_PN: a CTA covers 16 * 4 = 64 output positions
_STATIC_SMEM_LIMIT = 48 * 1024
_MAX_GROUP_SIZE = 128       # DR_RM = group_size / 16 rows of accumulators per thread


def dr_static_smem_bytes(group_size: int, tile: int) -> int:
    """Static shared memory of one ``deprune_dw_dr`` CTA (mirrors the ``__shared__`` arrays of the kernel)."""
    rows = math.ceil(group_size / _THREADS_PER_AXIS) * _THREADS_PER_AXIS
    positions = _THREADS_PER_AXIS * POSITIONS_PER_THREAD
    return 4 * (tile * rows + tile * (positions + 1) + 4 * tile + 2 * positions)


def dw_dr(x: torch.Tensor, cols: DRColumns, bias: torch.Tensor | None, *, stride=(1, 1), padding=(0, 0),
          dilation=(1, 1), act: str = "identity", backend: str = "cupy") -> torch.Tensor:
    """Depth-wise conv as the DR sub-GEMMs of DEPrune:
    ``act(F.conv2d(x, cols.to_dense(), bias, stride, padding, dilation, groups=C))``.

    Args:
        x: ``[N, C, H, W]`` float32/float16/bfloat16, NCHW-contiguous or channels_last.
        cols: compacted DR columns of the ``[C, 1, kh, kw]`` weight (BN folded), on ``x``'s device.
        bias: ``[C]`` (float32 or ``x.dtype``) or None.
        stride, padding, dilation: int or ``(h, w)`` pairs.
        act: ``"identity"``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"`` or ``"gelu"`` (exact erf).
        backend: ``"cupy"`` (x on CUDA, async on the current stream) or ``"emu"`` (x on CPU, host emulation).

    Returns:
        ``[N, C, OH, OW]`` in ``x``'s dtype and memory format (fp32 accumulation).

    Note:
        Like the paper's dense sub-GEMM, the zeros of W_g multiply every input column of the range: an
        inf/nan input poisons all outputs of its balanced range (``0 * inf = nan``), unlike ``F.conv2d``.
    """
    if not isinstance(cols, DRColumns):
        raise TypeError(f"cols must be a DRColumns, got {type(cols).__name__}")
    if cols.group_size > _MAX_GROUP_SIZE:
        raise ValueError(f"cols.group_size must be <= {_MAX_GROUP_SIZE}, got {cols.group_size}")
    smem = dr_static_smem_bytes(cols.group_size, cols.tile)
    if smem > _STATIC_SMEM_LIMIT:
        raise ValueError(f"cols.group_size={cols.group_size} with cols.tile={cols.tile} needs {smem} bytes "
                         f"of static shared memory (limit {_STATIC_SMEM_LIMIT}); use a smaller tile")
    x, g, bias, act_code, y = prepare_conv(
        x, weight_name="cols", weight_tensors=(cols.col_ptr, cols.col_chan, cols.col_tap, cols.col_val),
        num_channels=cols.num_channels, kernel_size=cols.kernel_size, bias=bias, stride=stride,
        padding=padding, dilation=dilation, act=act, backend=backend)
    if g.n == 0:
        return y
    if cols.num_ranges > MAX_GRID_YZ:
        raise ValueError(f"{cols.num_ranges} balanced ranges exceed the launch grid limit ({MAX_GRID_YZ})")
    positions = _THREADS_PER_AXIS * POSITIONS_PER_THREAD
    grid = (math.ceil(g.oh * g.ow / positions), cols.num_ranges, g.n)
    block = (_THREADS_PER_AXIS, _THREADS_PER_AXIS, 1)
    src = specialize("dw_dr.cu", {
        "DEPRUNE_SCALAR": scalar_define(x.dtype),
        "DEPRUNE_LAYOUT_NHWC": int(g.nhwc),
        "DEPRUNE_GROUP_SIZE": cols.group_size,
        "DEPRUNE_KTILE": cols.tile,
        "DEPRUNE_DR_PN": POSITIONS_PER_THREAD,
    })
    args = [arg_ptr(x), arg_ptr(y), arg_ptr(cols.col_ptr), arg_ptr(cols.col_chan), arg_ptr(cols.col_tap),
            arg_ptr(cols.col_val), arg_ptr(bias), *g.kernel_args(), arg_i32(act_code)]
    run_kernel(backend, src, "deprune_dw_dr", grid, block, 0, args, x.device)
    return y
