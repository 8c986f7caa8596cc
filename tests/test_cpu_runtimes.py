"""CPU runtimes behind accelerate() (OpenVINO, ONNX Runtime) and export() to ONNX / OpenVINO IR: outputs equal
the pruned model at every batch and size, the result behaves as a module, failures are reported, and the
exported files hold no BatchNorm and no mask ops."""
from __future__ import annotations

import copy
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn

from deprune_plugin import DEPruner, accelerate, export, save
from deprune_plugin.accel import RUNTIMES, AccelerateConfig, RuntimeModel
from deprune_plugin.accel import runtimes as rt_mod
from deprune_plugin.app.cli import main
from deprune_plugin.core.agreement import agreement
from deprune_plugin.core.masks import masked_convs, tap_mask
from deprune_plugin.core.zoo import build_model

RUNTIME_NAMES = list(RUNTIMES)
SIZES = [(1, 64, 64), (3, 96, 80), (2, 33, 47)]  # batch, H, W: odd sizes hit both stride-2 parities


def _need(name: str) -> None:
    pytest.importorskip(RUNTIMES[name].package)


def _pruned(name: str = "mobilenetv2_050", size: int = 64) -> nn.Module:
    torch.manual_seed(0)
    m = build_model("timm", name, num_classes=10)
    x = torch.randn(2, 3, size, size)
    DEPruner(m, x, dw_pruning_ratio=0.7, pw_pruning_ratio=0.4, variant="BH", ignored_layers=[m.get_classifier()]).step()
    with torch.no_grad():  # non-trivial BN statistics, so folding errors would show
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def pruned() -> nn.Module:
    return _pruned()


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    a = agreement(got, ref)
    assert a.ok, a.reason


@pytest.mark.parametrize("runtime", RUNTIME_NAMES)
def test_runtime_backend_matches_the_pruned_model_at_every_batch_and_size(pruned, runtime):
    _need(runtime)
    fast = accelerate(pruned, backend=runtime, example_inputs=torch.randn(1, 3, 64, 64))
    assert isinstance(fast, RuntimeModel) and fast.runtimes == (runtime,) and fast.runtime == runtime
    rep = fast.deprune_report
    assert rep.backend == runtime and rep.fallback_reason is None
    assert any(c.startswith(f"{runtime}: outputs match") for c in rep.checks)
    with torch.no_grad():
        for n, h, w in SIZES:
            x = torch.randn(n, 3, h, w)
            got = fast(x)
            assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
            _close(got, pruned(x))


@pytest.mark.parametrize("runtime", RUNTIME_NAMES)
def test_runtime_result_behaves_as_a_module(pruned, runtime):
    _need(runtime)
    fast = accelerate(pruned, backend=runtime)
    assert fast.training is False
    assert not any(p.requires_grad for p in fast.parameters())
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation (or other) warning per call
        y = fast(x)
    twin = copy.deepcopy(fast)  # native sessions are rebuilt, not copied
    _close(twin(x), y)
    low = copy.deepcopy(fast).to(torch.bfloat16)
    out = low(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert agreement(out, pruned(x).bfloat16(), dtype=torch.bfloat16).ok
    # an input that requires grad runs the eager torch model, so gradients flow back to it
    xg = x.clone().requires_grad_(True)
    fast(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    # tracing sees the eager model too
    with torch.no_grad():
        traced = torch.jit.trace(fast, x[:1], check_trace=False)
    _close(traced(x[:1]), pruned(x[:1]))


def test_auto_times_every_checked_runner_and_keeps_the_fastest_per_signature(pruned):
    installed = [r for r in RUNTIME_NAMES if rt_mod.runtime_available(r)[0]]
    if not installed:
        pytest.skip("no CPU runtime installed")
    ex = torch.randn(1, 3, 64, 64)
    fast = accelerate(pruned, example_inputs=ex, config=AccelerateConfig(select_reps=3))
    rep = fast.deprune_report
    assert isinstance(fast, RuntimeModel) and fast.runtimes == tuple(installed)
    assert set(rep.runtimes) == {"torch", *installed}
    times = {k: v["ms"] for k, v in rep.runtimes.items()}
    assert all(t > 0 for t in times.values())
    best = installed[0]  # preference order: the runtimes as configured, then torch; a later one must be >10% faster
    for name in [*installed[1:], "torch"]:
        if times[name] < times[best] * 0.9:
            best = name
    assert rep.backend == best
    assert f"runtime  {rep.backend}:" in str(rep) and "(chosen)" in str(rep)
    assert list(fast.choices.values()) == [rep.backend]  # chosen for the example input's signature
    x = torch.randn(4, 3, 80, 80)  # a new signature: checked and timed on its first call, then cached
    with torch.no_grad():
        _close(fast(x), pruned(x))
    assert len(fast.choices) == 2 and set(fast.choices.values()) <= {"torch", *installed}
    assert {c.name for c in fast.dispatcher().cache.values()} == set(fast.choices.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes_are_cast_to_fp32_and_back_with_several_runtimes(pruned, dtype):
    """The default CPU result holds several runners (torch among them): each input dtype is cast to fp32 for
    whichever runs, the choice is the fp32 signature's, and outputs come back in the input's dtype."""
    installed = [r for r in RUNTIME_NAMES if rt_mod.runtime_available(r)[0]]
    if not installed:
        pytest.skip("no CPU runtime installed")
    fast = accelerate(pruned, example_inputs=torch.randn(1, 3, 64, 64), config=AccelerateConfig(select_reps=1))
    assert isinstance(fast, RuntimeModel) and len(fast.runtimes) == len(installed)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        got = fast(x.to(dtype))
        ref = pruned(x.to(dtype).float())
    assert got.dtype == dtype
    tol = torch.float32 if dtype == torch.float64 else dtype  # computed in fp32, stored in dtype
    assert agreement(got.float(), ref.to(dtype).float(), dtype=tol).ok
    assert list(fast.choices) == [fast._key((torch.randn(1, 3, 64, 64),)), fast._key((x,))]  # fp32 keys only


def test_a_runtime_that_disagrees_on_a_new_signature_is_dropped_there(pruned, monkeypatch):
    installed = [r for r in RUNTIME_NAMES if rt_mod.runtime_available(r)[0]]
    if not installed:
        pytest.skip("no CPU runtime installed")
    fast = accelerate(pruned, config=AccelerateConfig(select_reps=2))
    real = RuntimeModel.run_runtime
    monkeypatch.setattr(RuntimeModel, "run_runtime", lambda self, name, *a: real(self, name, *a) + 1.0)
    x = torch.randn(2, 3, 72, 72)
    with pytest.warns(RuntimeWarning, match="dropped"):
        with torch.no_grad():
            got = fast(x)
    _close(got, pruned(x))  # every runtime disagreed: torch runs that signature
    assert fast.choices[RuntimeModel._key((x,))] == "torch"


def test_no_runtime_installed_falls_back_to_torch_with_one_warning(pruned, monkeypatch):
    monkeypatch.setattr("deprune_plugin.accel.api.runtime_available", lambda name: (False, f"{name} missing"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fast = accelerate(pruned)
    ours = [x for x in w if "deprune_plugin.accelerate" in str(x.message)]
    assert len(ours) == 1 and "no CPU runtime installed" in str(ours[0].message)
    assert fast.deprune_report.backend == "torch" and not isinstance(fast, RuntimeModel)
    with pytest.raises(RuntimeError, match="backend='openvino'.*openvino missing"):
        accelerate(pruned, backend="openvino")


def test_a_runtime_that_disagrees_is_dropped_reported_and_warned(pruned, monkeypatch):
    runtime = next((r for r in RUNTIME_NAMES if rt_mod.runtime_available(r)[0]), None)
    if runtime is None:
        pytest.skip("no CPU runtime installed")
    real = RuntimeModel.run_runtime

    def off_by_a_bit(self, name, *args):
        out = real(self, name, *args)
        return out + 0.01 * out.abs().max()

    monkeypatch.setattr(RuntimeModel, "run_runtime", off_by_a_bit)  # what the self-check runs
    with pytest.warns(RuntimeWarning, match=f"CPU runtime\\(s\\) not used: {runtime}"):
        fast = accelerate(pruned, backend=runtime)
    rep = fast.deprune_report
    assert rep.backend == "torch" and not isinstance(fast, RuntimeModel)
    assert "max abs err" in rep.runtimes[runtime]["dropped"]
    assert rep.fallback_reason.startswith(runtime)
    x = torch.randn(2, 3, 64, 64)
    _close(fast(x), pruned(x))


def test_bad_runtime_arguments_are_clear_errors(pruned):
    with pytest.raises(ValueError, match="cpu_runtimes.*tvm"):
        accelerate(pruned, config=AccelerateConfig(cpu_runtimes=("tvm",)))
    with pytest.raises(ValueError, match="select_reps"):
        accelerate(pruned, config=AccelerateConfig(select_reps=0))
    with pytest.raises(ValueError, match="runtime must be one of"):
        RuntimeModel(pruned, ["tvm"], b"", 1)
    with pytest.raises(ValueError, match="runtime must be one of"):
        RuntimeModel(pruned, [], b"", 1)


@pytest.mark.slow
def test_a_model_that_reshapes_by_input_size_runs_at_every_size():
    """timm mobilevit_xxs reshapes by the input size: the accelerated model takes every size it takes."""
    torch.manual_seed(0)
    m = build_model("timm", "mobilevit_xxs", num_classes=10)
    DEPruner(m, torch.randn(1, 3, 64, 64), dw_pruning_ratio=0.6, pw_pruning_ratio=0).step()
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = accelerate(m, example_inputs=torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        for size in (64, 96, 128):
            x = torch.randn(2, 3, size, size)
            _close(fast(x), m(x))


# ---------------------------------------------------------------------------------------------- export
def _onnx_ops(path) -> Counter:
    onnx = pytest.importorskip("onnx")
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_onnx_export_has_no_batchnorm_no_mask_ops_and_dynamic_axes(pruned, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = export(pruned, tmp_path / "m.onnx", example_inputs=torch.randn(1, 3, 64, 64))
    ops = _onnx_ops(path)
    assert "BatchNormalization" not in ops and "Mul" not in ops and "Where" not in ops
    n_convs = sum(isinstance(m, nn.Conv2d) for m in pruned.modules())
    assert ops["Conv"] == n_convs
    graph = onnx.load(str(path)).graph
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3]  # batch, height and width are named (dynamic)
    # the first DW conv's weight in the file: pruned taps are exact zeros (masks made permanent)
    name, conv = next(iter(masked_convs(pruned)))
    keep = tap_mask(conv)
    weights = [onnx.numpy_helper.to_array(t) for t in graph.initializer]
    match = [w for w in weights if w.shape == tuple(keep.shape)]
    assert match and any(((torch.from_numpy(w.copy())[~keep] == 0).all() and
                          (torch.from_numpy(w.copy())[keep] != 0).all()) for w in match)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, h, w in SIZES:
        x = torch.randn(n, 3, h, w)
        _close(torch.from_numpy(session.run(None, {"input0": x.numpy()})[0]), pruned(x))
    assert tap_mask(conv) is not None  # the user's model keeps its masks


def test_openvino_export_writes_checked_ir(pruned, tmp_path):
    ov = pytest.importorskip("openvino")
    path = export(pruned, tmp_path / "m.xml", format="openvino", example_inputs=torch.randn(1, 3, 64, 64))
    assert path.exists() and path.with_suffix(".bin").exists()
    core = ov.Core()
    model = core.read_model(str(path))
    assert not [op for op in model.get_ops() if op.get_type_name() == "BatchNormInference"]
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = torch.randn(3, 3, 72, 56)
    _close(torch.from_numpy(compiled([x.numpy()])[compiled.outputs[0]]), pruned(x))


def test_export_that_disagrees_is_deleted_and_raises(pruned, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import deprune_plugin.accel.exporter as export_mod

    real = export_mod._run_file
    monkeypatch.setattr(export_mod, "_run_file", lambda *a: [t + 1.0 for t in real(*a)])
    path = tmp_path / "m.onnx"
    with pytest.raises(RuntimeError, match="failed its check.*file deleted"):
        export(pruned, path)
    assert not path.exists()


class _SizeFixed(nn.Module):
    """Pads by an amount computed in Python from the input size (as TF "SAME" padding does): a traced graph
    keeps the example's padding at every size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = int(x.shape[-1]) % 2
        return self.conv(nn.functional.pad(x, (pad, 1, pad, 1))).mean((2, 3))


def test_an_input_size_dependent_model_is_refused_dynamic_with_the_way_out_and_exported_static(tmp_path):
    pytest.importorskip("onnxruntime")
    m = _SizeFixed().eval()
    x = torch.randn(1, 3, 40, 40)  # pads 0; the second check input is 49 wide and pads 1 in the model
    path = tmp_path / "m.onnx"
    with pytest.raises(RuntimeError, match="matches the model at the example input .*dynamic=False"):
        export(m, path, example_inputs=x)
    assert not path.exists()
    assert export(m, path, example_inputs=x, dynamic=False) == path and path.exists()


def test_a_dynamic_export_without_a_runtime_to_verify_it_is_refused_before_writing(pruned, tmp_path, monkeypatch):
    import deprune_plugin.accel.exporter as export_mod

    monkeypatch.setattr(export_mod, "runtime_available", lambda name: (False, f"{name} missing"))
    with pytest.raises(RuntimeError, match="verified at a second input size"):
        export(pruned, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(RuntimeWarning, match="written but not checked"):
        export(pruned, tmp_path / "m.onnx", dynamic=False)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"path": "m.pt"}, ValueError, "must end in '.onnx'"),
    ({"path": "missing/m.onnx"}, ValueError, "does not exist"),
    ({"format": "tflite"}, ValueError, "format must be one of"),
    ({"example_inputs": "image"}, TypeError, "example_inputs"),
    ({"path": 3}, TypeError, "path must be"),
    ({"check": False}, ValueError, "never verified at a second input size"),
    ({"dynamic": "yes"}, TypeError, "dynamic and check must be bools"),
])
def test_bad_export_arguments_are_clear_errors_and_write_nothing(pruned, tmp_path, monkeypatch, kwargs, exc, match):
    monkeypatch.chdir(tmp_path)
    kw = {"path": "m.onnx", **kwargs}
    with pytest.raises(exc, match=match):
        export(pruned, **kw)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("openvino", ".xml")])
def test_cli_export_writes_a_checked_file(tmp_path, fmt, suffix, capsys):
    pytest.importorskip("openvino" if fmt == "openvino" else "onnxruntime")
    torch.manual_seed(0)
    m = build_model("timm", "mobilenetv2_050", num_classes=10)
    p = DEPruner(m, torch.randn(2, 3, 48, 48), dw_pruning_ratio=0.7, pw_pruning_ratio=0.4,
                 ignored_layers=[m.get_classifier()])
    p.step()
    src = tmp_path / "pruned.pt"
    save(m, src, history=p.pruning_history(), input_shape=(1, 3, 48, 48),
         arch={"source": "timm", "name": "mobilenetv2_050", "kwargs": {"num_classes": 10}})
    assert main(["export", str(src), "--format", fmt]) == 0
    out = src.with_suffix(suffix)
    assert out.exists() and f"wrote {out}" in capsys.readouterr().out
    assert main(["export", str(src), "--format", fmt, "--out", str(tmp_path / "x.bad")]) == 2
    assert main(["export", str(tmp_path / "none.pt")]) == 2
