"""A model of shared-memory bank conflicts, so a kernel's shared-memory layouts can be checked without a GPU.

Shared memory has 32 banks of 4-byte words (word ``w`` lives in bank ``w % 32``). A warp-wide access is served
in phases: 4-byte accesses as one phase of 32 lanes, 8-byte accesses per half-warp (16 lanes), 16-byte
accesses per quarter-warp (8 lanes). Within a phase, lanes reading the same word share it (a broadcast);
distinct words in one bank are served one after the other. The *conflict degree* of an access is the most
distinct words any bank holds in any phase (1: conflict-free).

The access patterns below mirror the index arithmetic of the kernels (``cuda/dw_pw_fused.cu``,
``cuda/dw_dr.cu``): lane -> byte address for one warp-wide load or store.
"""
from __future__ import annotations

from typing import Sequence

from .dw_dr import dr_x_word, dr_x_words_per_position
from .dw_pw_fused import a_row_elems

__all__ = ["BANKS", "BANK_BYTES", "conflict_degree", "dr_b_fragment", "dr_staging_store", "fused_cuda_core_a_read"]

BANKS = 32
BANK_BYTES = 4
_PHASE_LANES = {1: 32, 2: 32, 4: 32, 8: 16, 16: 8}  # lanes per phase, by access width in bytes


def conflict_degree(addresses: Sequence[int], width: int) -> int:
    """Conflict degree of one warp-wide access: ``addresses[lane]`` the byte address lane ``lane`` accesses,
    ``width`` bytes each (1, 2, 4, 8 or 16; naturally aligned)."""
    if width not in _PHASE_LANES:
        raise ValueError(f"width must be one of {sorted(_PHASE_LANES)} bytes, got {width}")
    if len(addresses) > 32:
        raise ValueError(f"a warp has 32 lanes, got {len(addresses)} addresses")
    if any(a % width for a in addresses):
        raise ValueError(f"{width}-byte accesses must be {width}-byte aligned")
    lanes = _PHASE_LANES[width]
    worst = 0
    for start in range(0, len(addresses), lanes):
        words: dict[int, set[int]] = {}
        for a in addresses[start:start + lanes]:
            for w in range(a // BANK_BYTES, (a + width - 1) // BANK_BYTES + 1):
                words.setdefault(w % BANKS, set()).add(w)
        worst = max(worst, max(len(ws) for ws in words.values()))
    return worst


def fused_cuda_core_a_read(pixels: int, kc: int, elem: int, *, row_elems: int | None = None, width: int = 16,
                           warp: int = 0) -> tuple[list[int], int]:
    """``(addresses, width)`` of the fused kernel's CUDA-core 1x1 GEMM reading its A tile ``s_a[P][AS]``: lane
    ``l`` of warp ``warp`` owns pixel ``(32 * warp + l) % P`` and reads ``width`` bytes at channel 0 of its row.
    ``row_elems``: AS (default the kernel's, :func:`.dw_pw_fused.a_row_elems`)."""
    row = a_row_elems(kc, elem) if row_elems is None else row_elems
    return [((32 * warp + lane) % pixels * row) * elem for lane in range(32)], width


def dr_staging_store(nhwc: bool, pt: int, k_tile: int = 32, *, swizzle: bool = True, warp: int = 0
                     ) -> tuple[list[int], int]:
    """``(addresses, 4)`` of the DR kernel's tensor-core im2col staging storing one 32-bit column-pair word per
    lane into the X tile (first iteration of warp ``warp``): NHWC ``kp = tid % (KT / 2)``, ``pp = tid / (KT /
    2)``; NCHW ``pp = tid % PT``, ``kp = tid / PT``. ``swizzle=False``: the unswizzled ``pp * XS + kp``."""
    pairs, out = k_tile // 2, []
    for lane in range(32):
        tid = 32 * warp + lane
        pp, kp = (tid // pairs, tid % pairs) if nhwc else (tid % pt, tid // pt)
        word = dr_x_word(pp, kp, k_tile) if swizzle else pp * dr_x_words_per_position(k_tile) + kp
        out.append(4 * word)
    return out, 4


def dr_b_fragment(first_position: int, k_step: int, high: bool, k_tile: int = 32) -> tuple[list[int], int]:
    """``(addresses, 4)`` of one B-fragment load of the DR kernel: lane = 4 * group + tig reads position
    ``first_position + group`` (a multiple of 8), column pair ``8 * k_step + tig`` (+ 4 for ``high``)."""
    return [4 * dr_x_word(first_position + lane // 4, 8 * k_step + lane % 4 + 4 * high, k_tile)
            for lane in range(32)], 4

