"""Launcher of ``cuda/dw_dr.cu``: the paper's DR form, one compacted 32 x K'_g sub-GEMM per balanced range."""
from __future__ import annotations

import math

import torch

from .formats import DRColumns
from .launch import MAX_GRID_YZ, prepare_conv, run_kernel
from .sources import arg_i32, arg_ptr, scalar_define, specialize

__all__ = ["dw_dr", "dw_dr_defines", "dr_static_smem_bytes"]

_THREADS_PER_AXIS = 16      # DR_T in cuda/dw_dr.cu: the CTA is 16 x 16 threads
POSITIONS_PER_THREAD = 4    # DEPRUNE_DR_PN: a CTA covers 16 * 4 = 64 output positions
_STATIC_SMEM_LIMIT = 48 * 1024
_MAX_GROUP_SIZE = 128       # DR_RM = group_size / 16 rows of accumulators per thread


def dw_dr_defines(dtype: torch.dtype, nhwc: bool, group_size: int, tile: int) -> dict[str, object]:
    """The ``#define`` set :func:`dw_dr` specialises ``cuda/dw_dr.cu`` with, for inputs of ``dtype`` in NCHW
    (``nhwc=False``) or channels_last, and columns of ``group_size`` channels per range padded to ``tile``."""
    return {"DEPRUNE_SCALAR": scalar_define(dtype), "DEPRUNE_LAYOUT_NHWC": int(nhwc),
            "DEPRUNE_GROUP_SIZE": int(group_size), "DEPRUNE_KTILE": int(tile), "DEPRUNE_DR_PN": POSITIONS_PER_THREAD}


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
        cols: compacted DR columns of the ``[C, 1, kh, kw]`` weight (BN folded), on ``x``'s device.
        x, bias, stride, padding, dilation, act, backend: as in :func:`.launch.prepare_conv` (``padding`` an int,
            ``(h, w)`` or ``(top, bottom, left, right)``; ``act`` a key of :data:`.activations.ACTIVATIONS`).

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
    src = specialize("dw_dr.cu", dw_dr_defines(x.dtype, g.nhwc, cols.group_size, cols.tile))
    args = [arg_ptr(x), arg_ptr(y), arg_ptr(cols.col_ptr), arg_ptr(cols.col_chan), arg_ptr(cols.col_tap),
            arg_ptr(cols.col_val), arg_ptr(bias), *g.kernel_args(), arg_i32(act_code)]
    run_kernel(backend, src, "deprune_dw_dr", grid, block, 0, args, x.device)
    return y
