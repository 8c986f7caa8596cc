"""Real models torch-pruning 1.6.1 cannot handle: a clear error in seconds with PW pruning, DW taps without.

- torchvision ``shufflenet_v2_x0_5``: torch-pruning's graph build raises ``ZeroDivisionError`` (channel
  shuffle reshape);
- timm ``rexnet_100`` / ``rexnetr_100``: a residual added into a slice of the channels; torch-pruning's group
  search of a projection (``features.7`` / ``.9``) does not end in useful time (minutes in ``BasePruner.__init__``).
"""
from __future__ import annotations

import time

import pytest
import torch

from deprune_plugin import DEPruner
from deprune_plugin.core.masks import masked_convs, tap_mask
from deprune_plugin.core.zoo import build_model, classifier_of
from deprune_plugin.tp_glue.limits import TorchPruningFailure

pytestmark = pytest.mark.slow
X = torch.randn(1, 3, 64, 64)
BOUND_S = 60  # generous: these take ~1-4 s here; before the fix rexnet took many minutes


@pytest.mark.parametrize("source,name,part,cause", [
    ("torchvision", "shufflenet_v2_x0_5", "'stage", "ZeroDivisionError"),
    ("timm", "rexnet_100", "'features.7.conv_pwl.conv'", "passed 5000 items"),
    ("timm", "rexnetr_100", "'features.9.conv_pwl.conv'", "passed 5000 items"),
])
def test_pw_pruning_fails_fast_with_the_model_part_and_the_dw_only_hint(source, name, part, cause):
    model = build_model(source, name, num_classes=10)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    with pytest.raises(TorchPruningFailure) as info:
        DEPruner(model, X, dw_pruning_ratio=0.5, pw_pruning_ratio=0.3, ignored_layers=[classifier_of(model)])
    assert time.perf_counter() - t0 < BOUND_S
    msg = str(info.value)
    assert part in msg and cause in msg and "pw_pruning_ratio=0 prunes DW taps only" in msg, msg
    assert isinstance(info.value, ValueError)
    assert model.training and not list(masked_convs(model))  # untouched
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("source,name", [("torchvision", "shufflenet_v2_x0_5"), ("timm", "rexnet_100"),
                                         ("timm", "rexnetr_100")])
def test_pw_ratio_zero_prunes_dw_taps_of_any_model(source, name):
    model = build_model(source, name, num_classes=10)
    t0 = time.perf_counter()
    pruner = DEPruner(model, X, dw_pruning_ratio=0.5, pw_pruning_ratio=0.0, variant="B",
                      ignored_layers=[classifier_of(model)])
    pruner.step()
    assert time.perf_counter() - t0 < BOUND_S
    convs = list(masked_convs(model))
    assert len(convs) == len(pruner.summary()) > 10
    for n, conv in convs:
        keep = tap_mask(conv)
        pruned = int((~keep).sum())
        ranges = -(-keep.shape[0] // 32)  # BWT floors once per balanced range of 32 channels
        assert 0 <= keep.numel() / 2 - pruned < ranges, n
        assert (conv.weight[~keep] == 0).all()
    model.eval()
    with torch.no_grad():
        assert model(X).shape == (1, 10)
    assert pruner.pruning_history() == []
