"""accelerate(): same outputs, BN folded, activations fused, report, fallbacks, export."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from deprune_plugin import DEPruner, accelerate
from deprune_plugin.accel import FastDWConv, memory_report
from deprune_plugin.accel.fold import fold_bn
from deprune_plugin.core.masks import tap_mask
from deprune_plugin.core.zoo import build_model, classifier_of
from zoo_models import SMALL_MODELS, ids


def randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def quiet_accelerate(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accelerate(model, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("source,name", SMALL_MODELS, ids=ids(SMALL_MODELS))
@pytest.mark.parametrize("pruned", [True, False], ids=["pruned", "unpruned"])
def test_outputs_match_the_eval_model(source, name, pruned):
    model = build_model(source, name, num_classes=10)
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    if pruned:
        DEPruner(model, x, dw_pruning_ratio=0.7, pw_pruning_ratio=0.4, ignored_layers=[classifier_of(model)]).step()
    model.eval()
    fast = quiet_accelerate(model, backend="torch")
    with torch.no_grad():
        ref, got = model(x), fast(x)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        x2 = torch.randn(3, 3, 96, 96)  # another batch and size than the trace
        torch.testing.assert_close(fast(x2), model(x2), rtol=1e-4, atol=1e-4 * model(x2).abs().max().item())
    n_dw = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
               and m.kernel_size != (1, 1))
    assert len(fast.deprune_report.replaced()) == n_dw


def test_fold_bn_numbers():
    bn = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        bn.weight.copy_(torch.tensor([2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.5, 0.0]))
    bn.eps = 0.0
    w, b = fold_bn(torch.ones(2, 1, 1, 1), torch.zeros(2), bn)
    # channel 0: scale 2/2 = 1, bias 0.5 - 1*1 = -0.5; channel 1: scale 1/0.5 = 2, bias 0 + 2*2 = 4
    assert w.flatten().tolist() == [1.0, 2.0] and b.tolist() == [-0.5, 4.0]


def test_replacement_holds_kept_taps_bn_and_activation():
    m = build_model("timm", "mobilenetv2_100", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    DEPruner(m, x, dw_pruning_ratio=0.78, pw_pruning_ratio=0.0, variant="B", ignored_layers=[m.get_classifier()]).step()
    m.eval()
    fast = quiet_accelerate(m, backend="torch")
    blk = fast.blocks[1][0]
    assert isinstance(blk.conv_dw, FastDWConv) and blk.conv_dw.act == "relu6"
    assert type(blk.bn2) is nn.Identity  # BN and its ReLU6 now live inside the new module
    assert int(blk.conv_dw.keep.sum()) == int(tap_mask(m.blocks[1][0].conv_dw).sum()) == 3 * 64
    assert blk.conv_dw.formats()["taps"].nnz == 3 * 64
    assert blk.conv_dw.formats()["dr"].kept_per_range() == [64, 64, 64]
    assert "BN blocks.1.0.bn2 folded" in str(fast.deprune_report)
    assert m.blocks[1][0].conv_dw.__class__ is nn.Conv2d  # the input model is untouched


def test_filter_fn_and_report_reasons():
    m = build_model("timm", "mobilenetv2_100", num_classes=10).eval()
    fast = quiet_accelerate(m, backend="torch", filter_fn=lambda mod, name: not name.startswith("blocks.0"))
    rep = fast.deprune_report
    assert "blocks.0.0.conv_dw" not in rep.replaced()
    assert any(e.name == "blocks.0.0.conv_dw" and "filter_fn" in e.detail for e in rep.entries)


def test_auto_falls_back_with_one_warning_and_cupy_is_an_error_without_gpu(monkeypatch):
    m = build_model("timm", "mobilenetv3_small_050", num_classes=10).eval()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # as on a machine without OpenVINO / ONNX Runtime (test_cpu_runtimes.py covers them)
    monkeypatch.setattr("deprune_plugin.accel.api.runtime_available", lambda name: (False, f"{name} missing"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fast = accelerate(m, backend="auto")
    ours = [x for x in w if "deprune_plugin.accelerate" in str(x.message)]
    assert len(ours) == 1 and fast.deprune_report.backend == "torch"
    assert fast.deprune_report.fallback_reason
    with pytest.raises(RuntimeError, match="cupy"):
        accelerate(m, backend="cupy")
    with pytest.raises(ValueError, match="backend"):
        accelerate(m, backend="tpu")


def test_mixed_dtypes_and_bad_inputs_are_clear_errors():
    m = build_model("timm", "mobilenetv3_small_050", num_classes=10).eval()
    m.conv_stem.double()
    with pytest.raises(ValueError, match="dtypes"):
        accelerate(m, backend="torch")
    m = build_model("timm", "mobilenetv3_small_050", num_classes=10).eval()
    with pytest.raises(ValueError, match="example_inputs"):
        accelerate(m, backend="torch", example_inputs=torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_jit_trace_and_onnx_export_of_the_result(tmp_path):
    m = build_model("timm", "mobilenetv3_small_050", num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    DEPruner(m, x.expand(2, -1, -1, -1), ignored_layers=[m.get_classifier()]).step()
    m.eval()
    fast = quiet_accelerate(m, backend="torch")
    with torch.no_grad():
        traced = torch.jit.trace(fast, x)
        torch.testing.assert_close(traced(x), m(x), rtol=1e-4, atol=1e-5)
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    torch.onnx.export(fast, (x,), str(path), dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))


def test_memory_report_counts_kept_parameters_and_activations():
    dense = build_model("timm", "mobilenetv2_100").eval()
    pruned = copy.deepcopy(dense)
    x = torch.randn(1, 3, 64, 64)
    DEPruner(pruned, x.expand(2, -1, -1, -1), dw_pruning_ratio=0.5, pw_pruning_ratio=0.5,
             ignored_layers=[pruned.get_classifier()]).step()
    a, b = memory_report(dense, (x,)), memory_report(quiet_accelerate(pruned.eval(), backend="torch"), (x,))
    assert a.param_bytes == 4 * sum(p.numel() for p in dense.parameters()) + 4 * sum(
        t.numel() for n, t in dense.named_buffers() if t.is_floating_point())
    assert b.kept_param_bytes < b.param_bytes < a.param_bytes
    # the first activation alone is 32 x 32 x 32 floats = 128 KiB
    assert a.peak_activation_bytes >= 32 * 32 * 32 * 4 and b.peak_activation_bytes < a.peak_activation_bytes
