"""Models that pruning and BN recalibration make numerically fragile (BN channels with variance 0) deploy:
the self-checks tell fp32 rounding from a wrong result, constant channels are folded into BN biases, and a
wrong layer is still caught."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from deprune_plugin import DEPruner, accelerate, export, recalibrate_bn
from deprune_plugin.accel import FastDWConv
from deprune_plugin.accel import runtimes as rt_mod
from deprune_plugin.accel.selfcheck import SLACK_FACTOR, check_inputs, outputs_agree
from deprune_plugin.core.constant_channels import constant_channels, fold_constant_channels_
from deprune_plugin.core.zoo import build_model


def _bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _fragile_pruned(fold: bool) -> nn.Module:
    """mobilenetv2_050 pruned DEPrune-BH 78/50 at 32x32 (|w| taps: many late DW channels keep only taps that
    read padding), then BN recalibration on random batches, as `deprune prune` does on digits. With these
    seeds a fixed fp32 tolerance rejected every edit of ``accelerate()`` (error 2% of the output scale on
    the second check input: rounding amplified by BN's ``1/sqrt(eps)``)."""
    torch.manual_seed(3)
    m = build_model("timm", "mobilenetv2_050", num_classes=10)
    DEPruner(m, torch.randn(1, 3, 32, 32), dw_pruning_ratio=0.78, pw_pruning_ratio=0.5,
             ignored_layers=[m.get_classifier()]).step()
    g = torch.Generator().manual_seed(1)
    recalibrate_bn(m, [torch.randn(16, 3, 32, 32, generator=g) for _ in range(4)], fold_constant=fold)
    return m.eval()


def _example() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def unfolded() -> nn.Module:
    return _fragile_pruned(fold=False)


@pytest.fixture(scope="module")
def folded() -> nn.Module:
    return _fragile_pruned(fold=True)


def _zero_var_live(model: nn.Module) -> int:
    return sum(int(((bn.running_var == 0) & (bn.weight != 0)).sum()) for bn in _bns(model))


def test_recalibration_leaves_no_zero_variance_channel_in_front_of_a_live_output(unfolded, folded):
    assert _zero_var_live(unfolded) > 100  # the fragile model exists (hundreds of dead DW channels)
    assert _zero_var_live(folded) == 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # same function at the resolution the statistics came from
        torch.testing.assert_close(folded(x), unfolded(x), rtol=1e-4, atol=1e-4 * float(unfolded(x).abs().max()))


def test_folding_a_constant_channel_is_exact_by_hand():
    conv, bn = nn.Conv2d(2, 2, 3, padding=1, groups=2), nn.BatchNorm2d(2)
    with torch.no_grad():
        conv.weight[1].zero_()
        conv.bias.copy_(torch.tensor([0.0, 0.5]))
        bn.weight.copy_(torch.tensor([2.0, 3.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2]))
    net = nn.Sequential(conv, bn)
    recalibrate_bn(net, [torch.randn(8, 2, 5, 5), torch.randn(8, 2, 5, 5)], fold_constant=False)
    assert float(bn.running_var[1]) == 0.0 and float(bn.running_mean[1]) == 0.5
    found = constant_channels(net, [torch.randn(8, 2, 7, 7)])
    assert found == {"1": {1: 0.5}}
    live_mean, live_var = bn.running_mean[0].item(), bn.running_var[0].item()
    assert fold_constant_channels_(net, found) == {"1": [1]}
    # channel 1: bias + 3 * (0.5 - 0.5) / sqrt(0 + eps) = -0.2 exactly; weight 0, statistics (0, 1)
    assert bn.bias[1].item() == pytest.approx(-0.2, abs=1e-7) and bn.weight[1].item() == 0.0
    assert (bn.running_mean[1].item(), bn.running_var[1].item()) == (0.0, 1.0)
    assert (bn.running_mean[0].item(), bn.running_var[0].item()) == (live_mean, live_var)  # channel 0 untouched
    with torch.no_grad():
        out = net.eval()(torch.randn(3, 2, 9, 9))
    assert torch.all(out[:, 1] == bn.bias[1])


def test_fold_arguments_are_checked_before_anything_changes():
    net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="out of range"):
        fold_constant_channels_(net, {"1": {0: 1.0, 5: 1.0}})
    with pytest.raises(ValueError, match="not an affine BatchNorm"):
        fold_constant_channels_(net, {"0": {0: 1.0}})
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_the_check_measures_the_source_against_float64_and_reports_it(unfolded):
    inputs, notes = check_inputs(unfolded, (torch.randn(1, 3, 32, 32),))
    assert notes == [] and len(inputs) == 2
    for item in inputs:
        assert item.exact.dtype == torch.float64 and len(item.source_error) == 1
        err = (item.expected.double() - item.exact).abs().max().item()
        assert item.source_error[0] == pytest.approx(err)
    # a result off by 10x the source's own fp32 error plus the dtype tolerance is refused, naming that error
    item = inputs[1]
    scale = item.exact.abs().max().item()
    off = 1e-4 * 2 * scale + SLACK_FACTOR * item.source_error[0] * 1.5
    wrong = item.exact.float() + off
    ok, why = outputs_agree(lambda *a: wrong, [item])
    assert not ok and "the source model itself is" in why and "from its float64 value" in why


@pytest.mark.parametrize("which", ["unfolded", "folded"])
def test_accelerate_keeps_every_edit_and_the_cpu_runtimes_on_a_fragile_model(which, request):
    model = request.getfixturevalue(which)
    installed = [r for r in rt_mod.RUNTIMES if rt_mod.runtime_available(r)[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no edit reverted, no runtime dropped
        fast = accelerate(model, example_inputs=_example())
    rep = fast.deprune_report
    assert rep.left() == {} and len(rep.replaced()) == 17
    assert not any("dropped" in r for r in rep.runtimes.values())
    assert set(installed) <= set(rep.runtimes)


def test_export_of_a_fragile_model_passes_its_check(unfolded, tmp_path):
    if not rt_mod.runtime_available("onnxruntime")[0]:
        pytest.skip("onnxruntime not installed")
    path = export(unfolded, tmp_path / "m.onnx", example_inputs=_example())
    assert path.exists() and path.stat().st_size > 10_000


def test_a_wrong_layer_in_a_fragile_model_is_still_caught(unfolded, monkeypatch):
    real_dense = FastDWConv.dense

    def planted(self, x):  # 1% off in one layer: far above rounding, well below the activations
        y = real_dense(self, x)
        return y * 1.01 if self.label == "blocks.3.0.conv_dw" else y
    monkeypatch.setattr(FastDWConv, "dense", planted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fast = accelerate(unfolded, backend="torch", example_inputs=_example())
    left = fast.deprune_report.left()
    assert list(left) == ["blocks.3.0.conv_dw"] and left["blocks.3.0.conv_dw"].startswith("output mismatch")


def test_the_runtime_choice_allows_the_models_own_rounding(monkeypatch):
    """Per-signature selection compares each runtime with the torch runner: its tolerance grows by 8x the
    torch model's own fp32-vs-float64 error on that input, measured there."""
    from deprune_plugin.accel.runtimes import RuntimeModel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        net[1].running_var.fill_(1e-12)  # fragile: ~300x amplification of the conv's rounding
        net[1].eps = 1e-10
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        err = (ref.double() - copy.deepcopy(net).double()(x.double())).abs().max().item()
    assert err > 1e-6
    rm = RuntimeModel.__new__(RuntimeModel)
    nn.Module.__init__(rm)
    rm.eager = net
    assert rm._rounding_slack(ref, x) == pytest.approx(SLACK_FACTOR * err)
    healthy = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    with torch.no_grad():
        h = healthy(x)
    rm.eager = healthy
    assert rm._rounding_slack(h, x) < 1e-5 * h.abs().max().item()


def test_the_self_check_runs_both_sides_without_tf32_and_restores_the_flags():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return x * 2

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        inputs, _ = check_inputs(Spy(), (torch.randn(1, 3, 8, 8),))
        assert outputs_agree(Spy(), inputs)[0]
        assert seen and all(flags == (False, False) for flags in seen)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
