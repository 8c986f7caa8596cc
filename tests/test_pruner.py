"""DEPruner inside torch-pruning: API, PW-conv2 rule, variants, bad input, summary."""
from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp

from deprune_plugin import DEPruneImportance, DEPruner
from deprune_plugin.core.masks import is_depthwise, tap_mask
from deprune_plugin.core.method import kept_per_range

X = torch.randn(2, 3, 64, 64)


def mbv2(**kw):
    return timm.create_model("mobilenetv2_100", pretrained=False, **kw)


def test_registered_in_torch_pruning():
    assert tp.pruner.DEPruner is DEPruner and issubclass(DEPruner, tp.pruner.BasePruner)
    assert tp.importance.DEPruneImportance is DEPruneImportance
    assert isinstance(DEPruneImportance(), tp.importance.Importance)


def test_mobilenetv2_pw_conv2_only_rule():
    m = mbv2()
    before = {n: (mod.in_channels, mod.out_channels) for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}
    p = DEPruner(m, X, dw_pruning_ratio=0.78, pw_pruning_ratio=0.5, variant="B", ignored_layers=[m.get_classifier()])
    p.step()
    after = {n: (mod.in_channels, mod.out_channels) for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}
    for n in before:
        if n.endswith("conv_dw"):
            assert after[n] == before[n]  # no DW channel removed
        if n.endswith("conv_pw") and n != "blocks.0.0.conv_pw":  # blocks.0.0 is DW -> PW (its conv_pw projects)
            assert after[n][1] == before[n][1]  # PW-conv1 outputs (hidden width) kept
    # stream widths halve: blocks.1 stream 24 -> 12, stem 32 untouched (coupled to the first DW conv)
    assert after["blocks.1.0.conv_pwl"][1] == 12 and after["blocks.1.1.conv_pw"][0] == 12
    assert after["conv_stem"][1] == 32
    assert after["conv_head"][1] == before["conv_head"][1]  # head conv not pruned by default
    assert m.get_classifier().in_features == 1280
    assert m(X).shape == (2, 1000)
    # every DW layer: BWT at 78% -> K' = 64 per full range
    for mod in m.modules():
        if is_depthwise(mod):
            assert set(kept_per_range(tap_mask(mod), 32)[: mod.out_channels // 32]) == {64}


def test_efficientnet_se_bottleneck_and_hidden_widths_untouched():
    m = timm.create_model("efficientnet_b0", pretrained=False)
    se_before = m.blocks[2][0].se.conv_reduce.out_channels
    p = DEPruner(m, X, pw_pruning_ratio=0.5, ignored_layers=[m.get_classifier()])
    p.step()
    assert m.blocks[2][0].se.conv_reduce.out_channels == se_before
    assert m.blocks[2][0].conv_pw.out_channels == 144 and m.blocks[2][0].conv_dw.out_channels == 144
    assert m.blocks[2][0].conv_pwl.out_channels < 40
    assert m(X).shape == (2, 1000)


def test_convnext_targets_mlp_hidden_width_not_the_stream():
    m = timm.create_model("convnext_atto", pretrained=False)
    blk = m.stages[0].blocks[0]
    stream = blk.conv_dw.out_channels
    DEPruner(m, X, pw_pruning_ratio=0.5, variant="B", ignored_layers=[m.get_classifier()]).step()
    width = lambda layer: getattr(layer, "out_features", getattr(layer, "out_channels", None))  # noqa: E731
    assert blk.conv_dw.out_channels == stream and width(blk.mlp.fc2) == stream
    assert width(blk.mlp.fc1) == 4 * stream // 2
    assert m(X).shape == (2, 1000)
    m = timm.create_model("convnext_atto", pretrained=False)  # BH: remaining hidden width tile-aligned
    DEPruner(m, X, pw_pruning_ratio=0.5, variant="BH", ignored_layers=[m.get_classifier()]).step()
    assert all(width(b.mlp.fc1) % 32 == 0 for s in m.stages for b in s.blocks)


def test_variant_bh_aligns_every_layer_and_reports_pattern():
    m = mbv2()
    p = DEPruner(m, X, dw_pruning_ratio=0.70, pw_pruning_ratio=0.0, variant="BH", ignored_layers=[m.get_classifier()])
    p.step()
    s = p.summary()
    # 70%: K' = 87 everywhere, 17 unaligned layers -> 9u8o (the paper's MobileNetV2 pattern)
    assert s.dw_hsr_pattern == "9u8o"
    for r in s:
        full = r.kept_per_range[: r.channels // 32]
        assert set(full) == ({64} if r.hsr == "o" else {96})


def test_global_pruning_gives_per_layer_targets_with_the_model_wide_ratio():
    m = mbv2()
    with torch.no_grad():  # give layers different scales so the global threshold differs per layer
        for i, mod in enumerate(mod for mod in m.modules() if is_depthwise(mod)):
            mod.weight.mul_(1 + (i % 3))
            mod.weight[: mod.out_channels // 2].mul_(0.2)
    p = DEPruner(m, X, dw_pruning_ratio=0.78, pw_pruning_ratio=0.0, variant="B", global_pruning=True,
                 ignored_layers=[m.get_classifier()])
    p.step()
    s = p.summary()
    targets = [r.target_ratio for r in s]
    assert len(set(round(t, 4) for t in targets)) > 3
    taps = sum(r.channels * 9 for r in s)
    assert sum(t * r.channels * 9 for t, r in zip(targets, s)) / taps == pytest.approx(0.78, abs=2e-3)


def test_iterative_steps_follow_the_linear_schedule_and_masks_grow():
    m = mbv2()
    p = DEPruner(m, X, dw_pruning_ratio=0.6, pw_pruning_ratio=0.5, variant="B", iterative_steps=3,
                 ignored_layers=[m.get_classifier()])
    dw = m.blocks[3][0].conv_dw
    masks = []
    for _ in range(3):
        p.step()
        masks.append(tap_mask(dw).clone())
    assert [kept_per_range(k, 32)[0] for k in masks] == [288 - 57, 288 - 115, 288 - 172]  # floor(0.2/0.4/0.6*288)
    assert not (masks[1] & ~masks[0]).any() and not (masks[2] & ~masks[1]).any()
    assert m.blocks[1][0].conv_pwl.out_channels == 24 - 12


def test_interactive_step_yields_groups_and_prunes_taps_at_the_end():
    m = mbv2()
    p = DEPruner(m, X, dw_pruning_ratio=0.5, pw_pruning_ratio=0.5, ignored_layers=[m.get_classifier()])
    n = 0
    for group in p.step(interactive=True):
        assert any(isinstance(dep.target.module, nn.Conv2d) for dep, _ in group)
        group.prune()
        n += 1
    assert n == 7  # the seven residual streams of MobileNetV2
    assert tap_mask(m.blocks[1][0].conv_dw) is not None
    assert len(p.pruning_history()) == n


def test_prune_dw_channels_option_slices_masks():
    m = mbv2()
    p = DEPruner(m, X, dw_pruning_ratio=0.5, pw_pruning_ratio=0.25, prune_dw_channels=True, iterative_steps=2,
                 variant="B", ignored_layers=[m.get_classifier()])
    p.step()
    p.step()
    dw = m.blocks[2][0].conv_dw
    assert dw.out_channels < 144 and tap_mask(dw).shape == dw.weight.shape
    assert (dw.weight[~tap_mask(dw)] == 0).all()
    assert m(X).shape == (2, 1000)


def test_importance_counts_depthwise_convs():
    m = mbv2()
    DG = tp.DependencyGraph().build_dependency(m, example_inputs=(X,))
    dw = m.blocks[2][0].conv_dw
    g = DG.get_pruning_group(dw, tp.prune_depthwise_conv_out_channels, list(range(dw.out_channels)))
    imp = DEPruneImportance()
    base = imp(g).clone()
    with torch.no_grad():
        dw.weight[5].mul_(1000)
    assert imp(g)[5] > base[5] * 1.5  # torch-pruning's GroupMagnitudeImportance would not move
    gm = tp.importance.GroupMagnitudeImportance(p=2)
    before = gm(g)[5]
    with torch.no_grad():
        dw.weight[5].mul_(1000)
    assert gm(g)[5] == pytest.approx(before)


def test_pw_importance_is_l2_filter_norm_of_the_projections():
    conv = nn.Conv2d(4, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, 4.0, 0.0, 0.0]).repeat(3, 1).reshape(3, 4, 1, 1) *
                          torch.tensor([1.0, 2.0, 0.5]).reshape(3, 1, 1, 1))
    model = nn.Sequential(conv, nn.Conv2d(3, 2, 1))
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=(torch.randn(1, 4, 2, 2),))
    g = DG.get_pruning_group(conv, tp.prune_conv_out_channels, [0, 1, 2])
    norms = torch.tensor([5.0, 10.0, 2.5])
    torch.testing.assert_close(DEPruneImportance()(g), norms / norms.mean())


@pytest.mark.parametrize("kwargs,match", [
    ({"dw_pruning_ratio": 1.0}, "dw_pruning_ratio"),
    ({"dw_pruning_ratio": -0.1}, "dw_pruning_ratio"),
    ({"pw_pruning_ratio": 1.5}, "pw_pruning_ratio"),
    ({"tile_size": 0}, "tile_size"),
    ({"group_size": -32}, "group_size"),
    ({"variant": "X"}, "variant"),
    ({"dw_pruning_ratio_dict": {nn.Conv2d(3, 3, 3): 0.5}}, "dw_pruning_ratio_dict"),
    ({"pruning_ratio_dict": {nn.Linear(2, 2): 0.5}}, "pruning_ratio_dict"),
    ({"hsr_alpha": "guess"}, "hsr_alpha"),
])
def test_bad_arguments_raise_before_the_model_is_touched(kwargs, match):
    m = mbv2()
    ref = copy.deepcopy(m.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        DEPruner(m, X, **kwargs)
    assert all(torch.equal(ref[k], v) for k, v in m.state_dict().items()) and m.training


def test_example_inputs_that_do_not_fit():
    m = mbv2()
    with pytest.raises(ValueError, match="example_inputs"):
        DEPruner(m, torch.randn(2, 5, 64, 64))
    with pytest.raises(TypeError, match="example_inputs"):
        DEPruner(m, "image")
    assert m.training and m.conv_stem.in_channels == 3


def test_model_without_depthwise_conv_is_a_clear_error():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with pytest.raises(ValueError, match="no depth-wise conv"):
        DEPruner(m, torch.randn(2, 3, 8, 8))


def test_dw_ratio_dict_overrides_per_block():
    m = mbv2()
    p = DEPruner(m, X, dw_pruning_ratio=0.5, pw_pruning_ratio=0.0, variant="B",
                 dw_pruning_ratio_dict={m.blocks[4]: 0.25}, ignored_layers=[m.get_classifier()])
    p.step()
    assert kept_per_range(tap_mask(m.blocks[4][1].conv_dw), 32)[0] == 288 - 72
    assert kept_per_range(tap_mask(m.blocks[3][1].conv_dw), 32)[0] == 288 - 144


def test_summary_rows_and_sparse_macs():
    m = mbv2()
    p = DEPruner(m, X, dw_pruning_ratio=0.78, pw_pruning_ratio=0.5, variant="B", ignored_layers=[m.get_classifier()])
    p.step()
    s = p.summary()
    assert len(s) == 17
    r = s[1]
    assert (r.name, r.kernel, r.channels, r.kept_per_range) == ("blocks.1.0.conv_dw", (3, 3), 96, [64, 64, 64])
    assert (r.pw_before, r.pw_after) == (24, 12) and r.real_ratio == pytest.approx(224 / 288)
    # MACs of one DW layer count kept taps only: blocks.1.0 at 64x64 input -> 16x16 output (stem and this
    # conv have stride 2); BWT keeps 64 of 288 taps in each of its 3 ranges of 32 channels: 192 kept taps
    from deprune_plugin.core.cost import count_cost, layer_macs
    per_layer = layer_macs(m, (X,))
    assert per_layer["blocks.1.0.conv_dw"] == 16 * 16 * 192
    assert per_layer["blocks.1.0.conv_pwl"] == 16 * 16 * 96 * 12  # 1x1, 96 -> 12 filters after PW pruning
    assert s.after.macs == sum(per_layer.values())
    dense = count_cost(mbv2(), (X,)).macs
    assert s.before.macs == dense and layer_macs(mbv2(), (X,))["blocks.1.0.conv_dw"] == 16 * 16 * 96 * 9
    pruned_taps = sum(r.channels * 9 - sum(r.kept_per_range) for r in s)
    assert s.before.params - s.after.params > pruned_taps
    text = str(s)
    assert "blocks.1.0.conv_dw" in text and "77.78%" in text and "24 -> 12" in text


def test_step_benchmark_attribute_is_recorded():
    m = timm.create_model("mobilenetv3_small_050", pretrained=False)
    p = DEPruner(m, X, ignored_layers=[m.get_classifier()])
    p.step()
    assert p.last_step_seconds is not None and p.last_step_seconds > 0


# ---------------------------------------------------------------- API edges
def tiny():
    """Two DSConv blocks on a residual-free stream, small enough for many constructions."""
    return nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1),
                         nn.Conv2d(32, 32, 3, padding=1, groups=32),
                         nn.Conv2d(32, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


XT = torch.randn(2, 3, 6, 6)


def test_ignored_layers_accept_module_names():
    m = mbv2()
    p = DEPruner(m, X, dw_pruning_ratio=0.5, pw_pruning_ratio=0.5, variant="B",
                 ignored_layers=["blocks.3", m.get_classifier()])
    p.step()
    assert tap_mask(m.blocks[3][0].conv_dw) is None and tap_mask(m.blocks[3][1].conv_dw) is None
    assert tap_mask(m.blocks[2][0].conv_dw) is not None
    assert m.blocks[3][0].conv_pwl.out_channels == 64  # the blocks.3 stream (a PW-conv2 group) is left alone
    assert m.blocks[2][0].conv_pwl.out_channels == 16


@pytest.mark.parametrize("ignored,error,match", [
    (["blocks.99"], ValueError, "blocks.99"),
    ([nn.Conv2d], TypeError, "class Conv2d"),
    ([3.5], TypeError, "ignored_layers"),
    ("blocks.3", TypeError, "ignored_layers"),
])
def test_bad_ignored_layers_are_clear_errors(ignored, error, match):
    m = tiny()
    with pytest.raises(error, match=match):
        DEPruner(m, XT, ignored_layers=ignored)
    assert not any(tap_mask(c) is not None for c in m.modules())


def test_numpy_ratios_are_accepted_and_plain_floats_reach_torch_pruning():
    np = pytest.importorskip("numpy")
    m = tiny()
    p = DEPruner(m, XT, dw_pruning_ratio=np.float32(0.5), pw_pruning_ratio=np.float64(0.5), variant="plain",
                 max_pruning_ratio=np.float32(0.9), pruning_ratio_dict={m[8]: np.float32(0.25)}, ignored_layers=[m[11]])
    assert type(p.dw_pruning_ratio) is float and type(p.pruning_ratio) is float
    assert type(p.max_pruning_ratio) is float
    assert all(type(r) is float for rs in p.pruning_ratio_dict.values() for r in rs)
    p.step()
    assert int((~tap_mask(m[3])).sum()) == 72 and m[8].out_channels == 6  # 16*9/2 taps; 8 -> 6 channels


@pytest.mark.parametrize("kwargs,error,match", [
    ({"dw_pruning_ratio": True}, ValueError, "dw_pruning_ratio"),
    ({"pw_pruning_ratio": "0.5"}, ValueError, "pw_pruning_ratio"),
    ({"max_pruning_ratio": True}, ValueError, "max_pruning_ratio"),
    ({"global_pruning": "yes"}, TypeError, "global_pruning"),
    ({"prune_dw_channels": 1}, TypeError, "prune_dw_channels"),
    ({"importance": DEPruneImportance}, TypeError, r"importance=DEPruneImportance\(\)"),
    ({"importance": tp.importance.GroupMagnitudeImportance}, TypeError, "instance"),
    ({"no_such_option": 1}, TypeError, "no_such_option"),
])
def test_more_bad_arguments_raise_before_anything_changes(kwargs, error, match):
    m = tiny()
    ref = copy.deepcopy(m.state_dict())
    with pytest.raises(error, match=match):
        DEPruner(m, XT, **kwargs)
    assert m.state_dict().keys() == ref.keys() and all(torch.equal(ref[k], v) for k, v in m.state_dict().items())


def test_a_model_on_meta_is_a_clear_error():
    m = tiny().to("meta")
    with pytest.raises(ValueError, match=r"model has \d+ tensor\(s\) on the 'meta' device"):
        DEPruner(m, XT)
    with pytest.raises(ValueError, match="example_inputs are on the 'meta' device"):
        DEPruner(tiny(), XT.to("meta"))


def test_leaving_an_interactive_step_early_warns():
    m = mbv2()
    p = DEPruner(m, X, dw_pruning_ratio=0.5, pw_pruning_ratio=0.5, ignored_layers=[m.get_classifier()])
    with pytest.warns(UserWarning, match="no DW taps were pruned in step 1"):
        for group in p.step(interactive=True):
            group.prune()
            break
    assert tap_mask(m.blocks[1][0].conv_dw) is None and p.current_step == 1


def test_a_second_pruner_reads_dw_ratio_as_a_layer_total_and_pw_ratio_as_compounding():
    m = tiny()
    DEPruner(m, XT, dw_pruning_ratio=0.5, pw_pruning_ratio=0.5, variant="plain", ignored_layers=[m[11]]).step()
    assert int((~tap_mask(m[3])).sum()) == 72 and m[8].out_channels == 4
    with pytest.warns(UserWarning, match="already carry tap masks"):
        p = DEPruner(m, XT, dw_pruning_ratio=0.75, pw_pruning_ratio=0.5, variant="plain", ignored_layers=[m[11]])
    p.step()
    assert int((~tap_mask(m[3])).sum()) == 108  # 75% of the layer's 144 taps in total, not 50% + 75% of the rest
    assert m[8].out_channels == 2  # 50% of the 4 channels left: compounds, as in torch-pruning


def test_global_pruning_warns_when_max_pruning_ratio_caps_the_request():
    m = mbv2()
    with pytest.warns(UserWarning, match=r"model-wide DW ratio is 50\.00%, not the requested 78\.00%"):
        DEPruner(m, X, dw_pruning_ratio=0.78, pw_pruning_ratio=0.0, variant="plain", global_pruning=True,
                 max_pruning_ratio=0.5, ignored_layers=[m.get_classifier()]).step()


def test_pw_ratio_zero_builds_no_dependency_graph(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a dependency graph was built")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", refuse)
    m = tiny()
    p = DEPruner(m, XT, dw_pruning_ratio=0.5, pw_pruning_ratio=0.0, variant="B", ignored_layers=[m[11]])
    assert list(p.step(interactive=True)) == []
    assert p.DG is None and p.pruning_history() == []
    assert int((~tap_mask(m[3])).sum()) == 72 and m[8].out_channels == 8
    rows = p.summary().table().splitlines()[2:4]
    assert len(p.summary()) == 2 and all(r.split()[-1] == "-" for r in rows), rows  # no PW-conv2 column


def test_construction_searches_only_dw_and_pw_conv2_groups_and_a_step_only_the_targets(monkeypatch):
    """BasePruner.__init__ enumerates every group of the model (minutes on some models); DEPruner searches
    the DW groups and their PW-conv2 groups only, and a step builds only the groups it prunes."""
    roots = []
    real = tp.DependencyGraph.get_pruning_group

    def spy(self, module, fn, idxs):
        roots.append(module)
        return real(self, module, fn, idxs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", spy)
    m = mbv2()
    p = DEPruner(m, X, dw_pruning_ratio=0.5, pw_pruning_ratio=0.5, variant="B", ignored_layers=[m.get_classifier()])
    pw2 = {id(c) for b in p.structure.blocks for c in b.pw2}
    assert {id(r) for r in roots} <= {id(b.dw) for b in p.structure.blocks} | pw2
    assert not any(r is m.conv_stem or r is m.conv_head or r is m.blocks[2][0].conv_pw for r in roots)
    roots.clear()
    p.step()
    targets = set(p.structure.pw_target_layers)
    assert roots and all(r in targets for r in roots)
    assert len({id(r) for r in roots}) == len(p.structure.pw_group_roots) == 7


# ---------------------------------------------------------------- head convs keep their width
class _StreamBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc1 = nn.Conv2d(16, 64, 1)
        self.fc2 = nn.Conv2d(64, 16, 1)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.dw(x))))


class _StreamNet(nn.Module):
    """Two blocks with the DW conv in the residual stream (ConvNeXt / FastViT style: DW -> 1x1 expand ->
    1x1 back into the stream), then a head conv after the last block and the classifier. ``head="dense"``:
    a 1x1 conv 16 -> 32; ``head="mobileone"``: FastViT's ``final_conv``, a 3x3 conv with two outputs per
    input channel plus its 1x1 ``conv_scale`` branch (``groups == in_channels``)."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.blocks = nn.Sequential(_StreamBlock(), _StreamBlock())
        self.head = head
        if head == "dense":
            self.head_conv = nn.Conv2d(16, 32, 1)
        else:
            self.head_conv = nn.Conv2d(16, 32, 3, padding=1, groups=16)
            self.head_scale = nn.Conv2d(16, 32, 1, groups=16)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        y = self.head_conv(x) if self.head == "dense" else self.head_conv(x) + self.head_scale(x)
        return self.fc(torch.relu(y).mean((2, 3)))


def _zero_tap_ratio(model: nn.Module) -> float:
    """Fraction of zero taps over every DW-shaped conv the model holds now (what the weights say)."""
    convs = [m for m in model.modules() if is_depthwise(m)]
    return sum(int((m.weight == 0).sum()) for m in convs) / sum(m.weight.numel() for m in convs)


@pytest.mark.parametrize("head", ["dense", "mobileone"])
def test_head_conv_after_the_last_block_keeps_its_width(head):
    m = _StreamNet(head)
    x = torch.randn(2, 3, 8, 8)
    p = DEPruner(m, x, dw_pruning_ratio=0.5, pw_pruning_ratio=0.5, variant="B", ignored_layers=[m.fc])
    assert m.head_conv not in p.structure.pw_target_layers
    p.step()
    assert [b.fc1.out_channels for b in m.blocks] == [32, 32]  # the MLP hidden widths are the PW-conv2 targets
    assert m.head_conv.out_channels == 32 and m.fc.in_features == 32
    if head == "mobileone":
        assert m.head_scale.out_channels == 32 and not is_depthwise(m.head_conv)  # never turned into a DW conv
    assert [r.pw_names for r in p.summary()] == [["blocks.0.fc1"], ["blocks.1.fc1"]]
    assert p.summary().dw_ratio == pytest.approx(_zero_tap_ratio(m), abs=1e-9) == pytest.approx(0.5, abs=0.01)
    assert m(x).shape == (2, 4)


@pytest.mark.slow
def test_fastvit_head_conv_is_untouched_and_the_summary_counts_what_the_weights_hold():
    m = timm.create_model("fastvit_t8", pretrained=False, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    p = DEPruner(m, x, dw_pruning_ratio=0.78, pw_pruning_ratio=0.5, ignored_layers=[m.get_classifier()])
    p.step()
    assert m.final_conv.conv_kxk[0].conv.out_channels == 768 and m.final_conv.conv_scale.conv.out_channels == 768
    assert m.get_classifier().in_features == 768
    assert m.stages[3].blocks[1].mlp.fc1.out_channels < 384 * 3  # the MLP hidden widths are pruned
    assert p.summary().dw_ratio == pytest.approx(_zero_tap_ratio(m), abs=1e-9)
    m.eval()
    assert m(x).shape == (1, 10)


# ---------------------------------------------------------------- caps are caps; deviations are reported
def _range_ratios(conv: nn.Module) -> list[float]:
    keep = tap_mask(conv)
    return [1 - int(keep[s:s + 32].sum()) / keep[s:s + 32].numel() for s in range(0, keep.shape[0], 32)]


@pytest.mark.parametrize("global_pruning", [True, False])
def test_hsr_never_passes_max_pruning_ratio(global_pruning):
    m = mbv2()
    p = DEPruner(m, X, dw_pruning_ratio=0.78, pw_pruning_ratio=0.0, variant="BH", global_pruning=global_pruning,
                 max_pruning_ratio=0.5, ignored_layers=[m.get_classifier()])
    with pytest.warns(UserWarning, match=r"model-wide DW ratio is 44\.47%, not the requested 78\.00% .*cap in 17 "
                                         r"layers \(-28\.00 points\); HSR u in 17 layers \(-5\.53 points\)"):
        p.step()
    ratios = [r for mod in m.modules() if is_depthwise(mod) for r in _range_ratios(mod)]
    assert max(ratios) <= 0.5  # before: "o" took K' 144 -> 128 in half the layers, 55.6% under a 50% cap
    s = p.summary()
    assert s.dw_hsr_pattern == "17u0o" and {r.kept_per_range[0] for r in s} == {160}
    assert all(r.note.startswith("cap: max_pruning_ratio=0.5 (asked 78.00%); HSR u: K' 144 -> 160") for r in s)
    assert "DW ratio 44.47% (asked 78.00%: cap in 17 layers" in s.table()


def test_pw_hsr_never_passes_max_pruning_ratio():
    def two_streams():  # two PW-conv2 groups of 80 channels: 50% keeps 40 = 32 + 8 in both
        return nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 80, 1),
                             nn.Conv2d(80, 96, 1), nn.Conv2d(96, 96, 3, padding=1, groups=96), nn.Conv2d(96, 80, 1),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(80, 4))

    m = two_streams()
    DEPruner(m, XT, dw_pruning_ratio=0.0, pw_pruning_ratio=0.5, ignored_layers=[m[8]]).step()
    assert sorted((m[2].out_channels, m[5].out_channels)) == [32, 64]  # HSR on PW: one group down, one up
    m = two_streams()
    DEPruner(m, XT, dw_pruning_ratio=0.0, pw_pruning_ratio=0.5, max_pruning_ratio=0.5, ignored_layers=[m[8]]).step()
    assert (m[2].out_channels, m[5].out_channels) == (64, 64)  # 32 of 80 would prune 60% > 50%: both go up
    assert m(XT).shape == (2, 4)


def test_iterative_bh_steps_land_on_the_schedule():
    m = mbv2()
    p = DEPruner(m, X, dw_pruning_ratio=0.78, pw_pruning_ratio=0.0, variant="BH", iterative_steps=3,
                 ignored_layers=[m.get_classifier()])
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within 1 point of the schedule: nothing to report
        for _ in range(3):
            p.step()
            got.append(_zero_tap_ratio(m))  # what summary().dw_ratio says, without its MAC count
    # HSR "u" adds 21 of 32 columns per range where "o" takes 11: before, the 8 "o" layers were the narrowest
    # (layer order among equal betas) and step 2 ended at 46.57%; now the widest go "o"
    assert got == pytest.approx([0.2573, 0.5195, 0.7778], abs=5e-5)
    assert all(abs(g - t) <= 0.01 for g, t in zip(got, [0.26, 0.52, 0.78]))


def test_a_deviation_is_warned_and_noted_with_its_reason():
    def model():  # one unaligned layer: 1x5 taps, K' = 36 of 160 per range at 78% -> HSR "u" to 64 (60%), alone
        return nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, (1, 5), padding=(0, 2), groups=32),
                             nn.Conv2d(32, 2, 1), nn.Conv2d(2, 2, 3, padding=1, groups=2), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(2, 4))

    m = model()
    p = DEPruner(m, XT, dw_pruning_ratio=0.78, pw_pruning_ratio=0.0, ignored_layers=[m[6]])
    with pytest.warns(UserWarning, match=r"model-wide DW ratio is 61\.80%, not the requested 78\.00% \(step 1 of 1\): "
                                         r"HSR u in 1 layer \(-16\.18 points\); summary\(\) notes each layer"):
        p.step()
    s = p.summary()
    assert [(r.real_ratio, r.asked_ratio, r.note) for r in s] == [
        (pytest.approx(0.6), 0.78, "HSR u: K' 36 -> 64 per range (tile 32)"),
        (pytest.approx(14 / 18), 0.78, "")]  # 2 channels of 3x3: 14 of 18 taps, 77.8%: rounding only
    # 110 of 178 taps pruned; the u layer holds 160 of them: (60% - 78%) * 160 / 178 = -16.18 points
    assert s.deviation == (pytest.approx(0.78), pytest.approx(110 / 178), "HSR u in 1 layer (-16.18 points)")
    lines = s.table().splitlines()
    assert lines[2].endswith("HSR u: K' 36 -> 64 per range (tile 32)") and lines[3].endswith("-")
    footer = lines[lines.index("-" * len(lines[0]), 2) + 1:]
    assert any("DW ratio 61.80% (asked 78.00%: HSR u in 1 layer (-16.18 points))" in line for line in footer)
    m = model()  # a layer too small for its ratio: 18 taps at 55% keep 9 (50%)
    p = DEPruner(m, XT, dw_pruning_ratio=0.78, pw_pruning_ratio=0.0, dw_pruning_ratio_dict={m[3]: 0.55},
                 ignored_layers=[m[6]])
    with pytest.warns(UserWarning, match="HSR u in 1 layer"):
        p.step()
    assert p.summary()[1].note == "too few taps: a range of 18 taps rounds in steps of 5.6%"


@pytest.mark.slow
def test_ghostnetv2_lands_within_a_point_of_the_asked_ratio():
    m = timm.create_model("ghostnetv2_100", pretrained=False, num_classes=10)
    p = DEPruner(m, torch.randn(1, 3, 64, 64), dw_pruning_ratio=0.78, pw_pruning_ratio=0.0,
                 ignored_layers=[m.get_classifier()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.step()
    s = p.summary()
    assert s.dw_ratio == pytest.approx(0.78, abs=0.01) and s.deviation is None  # before: 70.3%, no word
    assert s.dw_hsr_pattern == "16u15o"
