"""Latency-aware pruning: the search, the pruner's latency mode and the targets (no timed assertions).

A modelled target whose latency is the module's MACs makes the search deterministic, so the tests can check
exact properties: the budget is met, the table is additive, the proxy is the pruned function, the knapsack
beats uniform pruning on its own proxy, the history replays.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn

from deprune_plugin import DEPruner, load, save
from deprune_plugin.core.cost import count_cost
from deprune_plugin.core.latency import get_target
from deprune_plugin.tp_glue.latency_search import LatencyConfig, Unit, prune_copy, _sensitivities

CONFIG = LatencyConfig(hidden_levels=(0.0, 0.375, 0.75), stream_levels=(0.0, 0.25))


class MacsTarget:
    """Modelled target: 1 ns per MAC plus 1 us per call; taps count only where ``taps_pay``."""

    name = "macs"
    modelled = True
    alignment = 8

    def __init__(self, taps_pay: bool = False) -> None:
        self.taps_reason = "" if taps_pay else "taps are free here"
        self.calls = 0

    def seconds(self, module, inputs):
        self.calls += 1
        return count_cost(module, tuple(inputs)).macs * inputs[0].shape[0] * 1e-9 + 1e-6


def _model():
    torch.manual_seed(0)
    return timm.create_model("mobilenetv2_050", num_classes=10).eval()


X = torch.randn(2, 3, 64, 64)


def _prune_at(target, budget: float = 0.6):
    """``(model, pruner, dense seconds)`` of one latency-aware prune of a fresh model on ``target``."""
    model = _model()
    dense = target.seconds(model, (X,))
    p = DEPruner(model, X, latency_budget=budget, target=target, latency_config=CONFIG,
                 ignored_layers=[model.get_classifier()])
    p.step()
    return model, p, dense


@pytest.fixture(scope="module")
def pruned():
    """One latency-aware prune at 60% on the MACs target, shared by the tests that read its result."""
    target = MacsTarget()
    model, p, dense = _prune_at(target)
    return model, p, target, dense


@pytest.fixture(scope="module")
def fresh():
    """An unpruned model with its latency-mode pruner built (not stepped): the search runs on copies."""
    model = _model()
    return model, DEPruner(model, X, latency_budget=0.7, target=MacsTarget(), latency_config=CONFIG,
                           ignored_layers=[model.get_classifier()])


def test_budget_met_and_table_exact_on_an_additive_target(pruned):
    model, p, target, dense = pruned
    rep = p.summary().latency
    after = target.seconds(model, (X,))
    assert rep.dense_s == pytest.approx(dense)
    assert after <= 0.6 * dense * (1 + CONFIG.tolerance)
    assert after >= 0.6 * dense * 0.85                      # not far below what was asked either
    assert rep.measured_s == pytest.approx(after, rel=1e-9)  # the report's figure is the model's
    assert rep.predicted_s == pytest.approx(rep.measured_s, rel=1e-6)  # MACs add up over blocks exactly
    assert rep.taps_reason == "taps are free here" and p.summary().dw_ratio == 0.0
    widths = [b.hidden for b in rep.blocks if b.hidden]
    assert any(a != b for a, b in widths)                   # something was pruned
    assert all(b % 8 == 0 or b == a for a, b in widths)     # aligned to the target's width
    assert model(X).shape == (2, 10)
    text = str(p.summary())
    assert "latency-aware prune for macs (modelled), budget 60% of dense" in text


def test_knapsack_beats_uniform_pruning_on_its_proxy(fresh):
    from deprune_plugin.tp_glue import latency_search as ls

    model, p = fresh
    target = p.target
    ignored = {model.get_classifier()}
    res = ls.search(model, p.DG, p.structure, (X,), (X,), target, 0.7, p.importance, ignored, 1.0, 0.78, 32, CONFIG)
    # uniform: the least hidden level (streams kept) that meets the same budget, and its proxy loss
    blocks = ls._block_modules(model, p.structure, (X,))
    units = ls.find_units(p.DG, model, p.structure, blocks, p.importance, ignored, 1.0)
    local = [u for u in units if u.block is not None]
    levels = {i: list(CONFIG.hidden_levels) for i in range(len(local))}

    class Quiet:
        def update(self, n):
            pass
    sens = _sensitivities(model, local, lambda u, f: u.kept(f, 8), levels, (X,), Quiet())
    dense = target.seconds(model, (X,))
    uniform = None
    for k, f in enumerate(CONFIG.hidden_levels):
        work = prune_copy(model, (X,), {u.name: u.order[:u.width - u.kept(f, 8)] for u in local}, {}, 32)
        if target.seconds(work, (X,)) <= 0.7 * dense:
            uniform = sum(s[k] for s in sens.values())
            break
    assert uniform is not None
    assert res.loss < uniform
    assert res.report.proxy_loss == res.loss


def test_sensitivity_is_the_pruned_function(fresh):
    """Zeroing the consumers' input columns gives what torch-pruning's removal gives."""
    from deprune_plugin.tp_glue import latency_search as ls

    model, p = fresh
    blocks = ls._block_modules(model, p.structure, (X,))
    units = ls.find_units(p.DG, model, p.structure, blocks, p.importance, {model.get_classifier()}, 1.0)
    assert any(u.block is None for u in units) and any(u.block is not None for u in units)
    for u in [next(u for u in units if u.block is not None), next(u for u in units if u.block is None)]:
        drop = u.order[: u.width // 2]
        pruned = prune_copy(model, (X,), {u.name: drop}, {}, 32)
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            for name, idx, ridx in u.consumers:
                ls._zero_input_columns(zeroed.get_submodule(name), [i for i, r in zip(idx, ridx) if r in set(drop)])
            torch.testing.assert_close(zeroed(X), pruned(X), rtol=1e-4, atol=1e-5)
            # and the check can fail: zeroing half the columns is not a no-op
            assert not torch.allclose(zeroed(X), model(X), atol=1e-4)


def test_taps_only_where_the_target_gains_from_them():
    model = _model()
    p = DEPruner(model, X, latency_budget=0.6, target=MacsTarget(taps_pay=True),
                 latency_config=LatencyConfig(hidden_levels=(0.0, 0.75), stream_levels=(0.0,)),
                 ignored_layers=[model.get_classifier()])
    p.step()
    rep = p.summary().latency
    assert rep.taps_reason == ""
    chosen = [b.tap_ratio for b in rep.blocks]
    assert set(chosen) <= {0.0, 0.78}
    # the summary's DW ratios are what the search chose, per layer
    rows = {r.name: r for r in p.summary()}
    for b in rep.blocks:
        for name, row in rows.items():
            if name.startswith(b.name + "."):
                assert row.target_ratio == b.tap_ratio


def test_history_replays_through_save_and_load(pruned, tmp_path):
    model, p, _, _ = pruned
    path = tmp_path / "lat.pt"
    save(model, path, history=p.pruning_history(), input_shape=tuple(X.shape),
         arch={"source": "timm", "name": "mobilenetv2_050", "kwargs": {"num_classes": 10}})
    back = load(path).eval()
    torch.testing.assert_close(back(X), model(X))


def test_unit_kept_widths():
    u = Unit("x", width=100, order=list(range(100)), block=0, floor=30)
    assert u.kept(0.0, 8) == 100
    assert u.kept(0.25, 8) == 72          # 75 rounded to a multiple of 8
    assert u.kept(0.75, 8) == 30          # 25 -> 24, but the cap keeps 30
    assert Unit("y", 6, list(range(6)), None).kept(0.5, 8) == 6   # narrower than one vector: kept whole


@pytest.mark.parametrize("kwargs, match", [
    ({"latency_budget": 1.5}, "latency_budget"),
    ({"latency_budget": 0.0}, "latency_budget"),
    ({"latency_budget": True}, "latency_budget"),
    ({"latency_budget": 0.7, "target": "tpu"}, "target must be one of"),
    ({"latency_budget": 0.7, "global_pruning": True}, "global_pruning"),
    ({"latency_budget": 0.7, "latency_config": {"rounds": 2}}, "latency_config"),
])
def test_bad_arguments_leave_the_model_untouched(kwargs, match):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        DEPruner(model, X, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_latency_config_validates():
    with pytest.raises(ValueError, match="hidden_levels"):
        LatencyConfig(hidden_levels=(0.25, 0.5))
    with pytest.raises(ValueError, match="stream_levels"):
        LatencyConfig(stream_levels=(0.0, 1.0))


def test_budget_out_of_reach_says_how_far_it_can_go():
    model = _model()
    p = DEPruner(model, X, latency_budget=0.05, target=MacsTarget(),
                 latency_config=LatencyConfig(hidden_levels=(0.0, 0.75), stream_levels=(0.0,)),
                 ignored_layers=[model.get_classifier()])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"latency_budget=0.05 is below .* fastest configuration .* takes \d+%"):
        p.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["openvino", "onnxruntime", "torch"])
def test_cpu_target_runners_compute_the_module(name):
    """What a CPU target times is the module itself on the runtime (same output), not something cheaper."""
    import numpy as np

    target = get_target(name)
    block = _model().blocks[3]
    x = torch.randn(1, block[0].conv_pw.in_channels, 8, 8)
    out = target.runner(block, (x,))()
    got = out[0] if isinstance(out, list) else out
    np.testing.assert_allclose(np.asarray(got), block(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    assert target.alignment in (8, 16) and "skips pruned DW taps" in target.taps_reason


def test_cuda_target_models_without_a_gpu():
    from deprune_plugin.accel.targets import CudaTarget, modelled_seconds

    t = CudaTarget(measure=False)
    assert t.modelled and t.arch.name == "sm_90"
    model = _model()
    x = torch.randn(8, 3, 64, 64)
    dense = t.seconds(model, (x,))
    # a fused DW -> 1x1 pair never writes the DW output: pruning taps of a 3x3 DW conv moves no fewer bytes
    from deprune_plugin.core.masks import attach_tap_mask
    from deprune_plugin.core.method import bwt_keep_mask
    pruned = copy.deepcopy(model)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1:
            attach_tap_mask(m, bwt_keep_mask(m.weight.detach().abs(), 0.78, 32))
    assert t.seconds(pruned, (x,)) == pytest.approx(dense, rel=0.02)
    # a compute-bound case gains: a fused 7x7 DW -> 1x1 pair (ConvNeXt-like), whose DW output stays on chip
    pair = nn.Sequential(nn.Conv2d(256, 256, 7, padding=3, groups=256, bias=False), nn.Conv2d(256, 256, 1))
    y = torch.randn(32, 256, 28, 28)
    full = modelled_seconds(pair, (y,), "sm_90", 2)
    attach_tap_mask(pair[0], bwt_keep_mask(pair[0].weight.detach().abs(), 0.78, 32))
    assert modelled_seconds(pair, (y,), "sm_90", 2) < 0.9 * full
    with pytest.raises(ValueError, match="arch"):
        CudaTarget(arch="sm_75")


def test_budget_correction_scales_the_predicted_saving():
    from deprune_plugin.tp_glue.latency_search import _corrected_budget

    # dense 10 ms, asked 9 ms: the table predicted 9 (a 1 ms saving), the whole model measured 9.6 (0.4 ms):
    # ask the table for 1 ms * 1 / 0.4 = 2.5 ms of saving, i.e. 7.5 ms
    assert _corrected_budget(10.0, 9.0, 9.0, 9.6, 9.0) == pytest.approx(7.5)
    # overshoot the other way: predicted 8 (2 ms), measured 7 (3 ms), wanted 1 ms -> ask for 2/3 ms, 9.33 ms
    assert _corrected_budget(10.0, 9.0, 8.0, 7.0, 8.5) == pytest.approx(10 - 2 / 3)
    # nothing saved: the ratio of totals
    assert _corrected_budget(10.0, 9.0, 9.0, 10.5, 9.0) == pytest.approx(9.0 * 9.0 / 10.5)


def test_cuda_target_runs_the_same_allocator_on_the_model_without_a_gpu(monkeypatch):
    """``target="cuda"`` on a machine without a GPU: the allocator runs on the roofline model and says so;
    the pruned model's modelled time meets the budget and taps are weighed per block, not ruled out."""
    from deprune_plugin.accel.targets import CudaTarget, modelled_seconds

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _model()
    x = torch.randn(32, 3, 128, 128)  # smaller inputs are launch-bound on the model: pruning saves ~nothing
    dense = modelled_seconds(model, (x,), "sm_90", 2)
    p = DEPruner(model, x, latency_budget=0.9, target="cuda", latency_config=CONFIG,
                 sensitivity_inputs=torch.randn(4, 3, 64, 64), ignored_layers=[model.get_classifier()])
    assert isinstance(p.target, CudaTarget) and p.target.modelled
    p.step()
    rep = p.summary().latency
    assert rep.modelled and rep.target == "cuda" and rep.taps_reason == ""
    assert rep.dense_s == pytest.approx(dense, rel=1e-9)
    after = modelled_seconds(model, (x,), "sm_90", 2)
    assert rep.measured_s == pytest.approx(after, rel=1e-9)
    assert after <= 0.9 * dense * (1 + CONFIG.tolerance)
    assert "cuda (modelled)" in str(p.summary())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_target_measures_accelerated_kernels_on_a_gpu():
    """With a GPU and CuPy the CUDA target times ``accelerate()`` of each block on the device (measured, not
    modelled), and the search's whole-model figure is a measurement of the pruned model."""
    from deprune_plugin.accel.targets import CudaTarget, runtime_cupy

    if not runtime_cupy():
        pytest.skip("needs CuPy")
    t = CudaTarget()
    assert t.measure and not t.modelled
    model = _model()
    x = torch.randn(8, 3, 64, 64)
    p = DEPruner(model, x, latency_budget=0.8, target=t, latency_config=CONFIG,
                 ignored_layers=[model.get_classifier()])
    p.step()
    rep = p.summary().latency
    assert not rep.modelled and "cuda (measured)" in str(p.summary())
    assert 0 < rep.measured_s < rep.dense_s * 1.05


def test_alternatives_are_other_configurations_at_the_same_budget():
    """``LatencyConfig(alternatives=k)``: k random configurations the table predicts within the budget, each
    with its own proxy loss and a plan that, applied, has exactly the predicted latency (additive target)."""
    model = _model()
    target = MacsTarget()
    dense = target.seconds(model, (X,))
    cfg = LatencyConfig(hidden_levels=CONFIG.hidden_levels, stream_levels=CONFIG.stream_levels, alternatives=3)
    work = copy.deepcopy(model)
    p = DEPruner(work, X, latency_budget=0.6, target=target, latency_config=cfg,
                 ignored_layers=[work.get_classifier()])
    p.step()
    rep = p.latency_report
    assert len(rep.alternatives) == 3
    plans = {tuple((n, tuple(i)) for n, i in a.plan) for a in rep.alternatives}
    assert len(plans) == 3                                    # random, so different from each other
    for alt in rep.alternatives:
        assert alt.predicted_s <= 0.6 * dense * (1 + 1e-9)
        work = prune_copy(model, (X,), dict(alt.plan), alt.taps, 32)
        assert target.seconds(work, (X,)) == pytest.approx(alt.predicted_s, rel=1e-6)
        assert alt.proxy_loss > 0
    with pytest.raises(ValueError, match="alternatives"):
        LatencyConfig(alternatives=-1)


def test_in_context_factor_by_hand():
    from deprune_plugin.tp_glue.latency_search import _in_context

    # blocks alone save 1.0 s (2 -> 1), the whole model 0.6 s (3 -> 2.4): 60% of a block's saving shows
    assert _in_context([1.0, 1.0], [0.5, 0.5], 3.0, 2.4) == pytest.approx(0.6)
    assert _in_context([1.0, 1.0], [0.99, 1.0], 3.0, 2.0) == 1.0     # 0.5% saved: too little to measure a ratio
    assert _in_context([1.0, 1.0], [0.5, 0.5], 3.0, -5.0) == 2.0     # clamped
    assert _in_context([1.0, 1.0], [0.5, 0.5], 3.0, 3.1) == 0.25


class AloneCostsDoubleTarget(MacsTarget):
    """A block timed alone costs twice its MACs (as if it paid its own layout conversions); the whole model
    costs its MACs. Summing blocks' savings timed alone would predict twice the real saving."""

    name = "alone-x2"

    def seconds(self, module, inputs):
        t = super().seconds(module, inputs)
        return t if isinstance(module, timm.models.efficientnet.EfficientNet) else 2 * t


def test_the_table_scales_block_savings_to_what_the_whole_model_shows():
    target = AloneCostsDoubleTarget()
    model, p, dense = _prune_at(target)
    rep = p.latency_report
    assert rep.rounds == 1                                    # on budget at once: no correction round needed
    assert rep.measured_s == pytest.approx(target.seconds(model, (X,)), rel=1e-9)
    assert rep.predicted_s == pytest.approx(rep.measured_s, rel=1e-6)  # exact for a mixed configuration too
    assert 0.6 * dense * (1 - 2 * CONFIG.tolerance) <= rep.measured_s <= 0.6 * dense * (1 + CONFIG.tolerance)
    assert len({b.predicted_s for b in rep.blocks if b.hidden and b.hidden[0] != b.hidden[1]}) > 1
