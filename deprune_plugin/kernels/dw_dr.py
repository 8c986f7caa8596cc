"""Launcher of ``cuda/dw_dr.cu``: the paper's DR form, one compacted ``GS x K'_g`` sub-GEMM per balanced range,
on tensor cores (``mma.sync`` m16n8k16) for fp16/bf16 and on CUDA cores for fp32.

:func:`dw_dr_plan` turns a call signature (:class:`.launch.ConvGeometry`, dtype, kept columns per range) into a
:class:`.plan.KernelPlan`: the ``#define`` set (dtype, layout, group size, K tile, positions per CTA, tensor
cores or not, window / stride / dilation: all compile time), grid, block, shared memory and the bytes the
launch moves. :func:`dw_dr` launches exactly that plan.

How kept columns map onto MMA K steps (HSR alignment): a range's K'_g kept columns are consumed in order,
16 per K step (``mma.sync`` K = 16), 32 per shared-memory K tile. The kernel runs ``ceil(K'_g / 16)`` K steps;
when ``K'_g`` is not a multiple of 16 the last K step is completed with zero columns (zero weights, zero
inputs that are never loaded). HSR's column tile of 32 is two whole K steps, so an HSR-aligned range wastes
no MMA work; :attr:`.plan.KernelPlan.extra` reports ``k_steps`` and ``zero_columns`` per plan.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .formats import DRColumns
from .launch import DEFAULT_SMEM_LIMIT, MAX_GRID_YZ, ConvGeometry, prepare_conv, run_kernel
from .plan import DEFAULT_SMS, KernelPlan, fill_target
from .sources import arg_i32, arg_ptr, scalar_define, specialize

__all__ = ["dw_dr", "dw_dr_defines", "dw_dr_plan", "dr_plan_positions", "dr_positions_per_cta", "dr_pt_options",
           "dr_static_smem_bytes", "dr_x_word", "dr_x_words_per_position",
           "K_STEP", "K_TILE", "THREADS", "MAX_GROUP_SIZE"]

SOURCE = "dw_dr.cu"
ENTRY = "deprune_dw_dr"
K_STEP = 16           # mma.sync m16n8k16: columns per K step
K_TILE = 32           # DEPRUNE_KTILE: columns staged per shared-memory K tile (two K steps)
THREADS = 256         # DR_THREADS: eight warps
MAX_GROUP_SIZE = 128  # at most 32 fp32 accumulators per thread at 64 positions per CTA
_ACCUMULATORS = 32    # per thread: rows x positions of a CTA <= 32 * THREADS
_TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)
_WEIGHT_BYTES_PER_COLUMN = 12  # col_chan, col_tap (int32) and col_val (fp32)


def _rows(group_size: int) -> int:
    """GSP: the range's rows rounded up to whole 16-row MMA tiles."""
    return -(-group_size // 16) * 16


def dr_positions_per_cta(group_size: int) -> int:
    """The largest PT (output positions per CTA) the kernel takes for ``group_size`` channels per range: the
    largest multiple of 64 (8 warps x one n8 tile) with ``rows x PT <= 32 x THREADS`` accumulators, at most
    256."""
    pt = (_ACCUMULATORS * THREADS // _rows(group_size)) // 64 * 64
    return max(64, min(256, pt))


def dr_pt_options(group_size: int) -> tuple[int, ...]:
    """Every PT the kernel compiles for ``group_size``, largest first: 64, 128 or 256 (a multiple of 64 that
    divides the 256 threads) up to :func:`dr_positions_per_cta`."""
    return tuple(pt for pt in (256, 128, 64) if pt <= dr_positions_per_cta(group_size))


def dr_plan_positions(positions: int, ranges: int, n: int, group_size: int, sms: int = DEFAULT_SMS
                      ) -> tuple[int, int]:
    """``(PT, allowed)``: of the PTs whose grid ``ceil(positions / PT) x ranges x n`` has at least
    ``min(sms, allowed)`` CTAs (``allowed``: the CTAs of the smallest PT, 64), the one with the fewest CTAs
    (a larger PT builds each A fragment for more MMAs), and of those the smallest (fewer positions past the
    end; less shared memory). Fewer CTAs than SMs would leave SMs idle."""
    options = dr_pt_options(group_size)
    allowed = -(-positions // options[-1]) * ranges * n
    need = fill_target(allowed, sms)
    ctas = {pt: -(-positions // pt) * ranges * n for pt in options}
    pt = min((ctas[pt], pt) for pt in options if ctas[pt] >= need)[1]
    return pt, allowed


def dr_x_words_per_position(k_tile: int = K_TILE) -> int:
    """The kernel's ``DR_XS``: 32-bit words per position of the 16-bit X tile (column pairs + 4 words)."""
    return k_tile // 2 + 4


def dr_x_word(pp: int, kp: int, k_tile: int = K_TILE) -> int:
    """The kernel's ``DR_XW``: word of column pair ``kp`` of position ``pp`` in the X tile, the pair's low 2
    bits XOR-ed with ``(pp / 8) % 4`` (conflict-free staging in NCHW, ``kernels.smem_banks``)."""
    return pp * dr_x_words_per_position(k_tile) + (kp ^ ((pp >> 3) & 3))


def dr_uses_tensor_cores(dtype: torch.dtype) -> bool:
    """Whether :func:`dw_dr` compiles the ``mma.sync`` path for inputs of ``dtype`` (fp16 / bf16; on GPUs
    older than sm_80 the same source falls back to CUDA cores at compile time)."""
    return dtype in _TENSOR_CORE_DTYPES


def dw_dr_defines(dtype: torch.dtype, nhwc: bool, group_size: int, tile: int | None = None, *,
                  kernel_size: tuple[int, int] = (3, 3), stride: tuple[int, int] = (1, 1),
                  dilation: tuple[int, int] = (1, 1), positions_per_cta: int | None = None) -> dict[str, object]:
    """The ``#define`` set ``cuda/dw_dr.cu`` is specialised with for inputs of ``dtype`` in NCHW (``nhwc=False``)
    or channels_last, ``group_size`` channels per range, and the given window / stride / dilation (defaults: a
    3x3 stride-1 layer). ``tile`` (the columns' HSR padding) does not change the source: the kernel's K tile is
    always :data:`K_TILE` and K steps past a range's kept columns are zero-filled; it is accepted for callers
    that pass it. ``positions_per_cta``: PT (default :func:`dr_positions_per_cta`)."""
    del tile  # documented above: no part of the specialisation
    return {"DEPRUNE_SCALAR": scalar_define(dtype), "DEPRUNE_LAYOUT_NHWC": int(nhwc),
            "DEPRUNE_GROUP_SIZE": int(group_size), "DEPRUNE_KTILE": K_TILE,
            "DEPRUNE_DR_PT": positions_per_cta or dr_positions_per_cta(group_size),
            "DEPRUNE_DR_MMA": int(dr_uses_tensor_cores(dtype)),
            "DEPRUNE_KH": int(kernel_size[0]), "DEPRUNE_KW": int(kernel_size[1]),
            "DEPRUNE_SH": int(stride[0]), "DEPRUNE_SW": int(stride[1]),
            "DEPRUNE_DH": int(dilation[0]), "DEPRUNE_DW": int(dilation[1])}


def dr_static_smem_bytes(group_size: int, tensor_cores: bool, positions_per_cta: int | None = None) -> int:
    """Static shared memory of one ``deprune_dw_dr`` CTA (mirrors the kernel's ``__shared__`` arrays): the union
    of the X tile (16-bit column pairs per position with the MMA path, fp32 positions per column without) and
    the fp32 output tile, plus position and column metadata. ``positions_per_cta``: PT (default
    :func:`dr_positions_per_cta`)."""
    pt, rows = positions_per_cta or dr_positions_per_cta(group_size), _rows(group_size)
    x_words = pt * (K_TILE // 2 + 4) if tensor_cores else K_TILE * (pt + 1)
    buf_words = max(x_words, rows * (pt + 1))
    column_words = 3 * K_TILE + 4 * K_TILE  # offsets, dy, dx + two weight words per column, double-buffered
    return 4 * (buf_words + 2 * pt + column_words)


def _in_bounds(out: int, size: int, stride: int, pad: int, offset: int) -> int:
    """Output positions along one axis whose input coordinate ``o * stride - pad + offset`` is inside [0, size)."""
    lo = max(0, -((offset - pad) // stride))             # ceil((pad - offset) / stride)
    hi = min(out - 1, (size - 1 + pad - offset) // stride)
    return max(0, hi - lo + 1)


def dw_dr_plan(g: ConvGeometry, dtype: torch.dtype, cols: DRColumns | Sequence[int], *, group_size: int = 32,
               smem_limit: int = DEFAULT_SMEM_LIMIT, sms: int = DEFAULT_SMS) -> KernelPlan:
    """The launch of ``deprune_dw_dr`` for one call signature.

    Args:
        g: the call's shapes (:func:`.launch.prepare_conv`).
        dtype: storage dtype of the input and output (fp16 / bf16: tensor cores).
        cols: the layer's :class:`.formats.DRColumns` (its group size is used), or the kept column count K'_g
            of each of the ``ceil(C / group_size)`` ranges.
        group_size: channels per range when ``cols`` is a sequence.
        smem_limit: shared memory a CTA may use (static arrays only; at most 48 KB by CUDA's rule).
        sms: the GPU's SM count: the plan launches at least ``min(sms, allowed)`` CTAs (:func:`dr_plan_positions`).

    Returns:
        A :class:`.plan.KernelPlan` with ``kernel="dr"``. ``staged_bytes`` counts the input elements the im2col
        gathers (one per kept column and output position, in bounds; with a sequence ``cols``, padding reads are
        counted too), ``unique_bytes`` the input tensor, ``bytes_moved`` staged input + column weights (12 bytes
        per kept column, 4 per bias channel) + output. ``extra`` holds ``positions_per_cta``, ``k_tile``,
        ``k_steps`` (per range), ``zero_columns`` (zero columns that complete partial K steps, per image
        position summed over ranges), ``columns`` (the GEMM's executed K: 16 per K step, summed over ranges),
        ``mma_per_k_step_tile`` (2 on tensor cores: the hi and lo halves of the weights), ``static_smem_bytes``
        and ``allowed_ctas``.
    """
    if isinstance(cols, DRColumns):
        group_size = cols.group_size
        kept, per_tap = cols.host_counts()
        if cols.kernel_size != (g.kh, g.kw) or cols.num_channels != g.c:
            raise ValueError(f"cols ({cols.num_channels} channels, kernel {cols.kernel_size}) do not match the call "
                             f"({g.c} channels, kernel {(g.kh, g.kw)})")
    else:
        kept, per_tap = tuple(int(k) for k in cols), None
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be in [1, {MAX_GROUP_SIZE}], got {group_size}")
    ranges = -(-g.c // group_size)
    if len(kept) != ranges or any(k < 0 or k > min(group_size, g.c - i * group_size) * g.kh * g.kw
                                  for i, k in enumerate(kept)):
        raise ValueError(f"expected K'_g for {ranges} ranges of at most channels x {g.kh * g.kw} columns, got {kept}")
    if ranges > MAX_GRID_YZ:
        raise ValueError(f"{ranges} balanced ranges exceed the launch grid limit ({MAX_GRID_YZ})")
    tensor_cores = dr_uses_tensor_cores(dtype)
    positions = g.oh * g.ow
    pt, allowed = dr_plan_positions(positions, ranges, g.n, group_size, sms)
    smem = dr_static_smem_bytes(group_size, tensor_cores, pt)
    if smem > min(smem_limit, DEFAULT_SMEM_LIMIT):
        raise ValueError(f"group_size={group_size} needs {smem} bytes of static shared memory per CTA "
                         f"(limit {min(smem_limit, DEFAULT_SMEM_LIMIT)})")
    defines = dw_dr_defines(dtype, g.nhwc, group_size, kernel_size=(g.kh, g.kw), stride=(g.sh, g.sw),
                            dilation=(g.dh, g.dw), positions_per_cta=pt)
    elem = torch.empty((), dtype=dtype).element_size()
    if per_tap is None:
        gathered = sum(kept) * positions
    else:
        gathered = sum(count * _in_bounds(g.oh, g.h, g.sh, g.pad[0], (t // g.kw) * g.dh)
                       * _in_bounds(g.ow, g.w, g.sw, g.pad[2], (t % g.kw) * g.dw)
                       for t, count in enumerate(per_tap) if count)
    staged = g.n * gathered * elem
    weights = _WEIGHT_BYTES_PER_COLUMN * sum(kept) + 8 * ranges + 4 * g.c
    output = g.n * g.c * positions * elem
    k_steps = tuple(-(-k // K_STEP) for k in kept)
    return KernelPlan(
        kernel="dr", source=SOURCE, entry=ENTRY, defines=defines,
        grid=(math.ceil(positions / pt), ranges, g.n), block=(THREADS, 1, 1), smem_bytes=0,
        staged_bytes=staged, unique_bytes=g.n * g.c * g.h * g.w * elem, bytes_moved=staged + weights + output,
        tensor_cores=tensor_cores,
        extra={"positions_per_cta": pt, "k_tile": K_TILE, "k_steps": k_steps, "columns": K_STEP * sum(k_steps),
               "zero_columns": sum(K_STEP * s - k for s, k in zip(k_steps, kept)), "static_smem_bytes": smem,
               "mma_per_k_step_tile": 2 if tensor_cores else 0, "allowed_ctas": allowed})


def dw_dr(x: torch.Tensor, cols: DRColumns, bias: torch.Tensor | None, *, stride=(1, 1), padding=(0, 0),
          dilation=(1, 1), act: str = "identity", backend: str = "cupy") -> torch.Tensor:
    """Depth-wise conv as the DR sub-GEMMs of DEPrune:
    ``act(F.conv2d(x, cols.to_dense(), bias, stride, padding, dilation, groups=C))``, launched as
    :func:`dw_dr_plan` plans it (fp16/bf16 on tensor cores, fp32 on CUDA cores).

    Args:
        cols: compacted DR columns of the ``[C, 1, kh, kw]`` weight (BN folded), on ``x``'s device.
        x, bias, stride, padding, dilation, act, backend: as in :func:`.launch.prepare_conv` (``x`` is
            ``[N, C, H, W]``; ``padding`` an int, ``(h, w)`` or ``(top, bottom, left, right)``; ``act`` a key of
            :data:`.activations.ACTIVATIONS`).

    Returns:
        ``[N, C, OH, OW]`` in ``x``'s dtype and memory format (fp32 accumulation; on tensor cores each fp32
        weight enters as a hi + lo pair of ``x``'s dtype, so the products keep 16 (bf16) / 22 (fp16) bits of it).

    Note:
        On tensor cores the zeros of W_g multiply the other columns of a K step: an inf/nan input may poison
        other outputs of its balanced range (``0 * inf = nan``), unlike ``F.conv2d``.
    """
    if not isinstance(cols, DRColumns):
        raise TypeError(f"cols must be a DRColumns, got {type(cols).__name__}")
    if cols.group_size > MAX_GROUP_SIZE:
        raise ValueError(f"cols.group_size must be <= {MAX_GROUP_SIZE}, got {cols.group_size}")
    x, g, bias, act_code, y = prepare_conv(
        x, weight_name="cols", weight_tensors=(cols.col_ptr, cols.col_chan, cols.col_tap, cols.col_val,
                                               cols.col_kept),
        num_channels=cols.num_channels, kernel_size=cols.kernel_size, bias=bias, stride=stride,
        padding=padding, dilation=dilation, act=act, backend=backend)
    if g.n == 0:
        return y
    plan = dw_dr_plan(g, x.dtype, cols)
    src = specialize(plan.source, plan.defines)
    args = [arg_ptr(x), arg_ptr(y), arg_ptr(cols.col_ptr), arg_ptr(cols.col_chan), arg_ptr(cols.col_tap),
            arg_ptr(cols.col_val), arg_ptr(cols.col_kept), arg_ptr(bias),
            *(arg_i32(v) for v in (g.c, g.h, g.w, g.oh, g.ow, g.pad[0], g.pad[2])), arg_i32(act_code)]
    run_kernel(backend, src, plan.entry, plan.grid, plan.block, plan.smem_bytes, args, x.device)
    return y
