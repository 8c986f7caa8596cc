"""CompactTaps / DRColumns: round trips, hand-checked DR column counts and padding, input validation."""
from __future__ import annotations

import pytest
import torch

from deprune_plugin.kernels.formats import CompactTaps, DRColumns


def _weight_and_mask(c: int, kh: int, kw: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, 1, kh, kw, generator=g)
    m = torch.rand(c, 1, kh, kw, generator=g) < 0.5
    m[1] = False  # one fully pruned channel
    return w, m


@pytest.mark.parametrize("shape", [(40, 3, 3), (7, 5, 5), (33, 7, 7), (5, 2, 4), (3, 1, 1)])
def test_compact_taps_round_trip(shape):
    w, m = _weight_and_mask(*shape)
    taps = CompactTaps.from_dense(w, m)
    assert taps.tap_ptr.dtype == taps.tap_idx.dtype == torch.int32 and taps.tap_val.dtype == torch.float32
    assert taps.num_channels == shape[0] and taps.nnz == int(m.sum())
    assert torch.equal(taps.to_dense(), w * m)
    assert int(taps.tap_ptr[2] - taps.tap_ptr[1]) == 0  # channel 1 fully pruned
    # taps of one channel ascend
    for c in range(shape[0]):
        idx = taps.tap_idx[taps.tap_ptr[c]:taps.tap_ptr[c + 1]]
        assert bool((idx[1:] > idx[:-1]).all())


def test_compact_taps_without_mask_uses_nonzeros_and_mask_keeps_zero_weights():
    w = torch.tensor([[0.0, 2.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    assert CompactTaps.from_dense(w).nnz == 1
    kept = CompactTaps.from_dense(w, torch.ones(2, 1, 1, 2, dtype=torch.bool))
    assert kept.nnz == 4 and kept.tap_ptr.tolist() == [0, 2, 4]
    # a [C, kh, kw] mask and a 0/1 float mask are accepted too
    assert CompactTaps.from_dense(w, torch.ones(2, 1, 2)).nnz == 4


def test_compact_taps_to_device_keeps_content():
    w, m = _weight_and_mask(9, 3, 3)
    taps = CompactTaps.from_dense(w, m).to("cpu")
    assert torch.equal(taps.to_dense(), w * m)


def test_dr_columns_hand_checked_counts_and_padding():
    # C = 40, 3x3, group 32 -> ranges [0, 32) and [32, 40).
    c, kh, kw = 40, 3, 3
    w = torch.arange(1, c * kh * kw + 1, dtype=torch.float32).reshape(c, 1, kh, kw)
    mask = torch.zeros(c, kh * kw, dtype=torch.bool)
    for ch in range(32):  # channel ch keeps its first ch % 4 taps: 8 * (0 + 1 + 2 + 3) = 48 columns
        mask[ch, : ch % 4] = True
    mask[32:36] = True  # 4 channels x 9 taps = 36 columns; channels 36..39 fully pruned
    mask = mask.reshape(c, 1, kh, kw)

    cols = DRColumns.from_dense(w, mask, group_size=32, tile=32)
    assert cols.num_ranges == 2
    assert cols.kept_per_range() == [48, 36]
    assert cols.col_ptr.tolist() == [0, 64, 128]  # 48 -> 64, 36 -> 64
    assert cols.num_columns == 128
    # padding columns: channel = first channel of the range, tap 0, value 0
    assert cols.col_chan[48:64].tolist() == [0] * 16 and cols.col_tap[48:64].tolist() == [0] * 16
    assert cols.col_chan[100:128].tolist() == [32] * 28
    assert cols.col_val[48:64].abs().sum() == 0 and cols.col_val[100:128].abs().sum() == 0
    # kept columns carry non-zero weights (all weights here are non-zero) and stay in their range
    assert bool((cols.col_val[:48] != 0).all()) and bool((cols.col_val[64:100] != 0).all())
    assert int(cols.col_chan[:48].max()) < 32 and int(cols.col_chan[64:100].min()) >= 32
    # tap-major order inside a range: taps non-decreasing, channels ascending within a tap
    taps0, chans0 = cols.col_tap[:48], cols.col_chan[:48]
    assert bool((taps0[1:] >= taps0[:-1]).all())
    same_tap = taps0[1:] == taps0[:-1]
    assert bool((chans0[1:][same_tap] > chans0[:-1][same_tap]).all())
    assert torch.equal(cols.to_dense(), w * mask)

    cols16 = DRColumns.from_dense(w, mask, group_size=32, tile=16)
    assert cols16.col_ptr.tolist() == [0, 48, 96]  # 48 stays, 36 -> 48


@pytest.mark.parametrize("group_size,tile", [(32, 32), (16, 8), (8, 32), (64, 16)])
def test_dr_columns_round_trip_and_alignment(group_size, tile):
    w, m = _weight_and_mask(70, 5, 5, seed=3)
    cols = DRColumns.from_dense(w, m, group_size=group_size, tile=tile)
    widths = (cols.col_ptr[1:] - cols.col_ptr[:-1]).tolist()
    assert all(wd % tile == 0 for wd in widths)
    assert cols.num_ranges == -(-70 // group_size)
    kept = m.reshape(70, -1).sum(1)
    assert cols.kept_per_range() == [int(kept[s:s + group_size].sum()) for s in range(0, 70, group_size)]
    assert torch.equal(cols.to_dense(), w * m)
    assert torch.equal(cols.to("cpu").to_dense(), w * m)


def test_dr_columns_fully_pruned_layer_has_empty_ranges():
    w = torch.randn(40, 1, 3, 3)
    cols = DRColumns.from_dense(w, torch.zeros_like(w, dtype=torch.bool))
    assert cols.col_ptr.tolist() == [0, 0, 0] and cols.kept_per_range() == [0, 0]


@pytest.mark.parametrize("bad,match", [
    (lambda: CompactTaps.from_dense(torch.randn(4, 2, 3, 3)), "weight"),
    (lambda: CompactTaps.from_dense(torch.randn(4, 3, 3)), "weight"),
    (lambda: CompactTaps.from_dense(torch.randn(4, 1, 3, 3), torch.ones(4, 1, 3, 2)), "mask"),
    (lambda: CompactTaps.from_dense(torch.randn(4, 1, 3, 3), torch.full((4, 1, 3, 3), 2.0)), "mask"),
    (lambda: DRColumns.from_dense(torch.randn(4, 1, 3, 3), group_size=0), "group_size"),
    (lambda: DRColumns.from_dense(torch.randn(4, 1, 3, 3), tile=0), "tile"),
    (lambda: CompactTaps(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 9], dtype=torch.int32),
                         torch.zeros(2), (3, 3)), "tap_idx"),
    (lambda: CompactTaps(torch.tensor([0, 1]), torch.tensor([0], dtype=torch.int32), torch.zeros(1), (3, 3)),
     "tap_ptr"),
])
def test_invalid_inputs_raise_naming_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


def test_dr_columns_rejects_column_outside_its_range():
    w = torch.randn(40, 1, 3, 3)
    cols = DRColumns.from_dense(w, group_size=32, tile=32)
    chan = cols.col_chan.clone()
    chan[0] = 35  # range 0 is [0, 32)
    with pytest.raises(ValueError, match="col_chan"):
        DRColumns(cols.col_ptr, chan, cols.col_tap, cols.col_val, cols.col_kept, (3, 3), 32, 32, 40)
