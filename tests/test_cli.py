"""End-to-end tests of the ``deprune`` command, run as a subprocess exactly as a user would."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from deprune_plugin.app.cli import main
from deprune_plugin.core.masks import masked_convs, tap_mask
from deprune_plugin.core.method import real_ratio
from deprune_plugin.tp_glue.serialization import load, load_extra

REPO = Path(__file__).resolve().parents[1]
TINY = ["--paper", "--latency-size", "32",
        "--limit", "200", "--image-size", "32", "--pretrain-epochs", "1", "--finetune-epochs", "1",
        "--latency-reps", "3", "--latency-batch", "4", "--quiet", "--device", "cpu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BENCH_TINY = ["--models", "mobilenetv3_small_050", "--batch", "1", "--reps", "1", "--image-size", "32",
              "--device", "cpu", "--quiet"]
# in-process runs: a small model and little data, seconds each
QUICK = ["--paper", "--latency-size", "32",
         "--model", "mobilenetv3_small_050", "--limit", "40", "--image-size", "32", "--pretrain-epochs", "1",
         "--finetune-epochs", "1", "--latency-reps", "2", "--latency-batch", "2", "--quiet", "--device", "cpu"]


def deprune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m deprune_plugin ARGS`` with this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "deprune_plugin", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def dw_ratio_tolerance(group_size: int = 32, tile: int = 32, taps: int = 9) -> float:
    """How far a balanced range's real ratio may sit from the target: HSR moves kept columns to a tile
    boundary (at most one tile), plus rounding of one tap."""
    return (tile + 1) / (group_size * taps)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One successful default-model run on the built-in digits, shared by the success-path tests."""
    out = tmp_path_factory.mktemp("prune")
    proc = deprune("prune", *TINY, "--out", str(out / "model.pt"), cwd=out)
    return out, proc


def test_prune_succeeds_and_prints_the_table(pruned_run):
    out, proc = pruned_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "K per range" in proc.stdout and "variant BH" in proc.stdout
    assert "blocks.6.0.conv_dw" in proc.stdout  # a row of the per-layer table
    assert "top-1:" in proc.stdout and "latency (cpu" in proc.stdout


def test_prune_output_loads_with_masks_at_target(pruned_run):
    out, proc = pruned_run
    assert proc.returncode == 0, proc.stderr
    model = load(out / "model.pt")
    extra = load_extra(out / "model.pt")
    convs = list(masked_convs(model))
    assert len(convs) == 17  # every DW conv of mobilenetv2_100
    for name, conv in convs:
        keep = tap_mask(conv)
        assert extra["dw_targets"][name] == pytest.approx(0.78)
        assert abs(real_ratio(keep, 32) - 0.78) <= dw_ratio_tolerance(), name
        assert torch.all(conv.weight[~keep] == 0), f"{name}: pruned taps not zero after fine-tuning"
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    metrics = extra["metrics"]
    assert set(metrics["top1"]) == {"before", "pruned", "recalibrated", "after"}  # BN recalibration is the default
    assert {"before", "after"} <= set(metrics["latency_ms"])
    assert metrics["macs"]["after"] < metrics["macs"]["before"]
    assert extra["args"]["dw"] == 0.78 and extra["args"]["model"] == "mobilenetv2_100"


def test_the_main_jobs_file_deploys_unchanged(pruned_run, tmp_path):
    """The trained, pruned, recalibrated file: no BatchNorm left with variance 0 in front of a live output,
    the channels that read no input reported, and accelerate() / export() keep everything."""
    import warnings

    from deprune_plugin import accelerate, export
    from deprune_plugin.accel.runtimes import RUNTIMES, runtime_available

    out, proc = pruned_run
    assert proc.returncode == 0, proc.stderr
    assert "keep no tap that reads input at the example's resolution" in proc.stdout  # --quiet keeps the table
    metrics = load_extra(out / "model.pt")["metrics"]
    assert metrics["blind_dw_channels"] > 0  # 32x32 digits: the last DW layers run on 1x1 and 2x2 maps
    model = load(out / "model.pt").eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert sum(int(((bn.running_var < 1e-8) & (bn.weight != 0)).sum()) for bn in bns) == 0
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no edit reverted, no runtime dropped
        fast = accelerate(model, example_inputs=x)
    rep = fast.deprune_report
    assert rep.left() == {} and len(rep.replaced()) == 17
    installed = {r for r in RUNTIMES if runtime_available(r)[0]}
    assert installed <= {k for k, v in rep.runtimes.items() if "ms" in v}
    if "onnxruntime" in installed:
        assert export(model, tmp_path / "m.onnx", example_inputs=x).exists()


def test_prune_writes_a_png_next_to_out(pruned_run):
    out, proc = pruned_run
    assert proc.returncode == 0, proc.stderr
    png = out / "model.png"
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert width > 500 and height > 300


def test_inspect_table_and_json(pruned_run):
    out, proc = pruned_run
    assert proc.returncode == 0, proc.stderr
    table = deprune("inspect", str(out / "model.pt"), cwd=out)
    assert table.returncode == 0, table.stderr
    assert "blocks.3.1.conv_dw" in table.stdout and "top-1:" in table.stdout and "NO" not in table.stdout.split()
    rep = deprune("inspect", "--json", str(out / "model.pt"), cwd=out)
    assert rep.returncode == 0, rep.stderr
    data = json.loads(rep.stdout)
    assert len(data["layers"]) == 17
    assert all(layer["zero_outside_mask"] for layer in data["layers"])
    assert all(abs(layer["real_ratio"] - 0.78) <= dw_ratio_tolerance() for layer in data["layers"])


def test_prune_iterative_variant_b(tmp_path):
    """Iterative steps with fine-tunes between, variant B (no HSR: ratios hit the target to one tap)."""
    proc = deprune("prune", *TINY, "--model", "mobilenetv3_small_050", "--variant", "B", "--steps", "2",
                   "--dw", "0.5", "--pw", "0.25", "--no-figure", "--out", str(tmp_path / "b.pt"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "variant B:" in proc.stdout
    assert not (tmp_path / "b.png").exists()
    model = load(tmp_path / "b.pt")
    for name, conv in masked_convs(model):
        keep = tap_mask(conv)
        taps = keep[0].numel()
        assert abs(real_ratio(keep, 32) - 0.5) <= 1.0 / min(32, keep.shape[0]) / taps + 1e-9, name


def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, text the error line must contain). Inputs the cases need are created here."""
    (tmp / "empty_dir").mkdir()
    (tmp / "a_file").write_text("not a folder")
    (tmp / "junk.pt").write_text("not a checkpoint")
    out = ["--out", str(tmp / "out" / "model.pt")]
    return {
        "unknown model": (["prune", "--model", "no_such_net", *TINY, *out], "no_such_net"),
        "unknown torchvision model": (["prune", "--source", "torchvision", "--model", "no_such_net", *TINY, *out],
                                      "no_such_net"),
        "missing checkpoint": (["prune", "--checkpoint", str(tmp / "missing.pt"), *TINY, *out], "missing.pt"),
        "unreadable checkpoint": (["prune", "--checkpoint", str(tmp / "junk.pt"), *TINY, *out], "junk.pt"),
        "dw ratio too big": (["prune", "--dw", "1.0", *TINY, *out], "--dw"),
        "pw ratio negative": (["prune", "--pw", "-0.1", *TINY, *out], "--pw"),
        "ratio not a number": (["prune", "--dw", "lots", *TINY, *out], "--dw"),
        "unknown variant": (["prune", "--variant", "XYZ", *TINY, *out], "--variant"),
        "missing data folder": (["prune", "--data", str(tmp / "nowhere"), *TINY, *out], "nowhere"),
        "data folder without images": (["prune", "--data", str(tmp / "empty_dir"), *TINY, *out], "empty_dir"),
        "out in a missing directory": (["prune", *TINY, "--out", str(tmp / "no_dir" / "m.pt")], "no_dir"),
        "out under a file": (["prune", *TINY, "--out", str(tmp / "a_file" / "m.pt")], "a_file"),
        "out is a directory": (["prune", *TINY, "--out", str(tmp / "empty_dir")], "empty_dir"),
        "unknown subcommand": (["shrink"], "shrink"),
        "inspect missing file": (["inspect", str(tmp / "missing.pt")], "missing.pt"),
        "inspect foreign file": (["inspect", str(tmp / "junk.pt")], "junk.pt"),
        "inspect a directory": (["inspect", str(tmp / "empty_dir")], f"file {str(tmp / 'empty_dir')!r} is a directory, "
                                                                     "not a file"),
        "export a directory": (["export", str(tmp / "empty_dir")], f"file {str(tmp / 'empty_dir')!r} is a directory, "
                                                                   "not a file"),
        "checkpoint is a directory": (["prune", "--checkpoint", str(tmp / "empty_dir"), *TINY, *out],
                                      f"checkpoint {str(tmp / 'empty_dir')!r} is a directory, not a file"),
        "out-dir under a file": (["prune", *TINY, "--out-dir", str(tmp / "a_file" / "runs")],
                                 f"{str(tmp / 'a_file')!r} is a file, not a directory"),
        "export no-check without static": (["export", str(tmp / "junk.pt"), "--no-check"], "--no-check needs --static"),
        "one training image": (["prune", *TINY, "--limit", "1", *out], "at least 2"),
        "a model torch-pruning cannot trace": (["prune", "--source", "torchvision", "--model", "shufflenet_v2_x0_5",
                                                *TINY, *out], "--pw 0"),
        "latency budget above 1": (["prune", "--latency-budget", "1.5", *TINY[1:], *out], "--latency-budget"),
        "latency budget and paper": (["prune", "--latency-budget", "0.7", *TINY, *out], "--paper"),
        "latency budget with a fixed pw": (["prune", "--latency-budget", "0.7", "--pw", "0.5", *TINY[1:], *out],
                                           "--pw"),
        "bench batch negative": (["bench", "--batch", "-1"], "--batch"),
        "bench batch zero": (["bench", "--batch", "0"], "--batch"),
        "bench threads negative": (["bench", "--threads", "-1"], "--threads"),
        "bench ratio too big": (["bench", "--dw", "1.5"], "--dw"),
        "bench json into a missing folder": (["bench", *BENCH_TINY, "--json", str(tmp / "nowhere" / "r.json")],
                                             "nowhere"),
    }


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:  # the cases create their inputs: make them somewhere throwaway
        return list(_bad_cases(Path(d)))


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, case):
    """In-process (a subprocess per case costs seconds of imports); a traceback would escape ``main``."""
    args, needle = _bad_cases(tmp_path)[case]
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("deprune: error: ") and needle in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "a failed run wrote files"


@pytest.mark.parametrize("case", ["unknown model", "dw ratio too big", "out in a missing directory"])
def test_bad_input_through_the_process(tmp_path, case):
    """The same through ``python -m deprune_plugin``: exit status 2, one stderr line, no traceback."""
    args, needle = _bad_cases(tmp_path)[case]
    (tmp_path / "out").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = deprune(*args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deprune: error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_bad_input(tmp_path, capsys):
    code = main(["prune", *TINY[:-2], "--device", "cuda", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "CUDA" in err and not list(tmp_path.iterdir())


def _image_tree(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    """Tiny PNGs in ``root/<class>/``, each class a different grey level."""
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 10), (40 * c + i, 40 * c, 40 * c)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_make_loaders_imagefolder_layouts(tmp_path):
    from deprune_plugin.app.data import make_loaders

    single = _image_tree(tmp_path / "single")
    train, test, n = make_loaders(str(single), image_size=16, batch_size=4, seed=1)
    assert n == 3 and len(train.dataset) + len(test.dataset) == 18 and len(test.dataset) == 3  # 20% per class
    x, y = next(iter(train))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    again = make_loaders(str(single), image_size=16, batch_size=4, seed=1)[1]
    assert list(again.dataset.indices) == list(test.dataset.indices)  # the split is seeded

    split = tmp_path / "split"
    _image_tree(split / "train")
    _image_tree(split / "val", per_class=2)
    train, test, n = make_loaders(str(split), image_size=16, batch_size=4, limit=5)
    assert n == 3 and len(train.dataset) == 5 and len(test.dataset) == 5


def test_make_loaders_digits_is_deterministic():
    from deprune_plugin.app.data import make_loaders

    a_train, a_test, n = make_loaders(limit=50, seed=3)
    b_train, b_test, _ = make_loaders(limit=50, seed=3)
    assert n == 10 and len(a_train.dataset) == 50 and len(a_test.dataset) == 50
    assert torch.equal(a_test.dataset.tensors[0], b_test.dataset.tensors[0])
    x, _ = next(iter(a_train))
    assert x.shape == (64 if len(a_train.dataset) >= 64 else 50, 3, 32, 32)


def test_prune_on_an_imagefolder_tree(tmp_path, capsys):
    """``--data PATH`` end to end (in-process): no pre-training by default there, one epoch asked for."""
    data = tmp_path / "data"
    _image_tree(data / "train")
    _image_tree(data / "val", per_class=2)
    code = main(["prune", "--data", str(data), "--model", "mobilenetv3_small_050", "--image-size", "32", "--paper",
                 "--latency-size", "32", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--latency-reps", "2",
                 "--latency-batch", "2", "--quiet", "--device", "cpu", "--out", str(tmp_path / "m.pt")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert load_extra(tmp_path / "m.pt")["args"]["data"] == str(data)
    model = load(tmp_path / "m.pt").eval()  # (load traces with autograd: not under no_grad)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


# ---------------------------------------------------------------- a finished run is never lost
def _flush_to_zero() -> bool:
    return bool((torch.full((1,), 1e-30) * 1e-10).item() == 0.0)


def test_the_default_prune_is_latency_aware_and_prints_speed_and_accuracy(tmp_path, capsys):
    """Without --paper / --dw / --pw the job prunes for a latency budget on the target, and reports the
    search's table, the measured speed-up of accelerate(pruned) over accelerate(unpruned) and top-1."""
    args = [a for a in QUICK if a != "--paper"]
    code = main(["prune", *args, "--target", "torch", "--latency-budget", "0.97", "--no-figure",
                 "--out", str(tmp_path / "m.pt")])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "latency-aware prune for torch (measured), budget 97% of dense" in out
    assert "speed-up of accelerate(pruned) over accelerate(unpruned):" in out
    assert "top-1:" in out
    m = load_extra(tmp_path / "m.pt")["metrics"]
    assert m["latency_search"]["target"] == "torch" and m["latency_search"]["budget"] == 0.97
    assert load_extra(tmp_path / "m.pt")["args"]["latency_budget"] == 0.97
    assert m["latency_size"] == 32
    assert load(tmp_path / "m.pt")(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_latency_failure_is_a_warning_and_the_model_and_figure_are_saved(tmp_path, capsys, monkeypatch):
    import deprune_plugin.core.timing as timing

    def broken(*a, **k):
        raise RuntimeError("timer exploded\nsecond line")

    monkeypatch.setattr(timing, "interleaved_medians", broken)
    code = main(["prune", *QUICK, "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.strip().splitlines() == [
        "deprune: warning: latency not measured: RuntimeError: timer exploded second line"]
    assert (tmp_path / "m.png").read_bytes().startswith(PNG_MAGIC)
    assert "latency_ms" not in load_extra(tmp_path / "m.pt")["metrics"]
    assert load(tmp_path / "m.pt")(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_an_accelerated_model_that_fails_is_dropped_from_timing_with_one_warning(tmp_path, capsys, monkeypatch):
    import deprune_plugin.accel as accel

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(accel, "accelerate", lambda *a, **k: Broken())
    code = main(["prune", *QUICK, "--no-figure", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(err.strip().splitlines()) == 1 and "kernel launch failed" in err and "warning" in err
    assert set(load_extra(tmp_path / "m.pt")["metrics"]["latency_ms"]) == {"before", "after"}


@pytest.mark.parametrize("limit,batch", [("65", "64"), ("3", "2")])
def test_a_last_batch_of_one_is_dropped(tmp_path, capsys, limit, batch):
    code = main(["prune", *QUICK, "--limit", limit, "--batch-size", batch, "--no-figure",
                 "--out", str(tmp_path / "m.pt")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "m.pt").is_file()


def test_train_drops_the_incomplete_last_batch_only():
    from torch.utils.data import DataLoader, TensorDataset

    from deprune_plugin.app.training import train

    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    data = TensorDataset(torch.randn(9, 4), torch.randint(0, 3, (9,)))
    train(model, DataLoader(data, batch_size=4), 2, quiet=True)
    assert seen == [4, 4, 4, 4]  # 9 = 4 + 4 + 1: the 1 is dropped, every epoch
    seen.clear()
    train(model, DataLoader(TensorDataset(torch.randn(3, 4), torch.randint(0, 3, (3,))), batch_size=8), 1, quiet=True)
    assert seen == [3]  # the only batch is kept when it can train BatchNorm
    with pytest.raises(ValueError, match="at least 2"):
        train(model, DataLoader(TensorDataset(torch.randn(1, 4), torch.zeros(1, dtype=torch.long)), batch_size=8), 1)


def test_unreadable_images_are_skipped_with_a_count(tmp_path, capsys):
    data = _image_tree(tmp_path / "data")
    (data / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    code = main(["prune", *QUICK, "--data", str(data), "--limit", "100", "--no-figure",
                 "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "skipped 1 unreadable image(s)" in lines[0] and "broken.png" in lines[0], err


def test_internal_error_is_one_line_with_the_way_to_the_traceback(tmp_path, capsys, monkeypatch):
    from deprune_plugin.tp_glue.pruner import DEPruner

    def boom(self, interactive=False):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(DEPruner, "step", boom)
    args = ["prune", *QUICK, "--pretrain-epochs", "0", "--finetune-epochs", "0", "--no-figure",
            "--out", str(tmp_path / "m.pt")]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines() == [
        "deprune: internal error: ZeroDivisionError: integer division or modulo by zero "
                                        "(run again with --debug or DEPRUNE_DEBUG=1 for the traceback)"]
    with pytest.raises(ZeroDivisionError):
        main([*args, "--debug"])
    monkeypatch.setenv("DEPRUNE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(args)


def test_bench_json_folder_is_checked_before_the_benchmark_runs(tmp_path, capsys, monkeypatch):
    from deprune_plugin.app import bench

    ran = []
    monkeypatch.setattr(bench, "run", lambda args: ran.append(args))
    code = main(["bench", *BENCH_TINY, "--json", str(tmp_path / "nowhere" / "r.json")])
    assert code == 2 and ran == [] and "nowhere" in capsys.readouterr().err


def test_flush_denormal_is_restored_on_every_exit_path(tmp_path, capsys, monkeypatch):
    assert not _flush_to_zero()
    main(["prune", *QUICK, "--no-figure", "--out", str(tmp_path / "m.pt")])  # success
    assert not _flush_to_zero()
    main(["prune", "--model", "no_such_net", *QUICK, "--out", str(tmp_path / "x.pt")])  # bad input
    assert not _flush_to_zero()
    from deprune_plugin.tp_glue.pruner import DEPruner

    monkeypatch.setattr(DEPruner, "step", lambda self, interactive=False: 1 / 0)
    main(["prune", *QUICK, "--pretrain-epochs", "0", "--no-figure", "--out", str(tmp_path / "y.pt")])  # internal error
    assert not _flush_to_zero()
    torch.set_flush_denormal(True)  # a caller's own setting is kept too
    try:
        main(["prune", "--model", "no_such_net", *QUICK, "--out", str(tmp_path / "x.pt")])
        assert _flush_to_zero()
    finally:
        torch.set_flush_denormal(False)
    capsys.readouterr()


def test_prune_and_inspect_print_the_same_labelled_parameter_count(pruned_run):
    import re

    from deprune_plugin.core.cost import PARAMS_LABEL, count_params

    out, proc = pruned_run
    assert proc.returncode == 0, proc.stderr
    pattern = re.escape(PARAMS_LABEL) + r" [\d.]+ M -> ([\d.]+) M"
    from_prune = re.search(pattern, proc.stdout)
    rep = deprune("inspect", str(out / "model.pt"), cwd=out)
    from_inspect_header = re.search(re.escape(PARAMS_LABEL) + r" ([\d.]+) M", rep.stdout)
    from_inspect_metrics = re.search(pattern, rep.stdout)
    assert from_prune and from_inspect_header and from_inspect_metrics, (proc.stdout, rep.stdout)
    assert from_prune.group(1) == from_inspect_header.group(1) == from_inspect_metrics.group(1)
    assert from_prune.group(1) == f"{count_params(load(out / 'model.pt')) / 1e6:.3f}"
    data = json.loads(deprune("inspect", "--json", str(out / "model.pt"), cwd=out).stdout)
    assert data["params"] == count_params(load(out / "model.pt")) and data["params_definition"] == PARAMS_LABEL


# ---------------------------------------------------------------------------------- names the CLI tells users
_DOTTED = re.compile(r"\bdeprune_plugin(?:\.[A-Za-z_]\w*)+")
_FROM_IMPORT = re.compile(r"\bfrom\s+(deprune_plugin(?:\.\w+)*)\s+import\s+(\w+)")


def _resolves(dotted: str) -> bool:
    """True if ``dotted`` is a module of ours or an attribute reachable from one (``deprune_plugin.load``,
    ``deprune_plugin.core.masks.apply_tap_masks_``)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _unresolved_names(text: str) -> list[str]:
    names = set(_DOTTED.findall(text)) | {f"{mod}.{name}" for mod, name in _FROM_IMPORT.findall(text)}
    return sorted(n for n in names if not _resolves(n))


def _cli_texts() -> str:
    """Everything the CLI shows or documents: every (sub)command's --help, the module's and its
    functions' docstrings (error messages quote names too, e.g. ``_state_dict_from``)."""
    import inspect as pyinspect

    from deprune_plugin.app import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts = [parser.format_help()] + [p.format_help() for p in sub.choices.values()]
    texts.append(pyinspect.getsource(cli))  # docstrings, help= strings and messages alike
    return "\n".join(texts)


def test_every_deprune_plugin_name_in_the_cli_texts_is_importable():
    text = _cli_texts()
    assert "from deprune_plugin import load" in text  # the example of `deprune prune --help`
    assert "deprune_plugin.app.bench" in text
    assert _unresolved_names(text) == []


def test_the_name_checker_catches_a_stale_name():
    """The names the CLI used to print before the layout change must be reported, the current ones not."""
    stale = ('python -c "import deprune_plugin.serialization as s; m = s.load(\'pruned.pt\')"\n'
             "speed benchmark (:mod:`deprune_plugin.bench`); from deprune_plugin import nothing_here")
    assert _unresolved_names(stale) == ["deprune_plugin.bench", "deprune_plugin.nothing_here",
                                        "deprune_plugin.serialization"]
    # a module that exists with an attribute that does not
    assert _unresolved_names("deprune_plugin.core.summary._kept_str") == ["deprune_plugin.core.summary._kept_str"]
    assert _unresolved_names("deprune_plugin.load, deprune_plugin.core.masks.apply_tap_masks_, "
                             "from deprune_plugin.app import bench") == []


def test_kept_str_is_the_one_run_length_format():
    from deprune_plugin.app import cli
    from deprune_plugin.core.summary import kept_str

    assert kept_str([64, 64, 64, 32]) == "64x3,32"
    assert kept_str([7, 5, 5, 7]) == "7,5x2,7"
    assert kept_str([]) == ""
    assert not hasattr(cli, "_kept_str")  # one definition: the CLI imports it


def test_prune_recalibrates_and_distils_by_default(tmp_path):
    code = main(["prune", *QUICK, "--taps", "geometry", "--no-figure", "--out", str(tmp_path / "a.pt")])
    assert code == 0
    top1 = load_extra(tmp_path / "a.pt")["metrics"]["top1"]
    assert set(top1) == {"before", "pruned", "recalibrated", "after"}
    assert all(0.0 <= v <= 100.0 for v in top1.values())
    args = load_extra(tmp_path / "a.pt")["args"]
    assert args["distill"] is True and args["taps"] == "geometry"
    code = main(["prune", *QUICK, "--no-recalibrate", "--no-distill", "--no-figure", "--out", str(tmp_path / "b.pt")])
    assert code == 0
    assert set(load_extra(tmp_path / "b.pt")["metrics"]["top1"]) == {"before", "pruned", "after"}
    assert load_extra(tmp_path / "b.pt")["args"]["distill"] is False


# ------------------------------------------------------------------------- files that are not what they seem
def _one_error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deprune: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", ["inspect", "export", "checkpoint"])
@pytest.mark.parametrize("content,start", [(b"not a checkpoint", "it starts with b'not a ch'"),
                                           (b"", "it is empty")])
def test_a_file_that_is_no_pytorch_file_is_named_as_such(tmp_path, capsys, monkeypatch, command, content, start):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(content)
    monkeypatch.chdir(tmp_path)
    args = {"inspect": ["inspect", str(junk)], "export": ["export", str(junk)],
            "checkpoint": ["prune", "--checkpoint", str(junk), *TINY, "--out", str(tmp_path / "m.pt")]}[command]
    line = _one_error_line(capsys, main(args))
    what = "checkpoint" if command == "checkpoint" else "file"
    assert line.startswith(f"deprune: error: {what} {str(junk)!r} is not a PyTorch file: {start}"), line
    for misleading in ("trusted", "unpickling", "weights_only", "will likely succeed"):
        assert misleading not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt"]


def test_load_names_a_file_that_is_no_pytorch_file(tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_text("just some notes")
    with pytest.raises(ValueError, match=re.escape(f"{junk} is not a PyTorch file: it starts with b'just som'")) as e:
        load(junk)
    assert "trusted" not in str(e.value)
    with pytest.raises(ValueError, match="is not a PyTorch file"):
        load(junk, trusted=True)  # unpickling would not help either
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path} is a directory, not a file")):
        load(tmp_path)


def test_a_checkpoint_that_needs_unpickling_gets_our_own_message(tmp_path, capsys):
    path = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, not a state dict
    line = _one_error_line(capsys, main(["prune", "--checkpoint", str(path), *TINY, "--out", str(tmp_path / "m.pt")]))
    assert line == (f"deprune: error: checkpoint {str(path)!r} holds more than tensors and plain data (e.g. a whole "
                    "pickled model), and reading it would need full unpickling, which can run code from the file; "
                    "save and pass model.state_dict() instead")


# ------------------------------------------------------------------------------------------------ export
@pytest.fixture
def pickled_model(tmp_path) -> Path:
    """A tiny model saved without ``arch`` (pickled: loads with --trusted, nothing to build or download)."""
    from deprune_plugin.tp_glue.serialization import save

    path = tmp_path / "tiny.pt"
    save(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1, groups=3), torch.nn.ReLU()), path)
    return path


def _fake_export(calls: list, effect: Callable[[Path], None] | None = None):
    def export(model, path, format="onnx", example_inputs=None, dynamic=True, check=True):
        calls.append({"path": str(path), "format": format, "shape": tuple(example_inputs.shape), "dynamic": dynamic,
                      "check": check})
        Path(path).write_bytes(b"onnx")
        if effect is not None:
            effect(Path(path))
        return Path(path)
    return export


@pytest.mark.parametrize("flags,dynamic,check", [([], True, True), (["--static"], False, True),
                                                 (["--static", "--no-check"], False, False)])
def test_export_static_and_no_check(pickled_model, capsys, monkeypatch, flags, dynamic, check):
    import deprune_plugin.accel as accel

    calls: list = []
    monkeypatch.setattr(accel, "export", _fake_export(calls))
    code = main(["export", str(pickled_model), "--trusted", "--input-size", "40", *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = str(pickled_model.with_suffix(".onnx"))
    assert calls == [{"path": out, "format": "onnx", "shape": (1, 3, 40, 40), "dynamic": dynamic, "check": check}]
    status = {(True, True): "checked against the model at 1x3x40x40 and another batch/size",
              (False, True): "static 1x3x40x40, checked against the model",
              (False, False): "static 1x3x40x40, not checked"}[dynamic, check]
    assert captured.out.strip() == f"wrote {out} ({status})"


def test_export_no_check_of_a_dynamic_file_is_refused_before_anything_runs(pickled_model, capsys, monkeypatch):
    import deprune_plugin.accel as accel

    calls: list = []
    monkeypatch.setattr(accel, "export", _fake_export(calls))
    line = _one_error_line(capsys, main(["export", str(pickled_model), "--trusted", "--no-check"]))
    assert "--no-check needs --static" in line and "second batch and size" in line
    assert calls == [] and sorted(p.name for p in pickled_model.parent.iterdir()) == ["tiny.pt"]


@pytest.mark.parametrize("static", [False, True])
def test_a_file_refused_by_its_check_is_one_error_line_not_an_internal_error(pickled_model, capsys, monkeypatch,
                                                                             static):
    import deprune_plugin.accel as accel
    from deprune_plugin.accel import ExportCheckFailed

    reason = ("export to {} failed its check in onnxruntime on the second input 2x3x45x41: max abs diff 0.5 "
              "(file deleted)")

    def refuse(path: Path) -> None:
        path.unlink()
        raise ExportCheckFailed(reason.format(path))

    monkeypatch.setattr(accel, "export", _fake_export([], refuse))
    out = pickled_model.with_suffix(".onnx")
    line = _one_error_line(capsys, main(["export", str(pickled_model), "--trusted", "--input-size", "32"]
                                        + (["--static"] if static else [])))
    hint = "try --input-size N (the image size the model is meant for)"
    if not static:
        hint += " or --static (one fixed input shape, 1x3x32x32)"
    assert line == f"deprune: error: refused {str(out)!r}: {reason.format(out)}; {hint}"
    assert not out.exists()


def test_export_check_failed_is_a_runtime_error():
    from deprune_plugin.accel import ExportCheckFailed
    from deprune_plugin.accel.exporter import __all__ as exporter_names

    assert issubclass(ExportCheckFailed, RuntimeError) and "ExportCheckFailed" in exporter_names


# ------------------------------------------------------------------------------------------------ warnings
def test_warnings_are_one_clean_line_and_the_callers_display_comes_back(pickled_model, capsys, monkeypatch):
    import warnings

    import deprune_plugin.accel as accel

    def warn(path: Path) -> None:
        warnings.warn(f"{path} written but not checked:\nno runtime installed", RuntimeWarning, stacklevel=3)

    def python_default(message, category, filename, lineno, file=None, line=None):
        # what Python prints without pytest's recording: file, line number, category and the source line
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(accel, "export", _fake_export([], warn))
    monkeypatch.setattr(warnings, "showwarning", python_default)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code = main(["export", str(pickled_model), "--trusted"])
    err = capsys.readouterr().err
    assert code == 0, err
    out = pickled_model.with_suffix(".onnx")
    assert err.splitlines() == [f"deprune: warning: {out} written but not checked: no runtime installed"]
    assert warnings.showwarning is python_default


# ------------------------------------------------------------------------------------------------ outputs
def test_prune_writes_into_the_output_folder_by_default(tmp_path, capsys, monkeypatch):
    from deprune_plugin.app import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_measure_latency", lambda *a: ({}, None))  # not what this test is about
    quick = [*QUICK, "--pretrain-epochs", "0", "--finetune-epochs", "0", "--no-recalibrate"]
    assert main(["prune", *quick]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [cli.DEFAULT_OUT_DIR]
    assert sorted(p.name for p in (tmp_path / cli.DEFAULT_OUT_DIR).iterdir()) == ["pruned.png", "pruned.pt"]
    model_file, figure = (os.path.join(cli.DEFAULT_OUT_DIR, name) for name in ("pruned.pt", "pruned.png"))
    assert capsys.readouterr().out.strip().endswith(f"saved {model_file}, figure {figure}")
    assert main(["prune", *quick, "--no-figure", "--out-dir", str(tmp_path / "runs" / "a")]) == 0
    assert [p.name for p in (tmp_path / "runs" / "a").iterdir()] == ["pruned.pt"]
    assert load(tmp_path / "runs" / "a" / "pruned.pt")(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert f"/{cli.DEFAULT_OUT_DIR}/" in (REPO / ".gitignore").read_text().splitlines()


# ------------------------------------------------------------------------------------------------ progress
def test_progress_in_a_log_is_plain_lines_not_one_carriage_return_line(capsys):
    """capsys's stderr is no terminal, like a CI log: no tqdm bar (its \\r updates would pile into one line),
    and training, the long part, says one line per epoch instead."""
    from torch.utils.data import DataLoader, TensorDataset

    from deprune_plugin.app.training import evaluate, train
    from deprune_plugin.core.recalibration import recalibrate_bn
    from deprune_plugin.core.timing import interleaved_medians

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=4)
    losses = train(model, loader, 2, quiet=False, desc="fine-tune")
    evaluate(model, loader, quiet=False)
    recalibrate_bn(model, loader, num_batches=3, quiet=False)
    interleaved_medians({"a": lambda: None}, reps=3, warmup=0, quiet=False)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [f"fine-tune: epoch {i + 1}/2, loss {loss:.3f}" for i, loss in enumerate(losses)]
    train(model, loader, 1, quiet=True)
    assert capsys.readouterr().err == ""


def test_compare_in_a_log_says_one_plain_line_per_run(capsys):
    from deprune_plugin.app.compare import CompareConfig, compare

    cfg = CompareConfig(model="mobilenetv3_small_050", limit=16, seeds=(3, 4), methods=("dense",), dense_epochs=0,
                        finetune_epochs=0, device="cpu", quiet=False)
    runs = compare(cfg)["runs"]
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [f"compare: {i + 1}/2 seed {r['seed']} dense: top-1 {r['top1_finetuned']:.2f}%"
                                for i, r in enumerate(runs)]
