"""HSR: ranking by beta, half over- / half under-aligned, masks aligned to the tile."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from deprune_plugin.core.method import (bwt_keep_mask, global_layer_ratios, hsr_apply, hsr_plan, kept_per_range,
                                        tile_cost_alpha)


def test_cost_model_alpha():
    assert tile_cost_alpha(87, 32) == pytest.approx(1 / 2)  # 3 tiles -> 2 tiles: 50% faster
    assert tile_cost_alpha(64, 32) == 0.0
    assert tile_cost_alpha(20, 32) == math.inf


def test_plan_top_half_by_beta_goes_over_and_odd_extra_goes_under():
    # K' = 52 (q=1, r=20): beta = 1/20; 144 (q=4, r=16): 1/64; 87 (q=2, r=23): 1/46; 64 aligned.
    plan = hsr_plan([52, 144, 87, 64], tile=32)
    assert [d.mark for d in plan] == ["o", "u", "u", "-"]
    assert [d.new_kept for d in plan] == [32, 160, 96, 64]
    assert plan[0].beta == pytest.approx(1 / 20) and plan[0].epsilon == 20
    plan = hsr_plan([52, 144, 87, 44], tile=32)  # 4 unaligned: 2 o, 2 u; beta(44)=1/12 is largest
    assert [d.mark for d in plan] == ["o", "u", "u", "o"]


def test_plan_never_over_aligns_to_zero_and_caps_restore():
    plan = hsr_plan([20, 40, 52], tile=32, limits=[24, 800, 800])
    assert plan[0].mark == "u" and plan[0].new_kept == 24  # capped at the range size
    assert [d.mark for d in plan] == ["u", "o", "u"]  # beta(40)=1/8 > beta(52)=1/20


def test_plan_never_over_aligns_below_a_floor():
    # K' = 144 (q=4, r=16) in both; "o" would keep 128 of 288 (55.6% pruned), past a 50% cap (floor 144)
    plan = hsr_plan([144, 144], tile=32, limits=[288, 288], floors=[144, None])
    assert [(d.mark, d.new_kept) for d in plan] == [("u", 160), ("o", 128)]
    plan = hsr_plan([144, 144], tile=32, limits=[288, 288], floors=[144, 144])
    assert [(d.mark, d.new_kept) for d in plan] == [("u", 160), ("u", 160)]  # neither may go down


def test_plan_breaks_equal_betas_toward_the_total_before_hsr():
    # uniform targets: four layers at K' = 139 (r = 11), the same beta; "o" takes 11, "u" adds 21 per range
    kept, weights = [139] * 4, [1, 1, 30, 30]
    plan = hsr_plan(kept, tile=32, weights=weights)
    assert [d.mark for d in plan] == ["o", "u", "u", "o"]

    def change(marks):
        return sum(w * ((128 if x == "o" else 160) - 139) for x, w in zip(marks, weights))

    choices = [["o" if i in pair else "u" for i in range(4)] for pair in itertools.combinations(range(4), 2)]
    assert abs(change([d.mark for d in plan])) == min(abs(change(c)) for c in choices) == 310
    # equal weights: layer order decides, as before
    assert [d.mark for d in hsr_plan(kept, tile=32)] == ["o", "o", "u", "u"]


def test_plan_uses_given_alpha():
    plan = hsr_plan([52, 87], tile=32, alpha_fn=lambda i, k, t: [0.01, 10.0][i])
    assert [d.mark for d in plan] == ["u", "o"]


def test_apply_over_and_under_on_a_real_mask():
    torch.manual_seed(3)
    w = torch.randn(64, 1, 3, 3)
    keep = bwt_keep_mask(w.abs(), 0.70, 32)  # K' = 87
    down = hsr_apply(w.abs(), keep, torch.ones_like(keep), 64, 32)
    up = hsr_apply(w.abs(), keep, torch.ones_like(keep), 96, 32)
    assert kept_per_range(down, 32) == [64, 64] and kept_per_range(up, 32) == [96, 96]
    assert not (down & ~keep).any() and not (keep & ~up).any()
    # "u" restores the largest pruned weights of each range
    restored = up & ~keep
    for s in (0, 32):
        pruned = (~keep[s:s + 32])
        if restored[s:s + 32].any():
            assert w.abs()[s:s + 32][restored[s:s + 32]].min() >= w.abs()[s:s + 32][pruned & ~up[s:s + 32]].max()


@settings(max_examples=40, deadline=None, derandomize=True)
@example(n_layers=2, seed=2, ratio=0.8984375)  # both layers at K' = 30: neither can go down
@given(n_layers=st.integers(1, 12), seed=st.integers(0, 10_000), ratio=st.floats(0.3, 0.9))
def test_property_aligned_after_hsr(n_layers, seed, ratio):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(32 * int(torch.randint(1, 4, (1,), generator=gen)), 1, k, k, generator=gen)
          for k in torch.tensor([3, 5, 7])[torch.randint(0, 3, (n_layers,), generator=gen)].tolist()]
    keeps = [bwt_keep_mask(w.abs(), ratio, 32) for w in ws]
    plan = hsr_plan([kept_per_range(k, 32)[0] for k in keeps], 32, [32 * w[0].numel() for w in ws])
    unaligned = [d for d in plan if d.mark != "-"]
    # half go down, except that a range with K' < tile (q == 0) cannot go down without emptying itself
    can_go_down = sum(d.kept // 32 > 0 for d in unaligned)
    assert sum(d.mark == "o" for d in plan) == min(len(unaligned) // 2, can_go_down)
    assert all(d.mark == "u" for d in unaligned if d.kept < 32)
    for w, k, d in zip(ws, keeps, plan):
        new = hsr_apply(w.abs(), k, torch.ones_like(k), d.new_kept, 32) if d.mark != "-" else k
        assert all(x % 32 == 0 or x == 32 * w[0].numel() for x in kept_per_range(new, 32))


def test_global_ratios_keep_the_model_wide_ratio_and_cap():
    a = torch.ones(10) * torch.tensor([1.0, 1, 1, 1, 1, 2, 2, 2, 2, 2])  # normalised: 2/3 and 4/3
    b = torch.arange(1.0, 11.0)
    r = global_layer_ratios([a, b], 0.5)
    assert sum(x * 10 for x in r) == pytest.approx(10)
    capped = global_layer_ratios([torch.full((10,), 0.1), torch.full((10,), 100.0) + torch.arange(10.0)], 0.5,
                                 max_ratio=0.6)
    assert max(capped) <= 0.6 + 1e-9 and sum(x * 10 for x in capped) == pytest.approx(10)
