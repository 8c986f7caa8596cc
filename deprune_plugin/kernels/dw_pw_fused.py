"""Launcher of ``cuda/dw_pw_fused.cu``: a tap-sparse DW conv (+ bias + activation) and the 1x1 conv after it
(+ bias, + an optional residual) in one kernel, the DW result kept on chip.

A DW conv is memory bound and tap pruning does not cut its traffic; not writing its (expanded) output to
memory and not reading it back for the 1x1 conv does. :func:`dw_pw_fused_plan` turns a call signature into a
:class:`.plan.KernelPlan`: the output tile (16..128 pixels), how many tiles a CTA walks down (keeping the input
rows they share), the channel chunk, the block of output channels per CTA, the DW rows per item, shared
memory, and the bytes the fused launch moves next to the bytes the same pair moves unfused
(``extra["bytes_moved_unfused"]``: the pair as separate kernels with BN folded, the activation and the
residual add as their own passes, as an eager BN-folded model runs it; ``extra["bytes_moved_layer"]``: the
same with perfect epilogues, i.e. the DW kernel with its activation fused and the 1x1 conv with the add).

Shapes: ``x [N, C, H, W]`` (channels_last; made so when it is not) -> ``[N, CO, OH, OW]`` channels_last.
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch

from .activations import ACTIVATIONS
from .dw_direct import _covered
from .formats import CompactTaps
from .launch import DEFAULT_SMEM_LIMIT, MAX_GRID_YZ, ConvGeometry, dynamic_smem_limit, prepare_conv, run_kernel
from .plan import DEFAULT_SMS, KernelPlan, filling
from .sources import arg_i32, arg_ptr, scalar_define, specialize

__all__ = ["REFERENCE_OUT_CHANNELS", "THREADS", "a_row_elems", "dw_pw_fused", "dw_pw_fused_defines", "dw_pw_fused_plan",
           "fused_smem_bytes", "fused_tap_tables", "reference_geometry"]

SOURCE = "dw_pw_fused.cu"
ENTRY = "deprune_dw_pw_fused"
THREADS = 256                      # the kernel's block (and __launch_bounds__)
_VECTOR_BYTES = 16
_PIXEL_TILES = ((1, 16), (2, 8), (4, 4), (2, 16), (4, 8), (8, 4), (4, 16), (8, 8), (16, 4), (8, 16), (16, 8))
_CHUNKS = (16, 32, 64)
_MAX_ACC = 40                      # fp32 accumulators per thread on CUDA cores (<= 255 registers, one CTA/SM)
# On tensor cores (two CTAs per SM, <= 128 registers) the accumulators stay live through the DW phase beside
# the 1x1 weight fragments: MobileNetV2's 7x7 and 14x14 pairs spill at 128 registers with 20-28 accumulators
# (wide output blocks), with 16 none does (ptxas and the SASS: tests/test_kernels_report.py, test_dw_pw_fused_sass.py).
_MAX_ACC_MMA = 16
_PARALLEL_CTAS = 264               # 2 CTAs per SM on a 132-SM H100: fewer leave SMs idle (soft penalty)
_L2_WEIGHT = 0.25                  # per-CTA weight reads mostly hit L2: counted at a quarter of DRAM cost
_CHUNK_COST = 2048                 # bytes-equivalent of one chunk iteration's three barriers and set-up
_WALKS = (2, 4, 8)                 # tiles per CTA, one below the other, sharing their halo rows


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def a_row_elems(kc: int, elem: int) -> int:
    """The kernel's ``AS``: elements per row of its A and B tiles, ``kc`` + 16 bytes (rows 4 words mod 8:
    conflict-free fragment and 16-byte reads, ``kernels.smem_banks``)."""
    return kc + _VECTOR_BYTES // elem


def _overlap(g: ConvGeometry, tile_h: int) -> int:
    """Input rows two vertically adjacent tiles share (the kernel's ``OVERLAP``)."""
    return max(0, g.input_window(tile_h, 1)[0] - tile_h * g.sh)


def fused_smem_bytes(g: ConvGeometry, elem: int, tile_h: int, tile_w: int, kc: int, cob: int, walk: int = 1) -> int:
    """Dynamic shared memory of one CTA: the kernel's fixed ``SMEM_BYTES`` (input tile with halo, ``KC`` channels
    per pixel; the A (DW result) and B (1x1 weights) tiles with rows of ``KC`` elements + 16 bytes; fp32 taps and keep
    bits) and, for a walk over several tiles, the input rows the next tile reuses, for every chunk
    (``ceil(C / KC)`` x the overlap rows x the tile's input width x ``KC`` elements)."""
    in_h, in_w = g.input_window(tile_h, tile_w)
    kt = g.kh * g.kw

    def a16(b: int) -> int:
        return -(-b // 16) * 16
    row = a_row_elems(kc, elem) * elem
    fixed = a16(a16(in_h * in_w * kc * elem) + a16(tile_h * tile_w * row) + a16(cob * row)
                + 4 * kt * kc + 4 * (-(-kt // 32)) * (kc // (_VECTOR_BYTES // elem)))
    halo = _overlap(g, tile_h) * in_w * kc * elem if walk > 1 else 0
    return fixed + -(-g.c // kc) * halo


def _cob_options(p: int, co: int, max_acc: int = _MAX_ACC) -> list[int]:
    """Output-channel blocks valid for ``p`` pixels: multiples of 8 with whole n8 tiles per warp
    (``(p / 16) * (cob / 8)`` a multiple of 8) and whole outputs per thread, at most ``max_acc``
    accumulators per thread; from the smallest covering ``co`` in one block down to narrower ones."""
    mt, step = p // 16, 8
    out = []
    for cob in range(step, 8 * 1024 + 1, step):
        if (mt * (cob // 8)) % 8 or cob % (THREADS // p) or p * cob > max_acc * THREADS:
            continue
        out.append(cob)
        if cob >= co:
            break
    return out


def _candidates(g: ConvGeometry, co: int, elem: int, limit: int, max_acc: int = _MAX_ACC) -> list[tuple]:
    """``(cost, tile_h, tile_w, kc, cob, walk, smem, ctas, staged elements)`` of every plan within ``limit`` bytes
    of shared memory. Cost (bytes): staged input (halos, minus the rows a walk keeps, and the recompute of one
    DW tile per block of output channels included) + per-tile 1x1 weight reads at L2 weight + a per-chunk
    overhead + the idle MMA slots of partial tiles (a sixteenth of their bytes), scaled up when the grid is too
    small to fill the GPU."""
    c16 = -(-g.c // 16) * 16
    out = []
    for th, tw in _PIXEL_TILES:
        p = th * tw
        cols = _covered(g.ow, tw, g.sw, g.kw, g.dw, g.pad[2], g.w)
        tiles_h, tiles_w = -(-g.oh // th), -(-g.ow // tw)
        walks = [1] + ([w for w in _WALKS if w < 2 * tiles_h] if _overlap(g, th) else [])
        for walk in walks:
            rows = _covered(g.oh, th * walk, g.sh, g.kh, g.dh, g.pad[0], g.h)  # a walk loads its window once
            for kc in _CHUNKS:
                if kc > max(c16, 16):
                    break
                for cob in _cob_options(p, co, max_acc):
                    smem = fused_smem_bytes(g, elem, th, tw, kc, cob, walk)
                    if smem > limit:
                        continue
                    blocks = -(-co // cob)
                    ctas = tiles_w * -(-tiles_h // walk) * blocks * g.n
                    tiles = tiles_w * tiles_h * blocks * g.n
                    staged = blocks * g.n * g.c * rows * cols
                    slots = tiles * p * cob
                    cost = (staged * elem + _L2_WEIGHT * tiles * cob * g.c * elem + tiles * -(-g.c // kc) * _CHUNK_COST
                            + elem * (slots - g.n * g.oh * g.ow * co) / 16)
                    cost *= 1.0 + 0.5 * max(0.0, 1.0 - ctas / _PARALLEL_CTAS)
                    out.append((cost, th, tw, kc, cob, walk, smem, ctas, staged))
    return out


def _dw_rows(tile_h: int, tile_w: int, kc: int, cob: int, elem: int) -> int:
    """Output rows per DW item: 2 (weights and shared input rows read once for both) when the tile has an even
    height, pairs of rows still give every thread an item, and the 1x1 accumulators leave registers for a
    second row of DW sums (<= 24 of them: with more, ptxas spills at 128 registers), else 1."""
    vectors = kc // (_VECTOR_BYTES // elem)
    acc = tile_h * tile_w * cob // THREADS
    return 2 if tile_h % 2 == 0 and (tile_h * tile_w // 2) * vectors >= THREADS and acc <= 24 else 1


def _unfused_bytes(g: ConvGeometry, co: int, elem: int, taps: int, act: bool, residual: bool) -> tuple[int, int]:
    """``(eager BN-folded, perfect epilogues)`` bytes of the same pair run as separate kernels: DW conv (input,
    taps, bias, output), [activation: read + write the DW output], 1x1 conv (DW output, weights, bias,
    output), [residual add: two reads and a write of the output]. Perfect epilogues: no activation pass, and
    the add reads only the residual."""
    dw_in = g.n * g.c * g.h * g.w * elem
    dw_out = g.n * g.c * g.oh * g.ow * elem
    out = g.n * co * g.oh * g.ow * elem
    dw_w = 4 * (g.c + 1) + 8 * taps + 4 * g.c
    pw_w = co * g.c * elem + 4 * co
    layer = dw_in + dw_w + dw_out + dw_out + pw_w + out + (out if residual else 0)
    eager = dw_in + dw_w + dw_out + (2 * dw_out if act else 0) + dw_out + pw_w + out + (3 * out if residual else 0)
    return eager, layer


@lru_cache(maxsize=1024)
def _plan(g: ConvGeometry, co: int, dtype: torch.dtype, smem_limit: int, mma: bool, act: str, residual: bool,
          taps: int, sms: int) -> KernelPlan:
    elem = _elem(dtype)
    max_acc = _MAX_ACC_MMA if mma and elem == 2 else _MAX_ACC
    cands = (_candidates(g, co, elem, min(DEFAULT_SMEM_LIMIT, smem_limit), max_acc)
             or _candidates(g, co, elem, smem_limit, max_acc))
    if not cands:
        raise ValueError(f"a fused {g.kh}x{g.kw} stride {(g.sh, g.sw)} pair with {co} outputs needs more shared "
                         f"memory than the {smem_limit} bytes the device allows")
    # Hard floor: a CTA per SM where some plan has that many (smaller tiles, narrower output blocks, shorter
    # walks); the cost's soft term only weighs the CTAs above it.
    cands, allowed = filling(cands, lambda c: c[7], sms)
    _, th, tw, kc, cob, walk, smem, _, staged = min(cands)
    grid = (-(-g.oh // (th * walk)) * -(-g.ow // tw), -(-co // cob), g.n)
    if grid[1] > MAX_GRID_YZ:
        raise ValueError(f"{co} output channels exceed the launch grid limit ({MAX_GRID_YZ} CTAs along y)")
    tensor_cores = bool(mma and elem == 2)
    defines = {"DEPRUNE_SCALAR": scalar_define(dtype), "DEPRUNE_KH": g.kh, "DEPRUNE_KW": g.kw, "DEPRUNE_SH": g.sh,
               "DEPRUNE_SW": g.sw, "DEPRUNE_DH": g.dh, "DEPRUNE_DW": g.dw, "DEPRUNE_TILE_H": th,
               "DEPRUNE_TILE_W": tw, "DEPRUNE_KC": kc, "DEPRUNE_COB": cob, "DEPRUNE_FUSED_MMA": int(tensor_cores),
               "DEPRUNE_WALK": walk, "DEPRUNE_ACT": ACTIVATIONS[act].code,
               "DEPRUNE_DW_ROWS": _dw_rows(th, tw, kc, cob, elem)}
    out = g.n * co * g.oh * g.ow * elem
    lane = _VECTOR_BYTES // elem
    weights = 4 * g.c * g.kh * g.kw + 4 * -(-g.kh * g.kw // 32) * -(-g.c // lane) + 4 * g.c + co * g.c * elem + 4 * co
    moved = staged * elem + weights + out + (out if residual else 0)
    eager, layer = _unfused_bytes(g, co, elem, taps, act != "identity", residual)
    return KernelPlan(
        kernel="fused", source=SOURCE, entry=ENTRY, defines=defines, grid=grid, block=(THREADS, 1, 1),
        smem_bytes=smem, staged_bytes=staged * elem, unique_bytes=g.n * g.c * g.h * g.w * elem, bytes_moved=moved,
        tensor_cores=tensor_cores,
        extra={"tile": (th, tw), "walk": walk, "chunk": kc, "out_block": cob, "out_channels": co, "residual": residual,
               "dw_recompute": grid[1], "allowed_ctas": allowed, "bytes_moved_unfused": eager,
               "bytes_moved_layer": layer, "pw_macs": g.n * g.oh * g.ow * g.c * co})


def dw_pw_fused_plan(g: ConvGeometry, out_channels: int, dtype: torch.dtype, *, smem_limit: int = DEFAULT_SMEM_LIMIT,
                     tensor_cores: bool = True, act: str = "identity", residual: bool = False,
                     kept_taps: int | None = None, sms: int = DEFAULT_SMS) -> KernelPlan:
    """The launch of ``deprune_dw_pw_fused`` for one call signature.

    Args:
        g: the DW call's geometry (input ``[n, c, h, w]``, output ``[n, c, oh, ow]``; channels_last).
        out_channels: CO, the 1x1 conv's outputs.
        dtype: storage dtype of x, y and the 1x1 weights (float32, float16, bfloat16).
        smem_limit: the most dynamic shared memory a CTA may use; the planner stays within 48 KB unless
            nothing fits there.
        tensor_cores: use mma.sync for the 1x1 GEMM (16-bit dtypes; the kernel falls back to CUDA cores
            before sm_80).
        act: the DW activation (a key of :data:`.activations.ACTIVATIONS`): compiled in, and whether the
            unfused pair needs an activation pass.
        residual: whether the epilogue adds a residual (counted in the bytes).
        kept_taps: kept DW taps (the unfused DW kernel's tap table, in ``bytes_moved_unfused``); default all
            ``c * kh * kw``.
        sms: the GPU's SM count: the plan launches at least ``min(sms, allowed)`` CTAs, ``allowed`` the most
            CTAs any tile / walk / chunk / output block within the shared-memory limit launches
            (``extra["allowed_ctas"]``).

    Returns:
        a :class:`.plan.KernelPlan` (``kernel="fused"``): grid ``(tiles_w * ceil(tiles_h / walk), ceil(CO / COB),
        N)``, block 256, ``staged_bytes`` (input windows with halos, a walk's loaded once, times the
        output-channel blocks), ``bytes_moved`` (staged + tap tables + 1x1 weights + output + residual);
        ``extra``: tile, walk, chunk, out_block, ``allowed_ctas``, ``dw_recompute`` (the
        output-channel blocks, each recomputing the DW tile), ``bytes_moved_unfused``, ``bytes_moved_layer``,
        ``pw_macs``.
    """
    scalar_define(dtype)
    if not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"out_channels must be an int >= 1, got {out_channels!r}")
    taps = g.c * g.kh * g.kw if kept_taps is None else int(kept_taps)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    return _plan(g, out_channels, dtype, int(smem_limit), bool(tensor_cores), act, bool(residual),
                 taps, int(sms))


def fused_tap_tables(taps: CompactTaps, vec: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's tap tables for ``vec``-channel vectors: ``tap_w [KT, C]`` float32 (the kept taps'
    weights, 0 where pruned) and ``vec_keep [ceil(KT / 32), C / vec]`` int32 (bit ``t`` of word ``t // 32``:
    some channel of the vector keeps tap ``t``). Built once per (taps, vec) and kept on ``taps`` (rebuilt when
    a tensor of ``taps`` is written in place), so a planned launch can hold their pointers."""
    c, (kh, kw) = taps.num_channels, taps.kernel_size
    kt = kh * kw
    stamp = (vec, *((t.data_ptr(), t._version) for t in (taps.tap_ptr, taps.tap_idx, taps.tap_val)))
    cache = taps.__dict__.setdefault("_fused_tables", {})
    hit = cache.get(vec)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    counts = (taps.tap_ptr[1:] - taps.tap_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(c, device=counts.device), counts)
    keep = torch.zeros(c, kt, dtype=torch.bool, device=counts.device)
    keep[rows, taps.tap_idx.long()] = True
    tap_w = torch.zeros(c, kt, dtype=torch.float32, device=counts.device)
    tap_w[rows, taps.tap_idx.long()] = taps.tap_val
    words = -(-kt // 32)
    bits = torch.zeros(c, words * 32, dtype=torch.int64, device=counts.device)
    bits[:, :kt] = keep.long()
    union = bits.reshape(c // vec, vec, words, 32).amax(dim=1)  # [C / vec, words, 32]
    packed = (union << torch.arange(32, device=counts.device)).sum(dim=-1)  # [C / vec, words], < 2^32
    vec_keep = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).t().contiguous()
    tables = (tap_w.t().contiguous(), vec_keep)
    cache[vec] = (stamp, tables)
    return tables


def _pw_matrix(w: torch.Tensor, c: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"pw_weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() == 4 and tuple(w.shape[2:]) == (1, 1):
        w = w.reshape(w.shape[0], w.shape[1])
    if w.dim() != 2 or w.shape[1] != c:
        raise ValueError(f"pw_weight must be [CO, {c}] or [CO, {c}, 1, 1], got {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"pw_weight is on {w.device} but x is on {device}")
    return w.to(dtype).contiguous()


def dw_pw_fused(x: torch.Tensor, taps: CompactTaps, dw_bias: torch.Tensor | None, pw_weight: torch.Tensor,
                pw_bias: torch.Tensor | None, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), act: str = "identity",
                residual: torch.Tensor | None = None, backend: str = "cupy") -> torch.Tensor:
    """``F.conv2d(act(dw_conv(x)), pw_weight, pw_bias) (+ residual)`` in one kernel, with
    ``dw_conv = F.conv2d(., taps.to_dense(), dw_bias, stride, padding, dilation, groups=C)``.

    Args:
        x: ``[N, C, H, W]`` fp32/fp16/bf16 (made channels_last if it is not); C a multiple of 8 (16-bit) or 4
            (fp32), ``x`` 16-byte aligned.
        taps: kept taps of the ``[C, 1, kh, kw]`` DW weight (BN folded), on ``x``'s device.
        dw_bias: ``[C]`` (BN folded) or None.
        pw_weight: ``[CO, C]`` or ``[CO, C, 1, 1]`` (BN folded); cast to ``x.dtype`` (pass it in that dtype to
            avoid a copy per call).
        pw_bias: ``[CO]`` or None.
        residual: ``[N, CO, OH, OW]`` added in the epilogue, or None.
        stride, padding, dilation, act, backend: as :func:`.dw_direct.dw_direct`.

    Returns:
        ``[N, CO, OH, OW]`` channels_last in ``x``'s dtype (fp32 accumulation; the DW result is rounded to
        ``x.dtype`` once, as the unfused pair stores it).
    """
    if not isinstance(taps, CompactTaps):
        raise TypeError(f"taps must be a CompactTaps, got {type(taps).__name__}")
    if isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    c = taps.num_channels
    if not isinstance(pw_weight, torch.Tensor):
        raise TypeError(f"pw_weight must be a torch.Tensor, got {type(pw_weight).__name__}")
    co = int(pw_weight.shape[0])
    x, g, dw_bias, act_code, y = prepare_conv(
        x, weight_name="taps", weight_tensors=(taps.tap_ptr, taps.tap_idx, taps.tap_val), num_channels=c,
        kernel_size=taps.kernel_size, bias=dw_bias, stride=stride, padding=padding, dilation=dilation, act=act,
        backend=backend, out_channels=co)
    if not g.nhwc:  # H == W == 1 (or C == 1): x's bytes are NHWC too, only the output's layout needs fixing
        g = replace(g, nhwc=True)
        y = torch.empty_like(y, memory_format=torch.channels_last)
    lane = _VECTOR_BYTES // x.element_size()
    if c % lane:
        raise ValueError(f"the fused kernel needs C a multiple of {lane} for {x.dtype} (16-byte vectors), got C={c}")
    w = _pw_matrix(pw_weight, c, x.dtype, x.device)
    if x.data_ptr() % _VECTOR_BYTES or w.data_ptr() % _VECTOR_BYTES:
        raise ValueError("the fused kernel needs x and pw_weight 16-byte aligned (a sliced tensor may not be)")
    if pw_bias is not None:
        if not isinstance(pw_bias, torch.Tensor) or tuple(pw_bias.shape) != (co,):
            raise ValueError(f"pw_bias must be a [{co}] tensor or None")
        if pw_bias.device != x.device:
            raise ValueError(f"pw_bias is on {pw_bias.device} but x is on {x.device}")
        pw_bias = pw_bias.to(torch.float32).contiguous()
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != tuple(y.shape):
            raise ValueError(f"residual must be a tensor of the output's shape {tuple(y.shape)}, got "
                             f"{tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
        residual = residual.to(x.dtype).contiguous(memory_format=torch.channels_last)
    if g.n == 0:
        return y
    plan = dw_pw_fused_plan(g, co, x.dtype, smem_limit=dynamic_smem_limit(backend, x.device), act=act,
                            residual=residual is not None, kept_taps=int(taps.tap_idx.numel()))
    src = specialize(plan.source, plan.defines)
    tap_w, vec_keep = fused_tap_tables(taps, lane)
    args = [arg_ptr(x), arg_ptr(y), arg_ptr(tap_w), arg_ptr(vec_keep),
            arg_ptr(dw_bias), arg_ptr(w), arg_ptr(pw_bias), arg_ptr(residual),
            *(arg_i32(v) for v in (g.n, g.c, g.h, g.w, g.oh, g.ow, co, g.pad[0], g.pad[2])), arg_i32(act_code)]
    run_kernel(backend, src, plan.entry, plan.grid, plan.block, plan.smem_bytes, args, x.device)
    return y


def reference_geometry() -> ConvGeometry:
    """2 x 40 x 9 x 10 channels_last input, 3x3 window, stride 1, padding 1: the specialisation the compile
    tests build by default (with :data:`REFERENCE_OUT_CHANNELS` outputs)."""
    return ConvGeometry(2, 40, 9, 10, 9, 10, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, True)


#: outputs of the reference specialisation (not a multiple of the output block: the masked tail compiles)
REFERENCE_OUT_CHANNELS = 20


def dw_pw_fused_defines(dtype: torch.dtype, g: ConvGeometry | None = None, out_channels: int | None = None, *,
                        smem_limit: int = DEFAULT_SMEM_LIMIT, act: str = "identity") -> dict[str, object]:
    """The ``#define`` set :func:`dw_pw_fused` compiles ``cuda/dw_pw_fused.cu`` with for ``g`` (default
    :func:`reference_geometry` with :data:`REFERENCE_OUT_CHANNELS` outputs), ``dtype`` and ``act``."""
    g = reference_geometry() if g is None else g
    co = REFERENCE_OUT_CHANNELS if out_channels is None else out_channels
    return dict(dw_pw_fused_plan(g, co, dtype, smem_limit=smem_limit, act=act).defines)
