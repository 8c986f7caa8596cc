"""``deprune bench --device cuda``: the runners it builds (B0, B1, B2, the accelerate variants), the pairs'
baselines, the ratio and goal arithmetic. Built and checked on the CPU in float32 (``torch.compile``
stood in for, the torch backend for the kernels); the timing itself needs a GPU (the ``cuda`` test)."""
from __future__ import annotations

import argparse
import copy
import importlib.util
import warnings

import pytest
import torch
import torch.nn as nn

from cuda_env import CUDA_MARKS
from deprune_plugin import DEPruner, accelerate
from deprune_plugin.accel import FastDWConv
from deprune_plugin.accel.fused import FusedDSConv, plan_pair_edits
from deprune_plugin.app import bench
from deprune_plugin.core.zoo import build_model, classifier_of

SIZE = 32
RUNNER_NAMES = ["B0", "B1", "B2", "accel", "accel+fused", "accel+graphs", "accel+fused+graphs"]


def _random_bn_stats(model: nn.Module, g: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine terms: folding identity BNs would prove nothing."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


@pytest.fixture(scope="module")
def models():
    """``(unpruned, pruned DEPrune-BH, example input [2, 3, 32, 32])``: mobilenetv2_050, 10 classes, float32."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dense = build_model("timm", "mobilenetv2_050", num_classes=10)
    _random_bn_stats(dense, g)
    dense.eval().requires_grad_(False)
    pruned = build_model("timm", "mobilenetv2_050", num_classes=10)
    pruned.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE, generator=g)
    DEPruner(pruned, x, dw_pruning_ratio=0.6, pw_pruning_ratio=0.25, variant="BH",
             ignored_layers=[classifier_of(pruned)]).step()
    pruned.eval().requires_grad_(False)
    return dense, pruned, x


@pytest.fixture
def fake_compile(monkeypatch):
    """``torch.compile`` -> the module itself; records ``(module, kwargs)`` of every call."""
    calls = []

    def compile_(module, **kw):
        calls.append((module, kw))
        return module
    monkeypatch.setattr(torch, "compile", compile_)
    return calls


@pytest.fixture(scope="module")
def runners(models):
    dense, pruned, x = models
    mp = pytest.MonkeyPatch()
    calls = []
    mp.setattr(torch, "compile", lambda module, **kw: calls.append((module, kw)) or module)
    try:
        built = bench.gpu_runners(dense, pruned, x[:1], torch.float32, backend="torch")
    finally:
        mp.undo()
    return built, calls


@pytest.fixture(scope="module")
def paired(models):
    """The pruned model accelerated on the torch path with every DW+PW pair fused into a FusedDSConv
    (``accelerate`` fuses only on the kernel backend: the same edits, applied by hand)."""
    _, pruned, x = models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = accelerate(pruned, backend="torch", example_inputs=x[:1])
    edits, _ = plan_pair_edits(fast, x[:1])
    for e in edits:
        e.apply(fast)
    return fast


# ---- the runners -----------------------------------------------------------------------------------------

def test_runner_names_and_b2_is_b1_under_max_autotune(runners):
    built, calls = runners
    assert list(built) == RUNNER_NAMES
    assert len(calls) == 1
    module, kw = calls[0]
    assert module is built["B1"] and built["B2"] is built["B1"]
    assert kw == {"mode": "max-autotune", "dynamic": False}


def test_no_b2_when_compile_is_off(models, fake_compile):
    dense, pruned, x = models
    built = bench.gpu_runners(dense, pruned, x[:1], torch.float32, compile_b2=False, backend="torch")
    assert list(built) == [n for n in RUNNER_NAMES if n != "B2"]
    assert fake_compile == []


def test_b0_is_the_unpruned_model_channels_last(models, runners):
    dense, pruned, x = models
    b0 = runners[0]["B0"]
    assert b0 is not dense
    assert b0.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not dense.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)  # the input is not changed
    assert torch.allclose(b0(x), dense(x), rtol=1e-4, atol=1e-4)  # channels_last reorders sums
    assert (b0(x) - pruned(x)).abs().max() > 0.1  # pruning changed the model: B0 is not B1


def test_b1_is_the_pruned_model_with_bn_folded(models, runners):
    _, pruned, x = models
    b1 = runners[0]["B1"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in b1.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())
    dws = [m for m in b1.modules() if isinstance(m, bench.DenseDW)]
    assert len(dws) == 17  # every DW conv of MobileNetV2, each calling its dense path directly
    assert {id(m) for m in b1.modules() if isinstance(m, FastDWConv)} == {id(d.dw) for d in dws}
    assert torch.allclose(b1(x), pruned(x), atol=1e-4)


@pytest.mark.parametrize("name", RUNNER_NAMES[3:])
def test_accelerate_variants_reproduce_the_pruned_model(models, runners, name):
    _, pruned, x = models
    assert torch.allclose(runners[0][name](x), pruned(x), atol=1e-4)


def test_accelerate_variants_get_their_configs(models, monkeypatch, fake_compile):
    dense, pruned, x = models
    seen = []

    def record(model, backend="auto", example_inputs=None, config=None, filter_fn=None):
        seen.append((backend, None if config is None else (config.fuse_pairs, config.cuda_graphs)))
        return nn.Identity()
    monkeypatch.setattr(bench, "accelerate", record)
    bench.gpu_runners(dense, pruned, x[:1], torch.float32, backend="auto")
    assert seen == [("torch", None), ("auto", (False, False)), ("auto", (True, False)), ("auto", (False, True)),
                    ("auto", (True, True))]


def test_runners_are_built_in_the_requested_dtype(models, fake_compile):
    dense, pruned, x = models
    built = bench.gpu_runners(dense, pruned, x[:1], torch.bfloat16, compile_b2=False, backend="torch")
    for name, m in built.items():
        dtypes = {p.dtype for p in list(m.parameters()) + list(m.buffers()) if p.is_floating_point()}
        assert dtypes == {torch.bfloat16}, name
    assert next(pruned.parameters()).dtype == torch.float32  # the pruned model is not changed


# ---- the pairs' baselines --------------------------------------------------------------------------------

def _pairs(fast):
    return [(n, m) for n, m in fast.named_modules() if isinstance(m, FusedDSConv)]


def test_pair_b1_equals_the_unfused_pair_and_the_original_modules(models, paired):
    _, pruned, _ = models
    pairs = _pairs(paired)
    assert len(pairs) == 17
    g = torch.Generator().manual_seed(1)
    for name, pair in pairs:
        b1, _ = bench.pair_baselines(pair)
        x = torch.randn(2, pair.dw.groups, 8, 8, generator=g)
        got = b1(x)
        assert torch.allclose(got, pair.unfused(x), atol=1e-5), name
        # the source model's modules: DW conv, its BN (+ ReLU6), then the 1x1 projection and its BN
        dw_name, pw_name = pair.label.split("+")
        block = pruned.get_submodule(dw_name.rpartition(".")[0])
        assert pw_name == f"{dw_name.rpartition('.')[0]}.conv_pwl" or pw_name.endswith("conv_pw")
        if pw_name.endswith("conv_pwl"):
            ref = block.bn3(block.conv_pwl(block.bn2(block.conv_dw(x))))
        else:  # blocks.0.0: the DepthwiseSeparableConv
            ref = block.bn2(block.conv_pw(block.bn1(block.conv_dw(x))))
        assert torch.allclose(got, ref, atol=1e-4), name
        assert got.shape == (2, pair.pw_weight.shape[0], *ref.shape[2:])


def test_pair_b2_is_compiled_only_when_asked(paired, fake_compile):
    _, pair = _pairs(paired)[3]
    b1, make_b2 = bench.pair_baselines(pair)
    assert isinstance(b1, bench.PairB1) and b1.pair is pair
    assert fake_compile == []
    assert make_b2() is b1
    assert fake_compile == [(b1, {"mode": "max-autotune", "dynamic": False})]


def test_layer_rows_time_each_pair_against_its_baselines(models, paired, fake_compile):
    _, _, x = models
    copy_bw = 1e9
    rows = bench.layer_rows(paired, x[:1], copy_bw, reps=1)
    pairs = [r for r in rows if r["kind"] == "pair"]
    dws = [r for r in rows if r["kind"] == "dw"]
    assert [r["layer"] for r in pairs] == [n for n, _ in _pairs(paired)]
    # on the CPU every pair runs unfused, so its DW layer is called (and timed) too
    assert [r["layer"] for r in dws] == [f"{n}.dw" for n, _ in _pairs(paired)]
    assert len(fake_compile) == 17
    for r in pairs:
        assert r["choice"] is None  # never dispatched: the torch path
        assert r["speedup_vs_B1"] == pytest.approx(r["us_B1"] / r["us"])
        assert r["speedup_vs_B2"] == pytest.approx(r["us_B2"] / r["us"])
        assert r["pct_copy_bw"] == pytest.approx(100 * r["GBps"] * 1e9 / copy_bw)
    assert all("speedup_vs_B1" not in r for r in dws)


def test_layer_rows_without_b2(models, paired, fake_compile):
    rows = bench.layer_rows(paired, models[2][:1], 1e9, reps=1, compile_b2=False)
    assert fake_compile == []
    assert all("speedup_vs_B1" in r and "speedup_vs_B2" not in r for r in rows if r["kind"] == "pair")


def test_layer_inputs_leave_the_forward_alone(models, runners):
    """The inputs are caught by forward hooks returning None (a hook's return value replaces the output)."""
    fast, x = runners[0]["accel"], models[2][:1]
    seen = {}

    def see(name, args):
        seen.setdefault(name, args[0].clone())

    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: see(n, a))
             for n, m in fast.named_modules() if isinstance(m, FastDWConv)]
    try:
        fast(x)
    finally:
        for h in hooks:
            h.remove()
    caught = bench._layer_inputs(fast, x)
    assert list(caught) == list(seen) and len(seen) == 17
    for name, inp in caught.items():
        assert torch.equal(inp, seen[name]), name


def test_logical_bytes_by_hand():
    keep = torch.zeros(4, 1, 3, 3, dtype=torch.bool)
    keep.view(-1)[:5] = True  # 5 kept taps
    w = torch.randn(4, 1, 3, 3) * keep
    dw = FastDWConv(w, torch.zeros(4), keep, (1, 1), (1, 1, 1, 1), (1, 1), "relu")
    x = torch.randn(2, 4, 8, 8)
    # in 2*4*8*8*4 = 2048, out 2048, taps 5 * 4 = 20
    assert bench.logical_bytes(dw, x, dw(x)) == 4116
    pair = FusedDSConv(dw, torch.randn(6, 4, 1, 1), torch.zeros(6))
    # in 2048, out 2*6*8*8*4 = 3072, taps 20, PW weight 24 * 4 = 96, PW bias 6 * 4 = 24
    assert bench.logical_bytes(pair, x, pair(x)) == 5260


# ---- ratios, errors and goals ----------------------------------------------------------------------------

def test_speedups_against_each_baseline():
    t = {"B0": 0.010, "B1": 0.008, "B2": 0.004, "accel": 0.002}
    vs = bench.speedups(t)
    assert list(vs) == ["B0", "B1", "B2"]
    assert vs["B0"] == pytest.approx({"B0": 1.0, "B1": 1.25, "B2": 2.5, "accel": 5.0})
    assert vs["B1"] == pytest.approx({"B0": 0.8, "B1": 1.0, "B2": 2.0, "accel": 4.0})
    assert vs["B2"] == pytest.approx({"B0": 0.4, "B1": 0.5, "B2": 1.0, "accel": 2.0})
    assert list(bench.speedups({"B0": 0.01, "B1": 0.005})) == ["B0", "B1"]  # B2 not timed: no ratios to it


class _Shift(nn.Module):
    def __init__(self, by: float) -> None:
        super().__init__()
        self.by = by

    def forward(self, x):
        return x + self.by


def test_max_abs_errors_against_the_right_reference():
    x = torch.zeros(2, 3)
    errs = bench.max_abs_errors({"B0": _Shift(0.5), "B1": _Shift(-0.25)}, x, dense_ref=x, pruned_ref=x + 1)
    assert errs == {"B0": 0.5, "B1": 1.25}


def test_verdict_strings():
    assert bench.verdict(2.0, 2.0) == "met (measured 2.00x >= 2.00x)"
    assert bench.verdict(1.234, 1.5) == "missed (measured 1.23x < 1.50x)"
    assert bench.verdict(None, 1.5, "B2 not timed") == "not measured (B2 not timed)"
    assert bench.verdict(None, 1.5) == "not measured"


def _pair_row(name, vs_b1, vs_b2=None):
    row = {"layer": name, "kind": "pair", "speedup_vs_B1": vs_b1}
    if vs_b2 is not None:
        row["speedup_vs_B2"] = vs_b2
    return row


def test_goals_from_measured_entries():
    entries = [
        {"model": "mobilenetv2_100", "batch": 32, "speedup_vs": {"B0": {"accel": 2.0}},
         "layers": [{"layer": "blocks.0.0.conv_dw.dw", "kind": "dw"}, _pair_row("blocks.1.0.conv_dw", 2.5, 1.6),
                    _pair_row("blocks.2.0.conv_dw", 1.8, 1.7)]},
        {"model": "mobilenetv2_100", "batch": 1, "speedup_vs": {"B0": {"accel": 1.0}},
         "layers": [_pair_row("blocks.1.0.conv_dw", 9.0, 9.0)]},  # batch 1: not what the pair goals are about
        {"model": "efficientnet_b0", "batch": 32, "layers": [{"layer": "blocks.0.0.conv_dw", "kind": "dw"}],
         "speedup_vs": {"B0": {"B0": 1.0, "B1": 1.2, "accel": 3.0, "accel+fused": 4.0, "accel+graphs": 3.5}}},
    ]
    found = {g["goal"]: g for g in bench.goals(entries)}
    assert list(found) == [
        "mobilenetv2_100 batch 32: every fused DW+PW pair >= 2x its B1",
        "mobilenetv2_100 batch 32: every fused DW+PW pair >= 1.5x its B2",
        "efficientnet_b0 batch 32: every fused DW+PW pair >= 2x its B1",
        "efficientnet_b0 batch 32: every fused DW+PW pair >= 1.5x its B2",
        "efficientnet_b0 batch 32: accelerate(pruned) end to end >= 3.74x B0",
        "efficientnet_b0 batch 1: accelerate(pruned) end to end >= 1.9x B0"]
    g = list(found.values())
    assert (g[0]["status"], g[0]["measured"], g[0]["verdict"]) == ("missed", 1.8, "missed (measured 1.80x < 2.00x)")
    assert g[0]["detail"] == "1/2 pairs meet it; worst blocks.2.0.conv_dw"
    assert (g[1]["status"], g[1]["verdict"]) == ("met", "met (measured 1.60x >= 1.50x)")
    assert g[1]["detail"] == "2/2 pairs meet it; worst blocks.1.0.conv_dw"
    assert (g[2]["status"], g[2]["measured"]) == ("not measured", None)
    assert g[2]["verdict"] == "not measured (no fused pairs in accel+fused)"
    assert (g[4]["status"], g[4]["measured"], g[4]["verdict"]) == ("met", 4.0, "met (measured 4.00x >= 3.74x)")
    assert g[4]["detail"] == "best variant accel+fused; accel 3.00x, accel+fused 4.00x, accel+graphs 3.50x"
    assert g[5]["verdict"] == "not measured (efficientnet_b0 at batch 1 not in this run)"


def test_pair_goal_vs_b2_not_measured_without_b2():
    entries = [{"model": "mobilenetv2_100", "batch": 32, "speedup_vs": {"B0": {"accel": 3.0}},
                "layers": [_pair_row("blocks.1.0.conv_dw", 2.2) | {"choice": "fused"},
                           _pair_row("blocks.2.0.conv_dw", 2.4) | {"choice": "unfused"}]}]
    found = bench.goals(entries)
    assert found[0]["verdict"] == "met (measured 2.20x >= 2.00x)"
    assert found[0]["detail"] == "2/2 pairs meet it; worst blocks.1.0.conv_dw; 1/2 ran the fused kernel"
    assert found[1]["verdict"] == "not measured (B2 not timed)"
    assert found[2]["verdict"] == "not measured (efficientnet_b0 at batch 32 not in this run)"


def test_gpu_entry_assembly_on_the_cpu(models, monkeypatch, fake_compile, capsys):
    """The GPU path's glue (runners, references, timing, ratios, rows, printing, goals) run on the CPU: the
    torch backend for the kernels, torch.compile stood in for. Only the structure is checked here."""
    dense, pruned, x = models
    build = bench.gpu_runners
    monkeypatch.setattr(bench, "gpu_runners", lambda *a, **kw: build(*a, **kw, backend="torch"))
    args = argparse.Namespace(batch=[1, 2], image_size=SIZE, reps=1, quiet=True, no_inductor=False)
    entries = bench._bench_gpu("efficientnet_b0", dense, pruned, x, (0.6, 0.25), args, torch.device("cpu"),
                               torch.float32, 1e9)
    assert [e["batch"] for e in entries] == [1, 2]
    e = entries[0]
    assert list(e["ms"]) == RUNNER_NAMES and list(e["speedup_vs"]) == ["B0", "B1", "B2"]
    assert e["speedup"] == e["speedup_vs"]["B0"]
    assert e["speedup_vs"]["B1"]["accel"] == pytest.approx(e["ms"]["B1"] / e["ms"]["accel"])
    assert e["max_abs_err"]["B1"] < 1e-4 and e["max_abs_err"]["B0"] < 1e-4  # each against its own reference
    assert e["accelerate"]["accel"]["replaced"] == 17
    assert [r["kind"] for r in e["layers"]] == ["dw"] * 17  # the torch backend fuses no pairs
    found = bench.goals(entries)
    e2e = found[-1]  # efficientnet_b0 batch 1 (the label given above)
    best = max(e["speedup_vs"]["B0"][k] for k in bench.ACCEL_VARIANTS)
    assert e2e["measured"] == best and e2e["status"] in ("met", "missed")
    bench._print_goals(found)
    out = capsys.readouterr().out
    assert "efficientnet_b0 (DW 60.0% / PW 25.0%) batch 1 on cpu float32" in out
    assert "Speed targets:" in out and f"measured {best:.2f}x" in out


# ---- options and machine ---------------------------------------------------------------------------------

def test_dtype_option():
    assert bench.resolve_dtype(None, cuda=True) is torch.float16
    assert bench.resolve_dtype("bfloat16", cuda=True) is torch.bfloat16
    assert bench.resolve_dtype("float32", cuda=True) is torch.float32
    assert bench.resolve_dtype("float16", cuda=False) is torch.float32  # the CPU runners stay float32
    with pytest.raises(ValueError, match="--dtype"):
        bench.resolve_dtype("int8", cuda=True)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert p.parse_args([]).dtype is None
    assert p.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "int8"])


def test_gpu_settings_are_restored():
    import torch._dynamo.config as dynamo_config

    before = (torch.backends.cudnn.benchmark, dynamo_config.recompile_limit)
    with bench._gpu_settings():
        assert torch.backends.cudnn.benchmark is True
        assert dynamo_config.recompile_limit >= 512 and dynamo_config.fail_on_recompile_limit_hit
    assert (torch.backends.cudnn.benchmark, dynamo_config.recompile_limit) == before


def test_machine_info_names_every_version():
    info = bench.machine_info()
    assert set(info) == {"gpu", "torch", "cuda", "cudnn", "driver", "cupy", "nvrtc"}
    assert info["torch"] == torch.__version__
    assert info["cuda"] == torch.version.cuda
    if not torch.cuda.is_available():
        assert info["gpu"] is None
    if importlib.util.find_spec("cupy") is None:
        assert info["cupy"] is None


# ---- on a GPU --------------------------------------------------------------------------------------------

@CUDA_MARKS[0]
@CUDA_MARKS[1]
def test_gpu_runners_and_pair_rows_on_cuda(models):
    dtype = torch.float16
    dense, pruned = (copy.deepcopy(m).cuda() for m in models[:2])  # (the fixture's models stay on the CPU)
    x = models[2].cuda()
    built = bench.gpu_runners(dense, pruned, x[:1], dtype, compile_b2=False)
    assert list(built) == [n for n in RUNNER_NAMES if n != "B2"]
    xs = x.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        errs = bench.max_abs_errors(built, xs, dense(x), pruned(x))
    assert all(e < 5e-2 for e in errs.values()), errs
    rows = bench.layer_rows(built["accel+fused"], xs, copy_bw=1e12, reps=2, compile_b2=False)
    pairs = [r for r in rows if r["kind"] == "pair"]
    assert pairs and all(r["choice"] in ("fused", "unfused") and r["speedup_vs_B1"] > 0 for r in pairs)
