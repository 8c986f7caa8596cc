"""accelerate() is never silently wrong: each case that returned wrong outputs before is right now (or left
alone with its reason), the result checks itself and reverts what breaks it, and the replacement module
carries everything the kernels need through module moves, copies and state dicts."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deprune_plugin import DEPruner, accelerate
from deprune_plugin.accel import AccelerateConfig, FastDWConv
from deprune_plugin.accel.modules import same_padding
from deprune_plugin.core.zoo import build_model, classifier_of
from deprune_plugin.kernels import emulation_available

NO_TS = AccelerateConfig()  # the torch path: no CPU runtime, no TorchScript


def accel(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw.setdefault("config", NO_TS)
        return accelerate(model, backend="torch", **kw)


def randomize_bn_(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


# ---- TF "SAME" padding ---------------------------------------------------------------------------

def test_same_padding_helper_matches_timm():
    from timm.layers.padding import get_same_padding
    for size in range(1, 40):
        for k, s, d in [(3, 1, 1), (3, 2, 1), (5, 2, 1), (4, 1, 1), (3, 2, 2), (7, 3, 1)]:
            top, bottom = same_padding(size, k, s, d)
            assert top + bottom == get_same_padding(size, k, s, d) and bottom - top in (0, 1)
            assert (size + top + bottom - d * (k - 1) - 1) // s + 1 == -(-size // s)  # output ceil(size/s)


def _same_block(stride: int, kernel: int = 3, channels: int = 8):
    from timm.layers import create_conv2d
    torch.manual_seed(0)
    dw = create_conv2d(channels, channels, kernel, stride=stride, padding="same", depthwise=True)
    return randomize_bn_(nn.Sequential(dw, nn.BatchNorm2d(channels), nn.ReLU6())).eval()


@pytest.mark.parametrize("size", [32, 33, 34, 35])
@pytest.mark.parametrize("stride,kernel", [(2, 3), (2, 5), (1, 4)])
def test_tf_same_padding_dw_conv(size, stride, kernel):
    """Before: FastDWConv used the static padding (0): a stride-2 3x3 on 33x33 gave 16x16 instead of 17x17."""
    m = _same_block(stride, kernel)
    assert type(m[0]).__name__ == "Conv2dSame" or m[0].padding != (0, 0)
    fast = accel(m, example_inputs=torch.randn(1, 8, 32, 32))
    x = torch.randn(2, 8, size, size)
    with torch.no_grad():
        ref, got = m(x), fast(x)
    assert got.shape == ref.shape == (2, 8, -(-size // stride), -(-size // stride))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert fast.deprune_report.replaced() == ["0"]


def test_pytorch_static_same_padding_with_an_even_kernel():
    m = randomize_bn_(nn.Sequential(nn.Conv2d(6, 6, 4, padding="same", groups=6), nn.BatchNorm2d(6))).eval()
    fast = accel(m, example_inputs=torch.randn(1, 6, 9, 9))
    x = torch.randn(1, 6, 11, 10)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-5, atol=1e-5)
    assert isinstance(fast[0], FastDWConv) and fast[0].padding == (1, 2, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tf_mobilenetv3_small_100", "tf_efficientnet_b0"])
def test_tf_models_match_at_several_sizes(name):
    """Whole tf_* models: before, relative errors of 0.27-0.65 with changed argmax, or a crash."""
    m = randomize_bn_(build_model("timm", name, num_classes=10))
    x = torch.randn(2, 3, 65, 65)
    DEPruner(m, x, dw_pruning_ratio=0.6, pw_pruning_ratio=0.3, ignored_layers=[classifier_of(m)]).step()
    m.eval()
    fast = accel(m, example_inputs=x[:1])
    assert not fast.deprune_report.left(), fast.deprune_report.left()
    with torch.no_grad():
        for size in (65, 64, 97):
            xs = torch.randn(2, 3, size, size)
            ref = m(xs)
            torch.testing.assert_close(fast(xs), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# ---- fusion follows the data flow ------------------------------------------------------------------

class TwoReaders(nn.Module):
    """``y = bn(dw(x)); out = pw(relu(y)) + skip(y)``: ``y`` itself is read twice."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=inplace)
        self.pw = nn.Conv2d(8, 8, 1)
        self.skip = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.bn(self.dw(x))
        # with an in-place ReLU, relu_ changes y itself: both readers see relu(y), which fusion may reproduce
        return self.pw(self.act(y)) + self.skip(y)


def test_activation_is_not_fused_when_its_input_has_another_reader():
    """Before: ReLU fused into the DW conv, so `skip` saw relu(y): relative error 0.29, report 'act relu fused'."""
    m = randomize_bn_(TwoReaders()).eval()
    fast = accel(m, example_inputs=torch.randn(1, 8, 12, 12))
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-5, atol=1e-5)
    assert fast.dw.act == "identity" and type(fast.act) is nn.ReLU  # BN folded, ReLU stays a module
    detail = next(e.detail for e in fast.deprune_report.entries if e.name == "dw")
    assert "act identity fused" in detail and "another reader" in detail


def test_inplace_activation_read_by_everyone_is_fused():
    """With ReLU(inplace=True) every reader sees relu(y): fusing it is exact and is done."""
    m = randomize_bn_(TwoReaders(inplace=True)).eval()
    fast = accel(m, example_inputs=torch.randn(1, 8, 12, 12))
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(copy.deepcopy(x)), rtol=1e-5, atol=1e-5)
    assert fast.dw.act == "relu" and type(fast.act) is nn.Identity


def test_bn_is_not_folded_when_the_conv_output_has_another_reader():
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw, self.bn = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.dw(x)
            return self.bn(y) + y
    m = randomize_bn_(Tap()).eval()
    fast = accel(m, example_inputs=torch.randn(1, 4, 8, 8))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-5, atol=1e-5)
    assert isinstance(fast.bn, nn.BatchNorm2d)  # kept
    assert "another reader" in next(e.detail for e in fast.deprune_report.entries if e.name == "dw")


def test_batchnorm_without_running_stats_is_left_with_the_reason():
    """Before: crash ('NoneType' object has no attribute 'double'). Such BN normalises with batch statistics."""
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4, track_running_stats=False),
                      nn.ReLU()).eval()
    fast = accel(m, example_inputs=torch.randn(2, 4, 8, 8))
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-5, atol=1e-5)
    assert isinstance(fast[1], nn.BatchNorm2d) and type(fast[2]) is nn.ReLU
    assert "batch statistics" in next(e.detail for e in fast.deprune_report.entries if e.name == "0")


def test_reflect_padding_dw_is_left_and_a_reflect_pw_conv_is_still_folded():
    """Before, `dw and a or b` also sent non-DW convs with padding_mode != zeros to 'left: not supported'."""
    m = randomize_bn_(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4),
                                    nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),
                                    nn.BatchNorm2d(4))).eval()
    fast = accel(m, example_inputs=torch.randn(1, 4, 8, 8))
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-5, atol=1e-5)
    actions = {e.name: (e.action, e.detail) for e in fast.deprune_report.entries}
    assert actions["0"][0] == "folded" and type(fast[1]) is nn.Identity
    assert actions["2"][0] == "left" and "padding_mode='reflect'" in actions["2"][1]


# ---- the safety net --------------------------------------------------------------------------------

def test_a_layer_that_breaks_the_output_is_reverted_reported_and_warned(monkeypatch):
    m = randomize_bn_(build_model("timm", "mobilenetv3_small_050", num_classes=10)).eval()
    real_dense = FastDWConv.dense

    def planted(self, x):  # a wrong implementation for one layer only
        y = real_dense(self, x)
        return y + 1.0 if self.label == "blocks.2.0.conv_dw" else y
    monkeypatch.setattr(FastDWConv, "dense", planted)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fast = accelerate(m, backend="torch", config=NO_TS)
    ours = [x for x in w if "left unaccelerated" in str(x.message)]
    assert len(ours) == 1 and "blocks.2.0.conv_dw" in str(ours[0].message)
    rep = fast.deprune_report
    assert rep.left()["blocks.2.0.conv_dw"].startswith("output mismatch")
    assert "blocks.2.0.conv_dw" not in rep.replaced() and len(rep.replaced()) > 5
    assert type(fast.blocks[2][0].conv_dw) is nn.Conv2d  # the original module is back
    x = torch.randn(2, 3, 80, 72)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-4, atol=1e-4 * m(x).abs().max().item())


def test_the_report_says_which_checks_ran():
    m = build_model("timm", "mobilenetv3_small_050", num_classes=10).eval()
    rep = accel(m, example_inputs=torch.randn(1, 3, 48, 48)).deprune_report
    assert any("example input 1x3x48x48" in c and "second input 2x3x65x57" in c for c in rep.checks), rep.checks
    assert "check: outputs match" in str(rep)


def test_a_model_that_rejects_other_sizes_is_checked_on_the_example_only():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)

        def forward(self, x):
            assert x.shape[-1] == 16, "fixed size"
            return self.dw(x).flatten(1)
    fast = accel(Fixed().eval(), example_inputs=torch.randn(1, 3, 16, 16))
    assert fast.deprune_report.replaced() == ["dw"]
    assert any("second input" in c and "skipped" in c for c in fast.deprune_report.checks)


# ---- FastDWConv carries its kernels' data ---------------------------------------------------------

def _pruned_small():
    m = build_model("timm", "mobilenetv3_small_050", num_classes=10)
    x = torch.randn(2, 3, 48, 48)
    DEPruner(m, x, dw_pruning_ratio=0.6, pw_pruning_ratio=0.0, ignored_layers=[classifier_of(m)]).step()
    return randomize_bn_(m).eval()


def test_formats_survive_dtype_and_device_moves_bit_exactly():
    fast = accel(_pruned_small())
    layer = next(mod for mod in fast.modules() if isinstance(mod, FastDWConv))
    vals = layer.formats()["taps"].tap_val.clone()
    for moved in (copy.deepcopy(layer).half(), copy.deepcopy(layer).to(torch.float64), copy.deepcopy(layer).bfloat16()):
        assert moved.weight.dtype != torch.float32  # the module did change dtype
        assert torch.equal(moved.formats()["taps"].tap_val, vals)  # ... its kernels' fp32 taps did not round
    meta = copy.deepcopy(layer).to("meta")
    assert all(b.device.type == "meta" for n, b in meta.named_buffers() if n.startswith(("taps_", "dr_")))
    y = meta(torch.empty(2, layer.groups, 12, 12, device="meta"))
    assert y.shape == layer(torch.randn(2, layer.groups, 12, 12)).shape


def test_state_dict_of_an_accelerated_model_round_trips():
    m = _pruned_small()
    a, b = accel(m), accel(copy.deepcopy(m))
    with torch.no_grad():
        for mod in b.modules():
            if isinstance(mod, FastDWConv):
                mod.weight.zero_()
                mod.taps_tap_val.zero_()
    sd = a.state_dict()
    assert any(k.endswith("taps_tap_val") for k in sd) and any(k.endswith("dr_col_val") for k in sd)
    b.load_state_dict(sd)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    la, lb = (next(mod for mod in f.modules() if isinstance(mod, FastDWConv)) for f in (a, b))
    assert torch.equal(la.formats()["taps"].tap_val, lb.formats()["taps"].tap_val)


def test_input_that_requires_grad_takes_the_dense_path_and_gradients_flow():
    layer = FastDWConv(torch.randn(8, 1, 3, 3), torch.zeros(8), torch.ones(8, 1, 3, 3, dtype=torch.bool), (1, 1),
                       (1, 1, 1, 1), (1, 1), "relu", backend="emu")
    calls = []
    layer.run_kernel = lambda name, x: calls.append(name)  # would return None: never reached with grad
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    ref = x.detach().clone().requires_grad_()
    F.relu(F.conv2d(ref, layer.weight, layer.bias, 1, 1, 1, 8)).sum().backward()
    assert calls == [] and torch.allclose(x.grad, ref.grad)


emu_ok, emu_why = emulation_available()


@pytest.mark.skipif(not emu_ok, reason=emu_why)
def test_kernel_backend_checks_choices_and_reports_them_per_layer():
    """The kernel path (host emulation on CPU) selects per layer, checked against dense, and the choices are
    kept through deepcopy and the state dict (no re-timing for a known signature)."""
    m = _pruned_small()
    fast = accel(m)
    layers = [mod for mod in fast.modules() if isinstance(mod, FastDWConv)][:2]
    for mod in layers:
        mod.backend = "emu"
        mod.dispatcher().reps, mod.dispatcher().warmup = 1, 0
    x = torch.randn(1, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-4, atol=1e-4 * m(x).abs().max().item())
    from deprune_plugin.accel.api import kernel_choices
    table = kernel_choices(fast)
    assert len(table) == 2 and all(set(v["timings"]) == {"dense", "direct", "dr"} and not v["dropped"]
                                   for v in table.values()), table
    clone = copy.deepcopy(layers[0])
    assert clone.choices == layers[0].choices and len(clone.choices) == 1
    fresh = copy.deepcopy(layers[0])
    fresh.choices = {}
    fresh.load_state_dict(layers[0].state_dict())
    assert fresh.choices == layers[0].choices
    assert fresh.dispatcher().cache.keys() == layers[0].dispatcher().cache.keys()  # restored, not re-timed


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"config": {"channels_last": False}}, TypeError, "config must be an AccelerateConfig"),
    ({"filter_fn": "blocks"}, TypeError, "filter_fn"),
    ({"example_inputs": "image"}, TypeError, "example_inputs"),
    ({"example_inputs": ()}, TypeError, "example_inputs"),
    ({"backend": "tpu"}, ValueError, "backend"),
])
def test_bad_arguments_are_clear_errors_before_anything_is_built(kwargs, exc, match):
    """Before: a dict config gave AttributeError: 'dict' object has no attribute 'fold_batchnorm'."""
    m = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3)).eval()
    with pytest.raises(exc, match=match):
        accelerate(m, **kwargs)
