"""Geometry-aware tap importance: a tap's score is |w| times the fraction of output positions at which it
reads real input at the example input's resolution; taps that only ever read padding score zero."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from deprune_plugin import DEPruneImportance, DEPruner, tap_mask
from deprune_plugin.core.method.geometry import axis_coverage, blind_channels, tap_coverage, with_channel_floor
from deprune_plugin.core.padding import same_padding


@pytest.mark.parametrize("size,kernel,stride,pads,expected", [
    (1, 3, 1, (1, 1), [0.0, 1.0, 0.0]),          # a 1x1 map: only the centre tap reads the pixel
    (2, 3, 1, (1, 1), [0.5, 1.0, 0.5]),          # 2 outputs: each edge tap reads input at one of them
    (4, 3, 2, (1, 1), [0.5, 1.0, 1.0]),          # outputs 0,1 read rows -1..1 and 1..3
    (4, 3, 2, (0, 1), [1.0, 1.0, 0.5]),          # TF "SAME" on an even input: the padding goes after
    (8, 3, 1, (1, 1), [7 / 8, 1.0, 7 / 8]),
    (5, 5, 1, (2, 2), [3 / 5, 4 / 5, 1.0, 4 / 5, 3 / 5]),
])
def test_axis_coverage_hand_values(size, kernel, stride, pads, expected):
    assert axis_coverage(size, kernel, stride, pads[0], pads[1], 1) == pytest.approx(expected)


def test_same_padding_matches_the_hand_case():
    assert same_padding(4, 3, 2, 1) == (0, 1)
    assert same_padding(5, 3, 2, 1) == (1, 1)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 12), kernel=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2),
       pad=st.integers(0, 2), dilation=st.integers(1, 2))
def test_axis_coverage_agrees_with_a_convolution_of_ones(size, kernel, stride, pad, dilation):
    """Reference: convolve a ones image with a one-hot tap; the mean output is the tap's coverage."""
    if (size + 2 * pad - dilation * (kernel - 1) - 1) < 0:
        return
    got = axis_coverage(size, kernel, stride, pad, pad, dilation)
    x = torch.ones(1, 1, 1, size, dtype=torch.float64)
    for i in range(kernel):
        w = torch.zeros(1, 1, 1, kernel, dtype=torch.float64)
        w[..., i] = 1.0
        y = torch.nn.functional.conv2d(x, w, stride=(1, stride), padding=(0, pad), dilation=(1, dilation))
        assert got[i] == pytest.approx(float(y.mean()))


def test_a_tap_that_only_reads_padding_scores_zero():
    w = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3).repeat(4, 1, 1, 1)
    cov = tap_coverage((1, 1), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    scores = DEPruneImportance(taps="geometry").tap_scores(w, coverage=cov)
    assert scores[:, 0, 1, 1].tolist() == [5.0] * 4          # the centre: |w| x 1
    assert int((scores != 0).sum()) == 4                     # every other tap: zero
    # magnitude ignores the geometry; geometry without a known geometry falls back to it
    assert torch.equal(DEPruneImportance().tap_scores(w, coverage=cov), w)
    assert torch.equal(DEPruneImportance(taps="geometry").tap_scores(w), w)


def test_channel_floor_lifts_each_channels_best_tap_only():
    s = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.3, 0.0], [0.0, 0.0, 0.0]]).reshape(3, 1, 1, 3)
    out = with_channel_floor(s).reshape(3, 3)
    lift = 0.9 + 1.0
    assert out[0].tolist() == pytest.approx([0.1, 0.9 + lift, 0.0])
    assert out[1].tolist() == pytest.approx([0.2, 0.3 + lift, 0.0])
    assert out[2].tolist() == [0.0, 0.0, 0.0]  # a channel whose taps all read padding gets no floor
    assert float(out[1].max()) > float(out[0, 0]) and float(out[1].max()) > 0.9  # above every unlifted tap


class _TinyMap(nn.Module):
    """Stem down to a 1x1 map, then a DW conv on it, whose edge taps only multiply padding."""

    def __init__(self, c: int = 64):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.dw(self.stem(x)).mean((2, 3)))


def _edge_heavy(model: _TinyMap) -> _TinyMap:
    with torch.no_grad():
        w = torch.full((64, 1, 3, 3), 1.0)
        w[:, :, 1, 1] = 0.01  # the one tap that reads input is the smallest
        model.dw.weight.copy_(w)
    return model


@pytest.mark.parametrize("taps,expect_centres", [("magnitude", 0), ("geometry", 64)])
def test_pruner_keeps_the_taps_that_read_input_only_with_geometry(taps, expect_centres):
    torch.manual_seed(0)
    model = _edge_heavy(_TinyMap())
    pruner = DEPruner(model, torch.randn(1, 3, 4, 4), importance=DEPruneImportance(taps=taps),
                      dw_pruning_ratio=0.78, pw_pruning_ratio=0.0, variant="B", ignored_layers=[model.head])
    pruner.step()
    keep = tap_mask(model.dw)
    assert int(keep[:, 0, 1, 1].sum()) == expect_centres
    # BWT: each 32-channel range keeps the same count either way
    assert int(keep.sum()) == 2 * (32 * 9 - math.floor(0.78 * 32 * 9))


def test_a_custom_importance_with_the_one_argument_tap_scores_still_works():
    seen = []

    class Mine(DEPruneImportance):
        def tap_scores(self, weight):  # the form written before geometry existed
            seen.append(tuple(weight.shape))
            return weight.detach().abs()

    model = _edge_heavy(_TinyMap())
    DEPruner(model, torch.randn(1, 3, 4, 4), importance=Mine(), dw_pruning_ratio=0.5, pw_pruning_ratio=0.0,
             variant="B", ignored_layers=[model.head]).step()
    assert seen == [(64, 1, 3, 3)]
    assert int(tap_mask(model.dw).sum()) == 2 * (32 * 9 - 144)
    assert int(tap_mask(model.dw)[:, 0, 1, 1].sum()) == 0  # |w| ranking: the small centre taps go


def test_geometry_sees_the_example_resolution_even_when_the_probe_upscales():
    """DEPruner re-probes tiny inputs at 4x to tell SE convs apart; coverage must use the real resolution."""
    model = _edge_heavy(_TinyMap())
    pruner = DEPruner(model, torch.randn(1, 3, 4, 4), importance=DEPruneImportance(taps="geometry"),
                      dw_pruning_ratio=0.5, pw_pruning_ratio=0.0, ignored_layers=[model.head])
    assert pruner._probe_record.in_hw[model.dw] == (4, 4)           # the structure probe ran at 16x16
    assert pruner._coverage(model.dw).tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize("kwargs,exc", [({"taps": "size"}, ValueError), ({"p": 0}, ValueError),
                                        ({"channel_floor": 1}, TypeError)])
def test_bad_importance_arguments_are_named(kwargs, exc):
    with pytest.raises(exc, match=next(iter(kwargs))):
        DEPruneImportance(**kwargs)


def test_blind_channels_by_hand():
    # a 1x1 map with padding 1: only the centre tap reads the pixel
    cov = tap_coverage((1, 1), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    keep = torch.zeros(4, 1, 3, 3, dtype=torch.bool)
    keep[0, 0, 1, 1] = True          # the centre: reads input
    keep[1, 0, 0, 0] = True          # a corner only: reads padding everywhere
    keep[2, 0, 0, 1] = keep[2, 0, 1, 1] = True  # a padding tap and the centre
    # channel 3 keeps nothing at all
    assert blind_channels(keep, cov).tolist() == [1, 3]
    big = tap_coverage((8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))  # at 8x8 every tap reads input somewhere
    assert blind_channels(keep, big).tolist() == [3]
    with pytest.raises(ValueError, match="kernel size"):
        blind_channels(keep, torch.ones(5, 5))


def test_summary_counts_the_channels_that_read_no_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, stride=8, padding=1), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                        nn.Conv2d(32, 8, 1))
    p = DEPruner(net, torch.randn(1, 3, 8, 8), dw_pruning_ratio=0.8, pw_pruning_ratio=0.0)
    p.step()
    keep = tap_mask(net[1])
    # the DW conv runs on a 1x1 map: a channel is blind unless it kept its centre tap
    expected = int((~keep[:, 0, 1, 1]).sum())
    s = p.summary()
    assert expected > 0 and s.rows[0].blind_channels == expected == s.blind_channels
    assert f"{expected} DW channel(s) in 1 layer(s) keep no tap that reads input" in s.table()
