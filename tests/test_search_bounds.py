"""torch-pruning's group search is bounded in items, held channel indices (memory) and wall time: past a
bound DEPruner raises TorchPruningFailure promptly, names the model part and the DW-only way out, and
leaves the model as it was."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from deprune_plugin import DEPruner
from deprune_plugin.tp_glue import limits
from deprune_plugin.tp_glue.limits import TorchPruningFailure, bounded_groups


def tiny() -> nn.Sequential:
    """Two DSConv blocks; the second projection's output is flattened with its 6x6 map into the classifier
    (a reshape that expands each channel index into 36)."""
    return nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 8, 1), nn.ReLU(),
                         nn.Conv2d(8, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 8, 1),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


X = torch.randn(2, 3, 6, 6)


def prune_fails(model: nn.Module, match: str) -> str:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    t0 = time.perf_counter()
    with pytest.raises(TorchPruningFailure, match=match) as info:
        DEPruner(model, X, dw_pruning_ratio=0.5, pw_pruning_ratio=0.5, variant="plain", ignored_layers=[model[10]])
    assert time.perf_counter() - t0 < 5.0
    assert model.training and model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # untouched
    assert [(m.in_channels, m.out_channels) for m in model if isinstance(m, nn.Conv2d)] == \
        [(3, 16), (16, 16), (16, 8), (8, 32), (32, 32), (32, 8)]
    assert model(X).shape == (2, 4)
    msg = str(info.value)
    assert "pw_pruning_ratio=0 prunes DW taps only" in msg and "in Sequential" in msg, msg
    return msg


def test_default_bounds_let_the_model_prune():
    m = tiny()
    DEPruner(m, X, dw_pruning_ratio=0.5, pw_pruning_ratio=0.5, variant="plain", ignored_layers=[m[10]]).step()
    assert m[4].out_channels == 4 and m[8].out_channels == 4 and m[10].in_features == 4 * 36


def test_index_bound_fails_before_a_reshape_expands_the_indices(monkeypatch):
    monkeypatch.setattr(limits, "GROUP_INDEX_LIMIT", 200)
    expanded = []
    real = limits._FLATTEN_CALL

    def spy(self, idxs):
        out = real(self, idxs)
        expanded.append(len(out))
        return out

    monkeypatch.setattr(limits, "_FLATTEN_CALL", spy)
    msg = prune_fails(tiny(), r"passed 200 channel indices \(a memory bound\)")
    assert "'8'" in msg  # the second projection, whose 8 channels would become 8 * 36 = 288 indices
    assert all(n <= 200 for n in expanded)  # refused before the expansion, not after


def test_wall_time_bound_stops_a_slow_search(monkeypatch):
    monkeypatch.setattr(limits, "GROUP_SECONDS_LIMIT", 0.2)
    real = tp.dependency.group.Group.add_dep

    def slow(self, dep, idxs):  # a search that would take seconds: 0.1 s per item
        time.sleep(0.1)
        return real(self, dep, idxs)

    monkeypatch.setattr(tp.dependency.group.Group, "add_dep", slow)
    t0 = time.perf_counter()
    prune_fails(tiny(), r"passed 0\.2 s \(a wall-time bound\)")
    assert time.perf_counter() - t0 < 1.5  # the first group search has 6 items: stopped after ~0.3 s


def test_item_bound_names_the_group_root(monkeypatch):
    monkeypatch.setattr(limits, "GROUP_STEP_LIMIT", 2)
    msg = prune_fails(tiny(), r"passed 2 items")
    assert "channel group of '3'" in msg  # the first DW conv's group is searched first


def test_bounds_are_restored_after_the_block():
    group_cls, flatten = tp.dependency.graph.Group, tp.dependency.index_mapping._FlattenIndexMapping.__call__
    with pytest.raises(limits.GroupSearchTooLong):
        with bounded_groups(items=0):
            tp.dependency.graph.Group().add_dep(None, [1])
    assert tp.dependency.graph.Group is group_cls
    assert tp.dependency.index_mapping._FlattenIndexMapping.__call__ is flatten
    assert limits._ACTIVE == [None] and limits._BOUNDS["items"] == limits.GROUP_STEP_LIMIT


@pytest.mark.slow
def test_efficientformerv2_fails_fast_on_its_attention_reshapes():
    """Before the index bound this search grew to 24 GB (at 224x224) without ending."""
    import timm
    m = timm.create_model("efficientformerv2_s0", pretrained=False, num_classes=10, img_size=64)
    x = torch.randn(1, 3, 64, 64)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    t0 = time.perf_counter()
    with pytest.raises(TorchPruningFailure, match=r"channel indices \(a memory bound\)") as info:
        DEPruner(m, x, dw_pruning_ratio=0.5, pw_pruning_ratio=0.5, ignored_layers=list(m.get_classifier()))
    assert time.perf_counter() - t0 < 20
    assert "token_mixer" in str(info.value) and "pw_pruning_ratio=0" in str(info.value)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
