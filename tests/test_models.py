"""The supported model list: prune with DEPrune-BH, forward, check the structure."""
from __future__ import annotations

import pytest
import torch

from deprune_plugin import DEPruner
from deprune_plugin.core.masks import is_depthwise, tap_mask
from deprune_plugin.core.method import kept_per_range
from deprune_plugin.core.zoo import build_model, classifier_of
from zoo_models import MODELS, ids


@pytest.mark.slow
@pytest.mark.parametrize("source,name", MODELS, ids=ids(MODELS))
def test_model_prunes_with_the_specified_structure(source, name):
    model = build_model(source, name, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    dw_before = {n: m.out_channels for n, m in model.named_modules() if is_depthwise(m)}
    params_before = sum(p.numel() for p in model.parameters())
    pruner = DEPruner(model, x, dw_pruning_ratio=0.7, pw_pruning_ratio=0.5, variant="BH",
                      ignored_layers=[classifier_of(model)])
    pruner.step()
    model.eval()
    assert model(x).shape == (2, 10)
    dws = {n: m for n, m in model.named_modules() if is_depthwise(m)}
    assert {n: m.out_channels for n, m in dws.items()} == dw_before  # DW channels never removed
    for m in dws.values():
        mask = tap_mask(m)
        assert mask is not None and mask.shape == m.weight.shape
        full = kept_per_range(mask, 32)[: m.out_channels // 32]
        assert len(set(full)) <= 1  # BWT: every full range keeps the same K'
        assert all(k % 32 == 0 or k == 32 * m.weight[0].numel() for k in full)  # HSR: tile aligned
        assert (m.weight[~mask] == 0).all()
    s = pruner.summary()
    assert len(s) == len(dws) and s.after.params < s.before.params == params_before
    assert s.after.macs < s.before.macs
    assert 0.6 < s.dw_ratio < 0.8
