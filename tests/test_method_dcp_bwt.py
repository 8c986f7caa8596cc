"""DCP and BWT rules, checked with hand-computable numbers and property tests."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deprune_plugin.core.method import bwt_keep_mask, dcp_keep_mask, kept_per_range, range_ratios, real_ratio


def test_dcp_prunes_floor_of_ratio_smallest_magnitudes():
    # 2 channels x 3x3 = 18 weights with |w| = 1..18: at 50% floor(9) smallest go.
    signs = torch.tensor([1.0, -1.0]).repeat(9).reshape(2, 1, 3, 3)
    w = torch.arange(1, 19, dtype=torch.float32).reshape(2, 1, 3, 3) * signs
    keep = dcp_keep_mask(w.abs(), 0.5)
    assert int((~keep).sum()) == 9
    assert keep.reshape(-1).tolist() == [False] * 9 + [True] * 9
    # 0.3 * 18 = 5.4 -> 5 pruned (floor)
    assert int((~dcp_keep_mask(w.abs(), 0.3)).sum()) == 5


def test_mobilenetv2_range_numbers_from_the_paper():
    # 3x3 at 78%: a full range has 288 weights, BWT prunes floor(224.64) = 224 -> K' = 64 (77.78%).
    w = torch.randn(144, 1, 3, 3)
    keep = bwt_keep_mask(w.abs(), 0.78, group_size=32)
    assert kept_per_range(keep, 32) == [64, 64, 64, 64, 32]  # 16-channel tail: 144 -> 112 pruned, 32 kept
    assert range_ratios(keep, 32)[0] == pytest.approx(224 / 288)
    assert real_ratio(keep, 32) == pytest.approx(0.7778, abs=1e-4)


def test_bwt_at_70_percent_leaves_87_columns():
    keep = bwt_keep_mask(torch.randn(64, 1, 3, 3).abs(), 0.70, 32)
    assert kept_per_range(keep, 32) == [87, 87]  # 288 - floor(201.6) = 87 = 2*32 + 23


@pytest.mark.parametrize("k,ratio,kept", [(3, 0.82, 52), (5, 0.82, 144), (3, 0.85, 44), (5, 0.85, 120)])
def test_section_10_1_table(k, ratio, kept):
    keep = bwt_keep_mask(torch.randn(32, 1, k, k).abs(), ratio, 32)
    assert kept_per_range(keep, 32) == [kept]


def test_plain_dcp_real_ratio_is_below_target_and_bwt_equals_it():
    # Scale channel groups differently so one range holds most of the large weights (as in a trained net).
    torch.manual_seed(1)
    w = torch.randn(96, 1, 3, 3)
    w[32:64] *= 3.0
    dcp = dcp_keep_mask(w.abs(), 0.78)
    bwt = bwt_keep_mask(w.abs(), 0.78, 32)
    assert real_ratio(dcp, 32) < 0.70  # the big-weight range is pruned far less than the target
    assert real_ratio(bwt, 32) == pytest.approx(224 / 288)
    assert int((~dcp).sum()) == math.floor(0.78 * 864) == 673  # layer-wise floor
    assert int((~bwt).sum()) == 3 * 224  # floor per range


def test_masks_only_grow_over_steps():
    w = torch.randn(40, 1, 5, 5)
    k1 = bwt_keep_mask(w.abs(), 0.3, 32)
    w2 = w * k1 + torch.randn_like(w) * 0.01 * k1  # training moved kept weights only
    k2 = bwt_keep_mask(w2.abs(), 0.6, 32, keep=k1)
    assert not (k2 & ~k1).any()
    assert kept_per_range(k2, 32) == [32 * 25 - math.floor(0.6 * 800), 8 * 25 - math.floor(0.6 * 200)]


def test_bad_ratio_is_rejected():
    with pytest.raises(ValueError, match="ratio"):
        dcp_keep_mask(torch.ones(2, 1, 3, 3), 1.0)
    with pytest.raises(ValueError, match="group_size"):
        bwt_keep_mask(torch.ones(2, 1, 3, 3), 0.5, 0)


@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 100), k=st.sampled_from([1, 3, 5, 7]), ratio=st.floats(0, 0.99),
       g=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**16))
def test_bwt_property_every_range_prunes_floor_ratio(c, k, ratio, g, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(c, 1, k, k, generator=gen)
    keep = bwt_keep_mask(w.abs(), ratio, g)
    for (s, e), kept in zip([(s, min(s + g, c)) for s in range(0, c, g)], kept_per_range(keep, g)):
        n = (e - s) * k * k
        assert kept == n - math.floor(ratio * n + 1e-9)
        # inside a range, every pruned weight is no larger than every kept one
        sub_w, sub_k = w[s:e].abs(), keep[s:e]
        if (~sub_k).any() and sub_k.any():
            assert sub_w[~sub_k].max() <= sub_w[sub_k].min()


@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 80), k=st.sampled_from([3, 5, 7]), ratio=st.floats(0, 0.99), seed=st.integers(0, 2**16))
def test_dcp_property_layerwise_count_and_order(c, k, ratio, seed):
    w = torch.randn(c, 1, k, k, generator=torch.Generator().manual_seed(seed))
    keep = dcp_keep_mask(w.abs(), ratio)
    assert int((~keep).sum()) == math.floor(ratio * w.numel() + 1e-9)
    if (~keep).any() and keep.any():
        assert w.abs()[~keep].max() <= w.abs()[keep].min()
