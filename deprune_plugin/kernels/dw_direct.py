"""Launcher of ``cuda/dw_direct.cu``: direct tap-sparse depth-wise conv + bias + activation.

:func:`dw_direct_plan` turns a call signature (:class:`.launch.ConvGeometry`, dtype, vector or scalar access)
into a :class:`.plan.KernelPlan`: the ``#define`` set (window, stride, dilation, tile, channel block, vector
width: all compile time, so the kernel's staging and tap loops divide only by constants), grid, block,
shared memory, and the bytes the launch moves. :func:`dw_direct` launches exactly that plan.

Where tap pruning saves work (see ``cuda/dw_direct.cu``): in channels_last, per 16-byte channel vector (8
fp16/bf16 or 4 fp32 channels) the compile-time-unrolled tap loop skips a tap's shared-memory weight and
input reads and its FMAs when no channel of the vector keeps it; in NCHW each CTA loops over exactly its
channel's kept taps. Global traffic stays at the dense minimum either way.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .formats import CompactTaps
from .launch import DEFAULT_SMEM_LIMIT, MAX_GRID_YZ, ConvGeometry, dynamic_smem_limit, prepare_conv, run_kernel
from .plan import DEFAULT_SMS, KernelPlan, filling
from .sources import arg_i32, arg_ptr, scalar_define, specialize

__all__ = ["MAX_THREADS", "VECTOR_BYTES", "dw_direct", "dw_direct_defines", "dw_direct_plan", "reference_geometry",
           "vector_ok"]

SOURCE = "dw_direct.cu"
ENTRY = "deprune_dw_direct"
VECTOR_BYTES = 16          # one uint4: the width of the vector path's global and shared accesses
MAX_THREADS = 256          # the kernel's __launch_bounds__
_MIN_THREADS = 128         # smallest block the planner picks when a larger one fits the problem
_PARALLEL_CTAS = 264       # 2 CTAs per SM on a 132-SM H100: fewer leave SMs idle (soft penalty)
_CHANNEL_BLOCKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # vectors (threads) per CTA across channels
_RUN_BYTES = 32            # NHWC: contiguous bytes per pixel a CTA should load (one whole 32-byte sector)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def vector_ok(x: torch.Tensor, y: torch.Tensor | None = None) -> bool:
    """Whether the 16-byte vector path may run on channels_last ``x`` (and output ``y``): C a multiple of the
    vector's channels and both base pointers 16-byte aligned (a storage offset can break that)."""
    lane = VECTOR_BYTES // x.element_size()
    ptrs = [x.data_ptr()] + ([] if y is None else [y.data_ptr()])
    return x.shape[1] % lane == 0 and all(p % VECTOR_BYTES == 0 for p in ptrs)


def _covered(out: int, tile: int, stride: int, k: int, dil: int, pad: int, size: int) -> int:
    """Input rows (or columns) inside ``[0, size)`` that all tiles of ``tile`` outputs load, halos included
    (a tile loads its whole window, also for the last, partial tile)."""
    win = (tile - 1) * stride + (k - 1) * dil + 1
    total = 0
    for o0 in range(0, out, tile):
        a = o0 * stride - pad
        total += max(0, min(a + win, size) - max(a, 0))
    return total


def _rows(g: ConvGeometry) -> int:
    """Output rows per thread: 4 (the sliding window reuses each shared-memory row read), fewer for tiny maps."""
    return 4 if g.oh >= 4 else 2 if g.oh >= 2 else 1


def _tile_widths(ow: int) -> list[int]:
    pow2 = [w for w in (1, 2, 4, 8, 16, 32, 64) if w < 2 * ow]
    exact = [-(-ow // k) for k in (1, 2, 3, 4) if -(-ow // k) <= 64]
    return sorted(set(pow2 + exact))


def _smem(g: ConvGeometry, elem: int, tile_h: int, tile_w: int, cb: int) -> int:
    in_h, in_w = g.input_window(tile_h, tile_w)
    kt = g.kh * g.kw
    if g.nhwc:  # s_in[in_h][in_w][cb] storage (padded to 16 bytes) | s_w[kt][cb] fp32 | s_mask[ceil(kt/32)][cb]
        return -(-in_h * in_w * cb * elem // 16) * 16 + 4 * kt * cb + 4 * (-(-kt // 32)) * cb
    return 8 * kt + in_h * in_w * elem  # s_val[kt] fp32 | s_off[kt] int | s_in[in_h][in_w] storage


def _candidates(g: ConvGeometry, elem: int, lane: int, limit: int, relaxed: bool = False) -> list[tuple]:
    """Every ``(cost, -threads, tile_h, tile_w, rows, cb, threads, smem, ctas, staged elements)`` within
    ``limit`` bytes of shared memory. Cost (in bytes) = input bytes staged, halos included + a per-CTA
    overhead (tap staging) + a quarter of the bytes of the idle output slots (tails of tiles, channel blocks
    and warps), scaled up when the grid has too few CTAs to fill the GPU. ``relaxed`` (for windows that fit
    nothing else): also channel blocks narrower than a 32-byte run and one output row per thread."""
    kt = g.kh * g.kw
    vectors = -(-g.c // lane)
    if g.nhwc:
        blocks = [nv for nv in _CHANNEL_BLOCKS if nv <= vectors] or [1]
        cover = next((nv for nv in _CHANNEL_BLOCKS if nv >= vectors), None)  # one block holding all channels
        if cover is not None and cover not in blocks:
            blocks.append(cover)
        min_run = min(_RUN_BYTES, vectors * lane * elem)
        if not relaxed:
            blocks = [nv for nv in blocks if nv * lane * elem >= min_run] or blocks[-1:]
    else:
        blocks = [1]
    useful = g.n * g.oh * g.ow * g.c
    out = []
    for nv, rows in [(nv, r) for nv in blocks for r in sorted({_rows(g)} | ({1} if relaxed else set()))]:
        cb = nv * lane if g.nhwc else 1
        for tw in _tile_widths(g.ow):
            if not g.nhwc and tw < min(8, g.ow):  # NCHW warps run along W: keep them coalesced
                continue
            cols = _covered(g.ow, tw, g.sw, g.kw, g.dw, g.pad[2], g.w)
            for ty in range(1, -(-g.oh // rows) + 1):
                threads = nv * tw * ty
                if threads > MAX_THREADS:
                    break
                th = ty * rows
                smem = _smem(g, elem, th, tw, cb)
                if smem > limit:
                    break
                ctas = -(-g.oh // th) * -(-g.ow // tw) * -(-g.c // cb) * g.n
                staged = g.n * g.c * _covered(g.oh, th, g.sh, g.kh, g.dh, g.pad[0], g.h) * cols
                slots = ctas * (-(-threads // 32) * 32) * rows * (lane if g.nhwc else 1)
                cost = staged * elem + ctas * (512 + 4 * kt * cb) + 0.25 * elem * (slots - useful)
                cost *= 1.0 + 0.5 * max(0.0, 1.0 - ctas / _PARALLEL_CTAS)
                out.append((cost, -threads, th, tw, rows, cb, threads, smem, ctas, staged))
    return out


@lru_cache(maxsize=1024)
def _plan(g: ConvGeometry, dtype: torch.dtype, smem_limit: int, vector: bool, sms: int) -> KernelPlan:
    elem = _elem(dtype)
    lane = VECTOR_BYTES // elem if vector else 1
    # Shared memory beyond the default 48 KB needs an opt-in and lowers occupancy: only where nothing fits.
    cands = _candidates(g, elem, lane, min(DEFAULT_SMEM_LIMIT, smem_limit))
    if not cands:
        cands = _candidates(g, elem, lane, smem_limit) or _candidates(g, elem, lane, smem_limit, relaxed=True)
    if not cands:
        need = min(c[7] for c in _candidates(g, elem, lane, 1 << 40, relaxed=True))
        layout = " in channels_last" if g.nhwc else ""
        raise ValueError(f"kernel window {g.kh}x{g.kw} with dilation {(g.dh, g.dw)} needs {need} bytes of shared "
                         f"memory{layout}, more than the {smem_limit} the device allows")
    # Hard floor: a CTA per SM where some plan has that many (narrower tiles or channel blocks); the cost's
    # soft term only weighs the CTAs above it.
    cands, allowed = filling(cands, lambda c: c[8], sms)
    most = max(-c[1] for c in cands)
    cands = [c for c in cands if -c[1] >= min(_MIN_THREADS, most)]
    _, _, th, tw, rows, cb, threads, smem, _, staged = min(cands)
    grid_y = -(-g.c // cb) if g.nhwc else g.c
    if grid_y > MAX_GRID_YZ:
        raise ValueError(f"{g.c} channels exceed the launch grid limit ({MAX_GRID_YZ} CTAs along y)")
    defines = _defines(dtype, g, th, tw, rows, cb, lane if g.nhwc else 1, threads)
    kt = g.kh * g.kw
    unique = g.n * g.c * g.h * g.w * elem
    weights = 4 * (g.c + 1) + 8 * g.c * kt + 4 * g.c  # CSR upper bound (every tap kept) + fp32 bias
    output = g.n * g.c * g.oh * g.ow * elem
    return KernelPlan(
        kernel="direct", source=SOURCE, entry=ENTRY, defines=defines,
        grid=(-(-g.oh // th) * -(-g.ow // tw), grid_y, g.n), block=(threads, 1, 1), smem_bytes=smem,
        staged_bytes=staged * elem, unique_bytes=unique, bytes_moved=staged * elem + weights + output,
        extra={"tile": (th, tw), "rows": rows, "channel_block": cb, "vector": bool(vector and g.nhwc),
               "allowed_ctas": allowed})


def _defines(dtype: torch.dtype, g: ConvGeometry, tile_h: int, tile_w: int, rows: int, cb: int, vec: int,
             threads: int) -> dict[str, object]:
    """The ``#define`` set of one specialisation (see the header of ``cuda/dw_direct.cu``)."""
    return {"DEPRUNE_SCALAR": scalar_define(dtype), "DEPRUNE_LAYOUT_NHWC": int(g.nhwc),
            "DEPRUNE_KH": g.kh, "DEPRUNE_KW": g.kw, "DEPRUNE_SH": g.sh, "DEPRUNE_SW": g.sw,
            "DEPRUNE_DH": g.dh, "DEPRUNE_DW": g.dw, "DEPRUNE_TILE_H": tile_h, "DEPRUNE_TILE_W": tile_w,
            "DEPRUNE_ROWS": rows, "DEPRUNE_CB": cb, "DEPRUNE_VEC": vec, "DEPRUNE_THREADS": threads}


def dw_direct_plan(g: ConvGeometry, dtype: torch.dtype, *, smem_limit: int = DEFAULT_SMEM_LIMIT,
                   vector: bool | None = None, sms: int = DEFAULT_SMS) -> KernelPlan:
    """The launch of ``deprune_dw_direct`` for one call signature.

    Args:
        g: the call's geometry (input ``[n, c, h, w]``, output ``[n, c, oh, ow]``, window, stride, padding,
            dilation, layout).
        dtype: storage dtype of ``x`` and ``y`` (float32, float16, bfloat16).
        smem_limit: the most dynamic shared memory the device lets one CTA use (its opt-in maximum,
            :func:`.launch.dynamic_smem_limit`); the planner stays within the default 48 KB unless nothing
            fits there.
        vector: channels_last only: use 16-byte channel vectors (needs ``C % (16 / element size) == 0`` and
            16-byte aligned ``x`` and ``y``, :func:`vector_ok`); None: whenever C allows it (aligned pointers
            assumed). Ignored for NCHW (scalar).
        sms: the GPU's SM count: the plan launches at least ``min(sms, allowed)`` CTAs, ``allowed`` the most
            CTAs any tile / channel block the planner considers launches (``extra["allowed_ctas"]``).

    Tiling: NHWC CTAs own ``tile_h x tile_w`` outputs x ``cb`` channels, block ``(cb / vec) * tile_w *
    tile_h / rows`` threads (<= 256); NCHW CTAs one channel's ``tile_h x tile_w`` outputs, ``tile_w *
    tile_h / rows`` threads. The tile minimises staged input bytes (halos) plus per-CTA and idle-thread
    overheads, so that large stride-1 maps stage each input byte < 1.3 times.

    Returns:
        a :class:`.plan.KernelPlan`: ``kernel="direct"``, defines, grid ``(tiles, C / cb or C, N)``, block,
        ``smem_bytes``, ``staged_bytes`` (input bytes all CTAs load, halos included, padding excluded),
        ``unique_bytes`` (the input tensor), ``bytes_moved`` (staged + taps (dense-CSR upper bound) + bias +
        output); ``extra`` holds the tile, rows per thread, channel block, vector flag and ``allowed_ctas``.

    Raises:
        ValueError: the window needs more shared memory than ``smem_limit``, or too many channels.
    """
    scalar_define(dtype)  # TypeError for an unsupported dtype
    if vector is None:
        vector = g.c % (VECTOR_BYTES // _elem(dtype)) == 0
    return _plan(g, dtype, int(smem_limit), bool(vector) and g.nhwc, int(sms))


def reference_geometry(nhwc: bool) -> ConvGeometry:
    """2 x 40 x 9 x 10 input, 3x3 window, stride 1, padding 1: the specialisation tests compile by default."""
    return ConvGeometry(2, 40, 9, 10, 9, 10, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, nhwc)


def dw_direct_defines(dtype: torch.dtype, nhwc: bool, g: ConvGeometry | None = None, *,
                      smem_limit: int = DEFAULT_SMEM_LIMIT, vector: bool | None = None) -> dict[str, object]:
    """The ``#define`` set :func:`dw_direct` specialises ``cuda/dw_direct.cu`` with for ``g`` (default
    :func:`reference_geometry`) with inputs of ``dtype`` in NCHW (``nhwc=False``) or channels_last: the
    defines of :func:`dw_direct_plan`."""
    g = reference_geometry(nhwc) if g is None else g
    if g.nhwc != nhwc:
        g = ConvGeometry(**{**g.__dict__, "nhwc": nhwc})
    return dict(dw_direct_plan(g, dtype, smem_limit=smem_limit, vector=vector).defines)


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

    The launch is :func:`dw_direct_plan` for the call's geometry, with the 16-byte vector path in channels_last
    when :func:`vector_ok` (C a multiple of 8 fp16/bf16 or 4 fp32 channels, aligned pointers), else scalar.
    """
    if not isinstance(taps, CompactTaps):
        raise TypeError(f"taps must be a CompactTaps, got {type(taps).__name__}")
    x, g, bias, act_code, y = prepare_conv(
        x, weight_name="taps", weight_tensors=(taps.tap_ptr, taps.tap_idx, taps.tap_val),
        num_channels=taps.num_channels, kernel_size=taps.kernel_size, bias=bias, stride=stride,
        padding=padding, dilation=dilation, act=act, backend=backend)
    if g.n == 0:
        return y
    plan = dw_direct_plan(g, x.dtype, smem_limit=dynamic_smem_limit(backend, x.device),
                          vector=g.nhwc and vector_ok(x, y))
    src = specialize(plan.source, plan.defines)
    args = [arg_ptr(x), arg_ptr(y), arg_ptr(taps.tap_ptr), arg_ptr(taps.tap_idx), arg_ptr(taps.tap_val),
            arg_ptr(bias), *(arg_i32(v) for v in (g.n, g.c, g.h, g.w, g.oh, g.ow, g.pad[0], g.pad[2])),
            arg_i32(act_code)]
    run_kernel(backend, src, plan.entry, plan.grid, plan.block, plan.smem_bytes, args, x.device)
    return y
