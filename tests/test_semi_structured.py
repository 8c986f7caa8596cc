"""2:4 semi-structured sparsity (the baseline of the paper's rebuttal) and non-zero MAC counting."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from deprune_plugin import tap_mask
from deprune_plugin.core.cost import count_cost
from deprune_plugin.core.semi_structured import apply_nm_sparsity, nm_keep_mask


def test_hand_example_of_a_3x3_depthwise_filter():
    w = torch.tensor([[[[1.0, -5, 3], [2, 0.5, -4], [9, 1, 1]]]])
    # groups along the 9 taps: (1,-5,3,2) keeps -5,3; (0.5,-4,9,1) keeps -4,9; (1) keeps itself
    assert nm_keep_mask(w).int().flatten().tolist() == [0, 1, 1, 0, 0, 1, 1, 0, 1]


@settings(max_examples=50, deadline=None)
@given(out=st.integers(1, 6), k=st.integers(1, 20), n=st.integers(1, 4), data=st.data())
def test_every_group_keeps_its_n_largest(out, k, n, data):
    m = data.draw(st.integers(n, 6))
    seed = data.draw(st.integers(0, 1000))
    w = torch.randn(out, k, generator=torch.Generator().manual_seed(seed))
    keep = nm_keep_mask(w, n, m)
    for row in range(out):
        for start in range(0, k, m):
            grp, kept = w[row, start:start + m].abs(), keep[row, start:start + m]
            assert int(kept.sum()) == min(n, len(grp))
            if kept.any() and (~kept).any():
                assert float(grp[kept].min()) >= float(grp[~kept].max())


def test_apply_prunes_dw_and_1x1_convs_and_counts_half_the_macs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    x = torch.randn(1, 3, 6, 6)
    dense = count_cost(net, (x,), nonzero=True).macs
    assert dense == 36 * (3 * 8 * 9 + 8 * 9 + 8 * 16) + 16 * 4
    assert apply_nm_sparsity(net, skip=[net[5]]) == 2  # the DW conv and the 1x1; not the stem, not the head
    assert int(tap_mask(net[1]).sum()) == 8 * 5
    sparse = count_cost(net, (x,), nonzero=True).macs
    assert sparse == 36 * (3 * 8 * 9 + 8 * 5 + 8 * 8) + 16 * 4
    # the zeros stay zero through a training step (masks are part of the model)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net(torch.randn(4, 3, 6, 6)).sum().backward()
    opt.step()
    assert count_cost(net, (x,), nonzero=True).macs == sparse


def test_bad_n_m_is_an_error():
    with pytest.raises(ValueError, match="n <= m"):
        nm_keep_mask(torch.ones(2, 4), 3, 2)
