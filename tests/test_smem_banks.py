"""Shared-memory bank conflicts of the kernels' hot accesses, from a model of the banks (32 x 4 bytes, phases of
32 / 16 / 8 lanes for 4 / 8 / 16-byte accesses) fed with the kernels' own index arithmetic."""
from __future__ import annotations

import pytest

from deprune_plugin.kernels import smem_banks as banks
from deprune_plugin.kernels.dw_pw_fused import a_row_elems


def test_the_model_on_textbook_patterns():
    assert banks.conflict_degree([4 * lane for lane in range(32)], 4) == 1            # consecutive words
    assert banks.conflict_degree([0] * 32, 4) == 1                                    # one word: a broadcast
    assert banks.conflict_degree([128 * lane for lane in range(32)], 4) == 32         # a column of a 32-word row
    assert banks.conflict_degree([4 * 33 * lane for lane in range(32)], 4) == 1       # padded to 33 words
    assert banks.conflict_degree([16 * lane for lane in range(32)], 16) == 1          # float4 rows, per phase
    assert banks.conflict_degree([2 * lane for lane in range(32)], 2) == 1            # 16-bit pairs share words
    with pytest.raises(ValueError):
        banks.conflict_degree([2], 4)


@pytest.mark.parametrize("pixels", [32, 64, 128])
@pytest.mark.parametrize("kc", [16, 32, 64])
def test_fused_fp32_gemm_reads_of_the_a_tile(pixels, kc):
    """fp32, CUDA-core 1x1 GEMM: rows of KC + 8 words read one element per lane conflicted 8-way; rows of
    KC + 16 bytes read 16 bytes per lane are conflict-free (and so for 16-bit storage)."""
    old = banks.fused_cuda_core_a_read(pixels, kc, 4, row_elems=kc + 8, width=4)
    assert banks.conflict_degree(*old) == 8
    assert a_row_elems(kc, 4) == kc + 4 and a_row_elems(kc, 2) == kc + 8
    for warp in range(8):
        assert banks.conflict_degree(*banks.fused_cuda_core_a_read(pixels, kc, 4, warp=warp)) == 1
        assert banks.conflict_degree(*banks.fused_cuda_core_a_read(pixels, kc, 2, warp=warp)) == 1


def test_fused_16_pixel_tile_reads():
    # P = 16: lanes 16-31 read the rows of lanes 0-15 (a broadcast of the same words)
    assert banks.conflict_degree(*banks.fused_cuda_core_a_read(16, 32, 4, row_elems=40, width=4)) == 4
    assert banks.conflict_degree(*banks.fused_cuda_core_a_read(16, 32, 4)) == 1


@pytest.mark.parametrize("pt", [64, 128, 256])
def test_dr_x_tile_staging_and_fragment_loads(pt):
    for warp in range(8):
        # NCHW staging: 32 consecutive positions of one column pair
        assert banks.conflict_degree(*banks.dr_staging_store(False, pt, swizzle=False, warp=warp)) == 4
        assert banks.conflict_degree(*banks.dr_staging_store(False, pt, warp=warp)) == 1
        # NHWC staging: 16 column pairs of two positions, 20 words apart: 4 banks twice (unchanged)
        assert banks.conflict_degree(*banks.dr_staging_store(True, pt, warp=warp)) == 2
    for first in range(0, pt, 8):
        for k_step in (0, 1):
            for high in (False, True):
                assert banks.conflict_degree(*banks.dr_b_fragment(first, k_step, high)) == 1
