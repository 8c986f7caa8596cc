"""Loading never runs code from a file: weights-only by default, full unpickling only with trusted=True."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deprune_plugin import DEPruner
from deprune_plugin.app.cli import main
from deprune_plugin.core.masks import masked_convs, tap_mask
from deprune_plugin.core.zoo import build_model
from deprune_plugin.tp_glue.serialization import FORMAT, load, load_extra, save

REPO = Path(__file__).resolve().parents[1]


class _Planted:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the loader unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_file(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    path = tmp_path / "crafted.pt"
    torch.save({"format": FORMAT, "model": _Planted(marker), "extra": {}}, path)
    assert not marker.exists()
    return path, marker


def tiny_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def small_pruned(pw: float = 0.0):
    """A tiny DSConv net, DW taps pruned (``pw=0``: no channel removed)."""
    torch.manual_seed(0)
    m = tiny_net()
    x = torch.randn(2, 3, 6, 6)
    p = DEPruner(m, x, dw_pruning_ratio=0.5, pw_pruning_ratio=pw, variant="plain", ignored_layers=[m[7]])
    p.step()
    return m, p, x


def test_load_refuses_a_file_that_needs_pickle_and_runs_nothing(tmp_path):
    path, marker = crafted_file(tmp_path)
    with pytest.raises(ValueError) as info:
        load(path)
    msg = str(info.value)
    assert str(path) in msg and "trusted=True" in msg and "only for files you made" in msg.lower()
    assert not marker.exists(), "load() unpickled the file"
    with pytest.raises(ValueError, match="trusted=True"):
        load_extra(path)
    assert not marker.exists()


def test_inspect_refuses_a_file_that_needs_pickle_and_runs_nothing(tmp_path, capsys):
    path, marker = crafted_file(tmp_path)
    code = main(["inspect", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(path) in err and "--trusted" in err
    assert not marker.exists(), "deprune inspect unpickled the file"


def test_trusted_opt_in_loads_a_pickled_model_you_made(tmp_path):
    m, _, x = small_pruned()
    path = tmp_path / "whole.pt"
    save(m, path)  # no arch: the whole module is pickled
    with pytest.raises(ValueError, match="trusted=True"):
        load(path)
    with pytest.raises(TypeError, match="trusted"):
        load(path, trusted="yes")
    loaded = load(path, trusted=True).eval()
    m.eval()
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert [n for n, _ in masked_convs(loaded)] == ["3"]


def test_build_callable_rebuilds_a_custom_architecture_and_dw_only_files_need_no_graph(tmp_path):
    m, p, x = small_pruned(pw=0.0)
    assert p.pruning_history() == []
    path = tmp_path / "custom.pt"
    save(m, path, history=p.pruning_history(), arch={"source": "mine", "name": "tiny"}, input_shape=(1, 3, 6, 6))
    seen = []

    def build(arch):
        seen.append(arch)
        return tiny_net()

    loaded = load(path, build=build).eval()
    assert seen == [{"source": "mine", "name": "tiny"}]
    m.eval()
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert torch.equal(tap_mask(loaded[3]), tap_mask(m[3]))
    with pytest.raises(ValueError, match="source"):
        load(path)  # the default builder knows timm and torchvision only


def test_serialization_does_not_import_the_app():
    code = ("import sys, deprune_plugin.tp_glue.serialization as s; "
            "print(sorted(k for k in sys.modules if k.startswith('deprune_plugin.app')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------- re-pruned models: histories compose

MBV2 = {"source": "timm", "name": "mobilenetv2_050", "kwargs": {"num_classes": 10}}
MBV2_SHAPE = (1, 3, 32, 32)


def mbv2_pruner(model: nn.Module, x: torch.Tensor, pw: float, **kw) -> DEPruner:
    return DEPruner(model, x, dw_pruning_ratio=0.6, pw_pruning_ratio=pw, variant="BH",
                    ignored_layers=[model.classifier], **kw)


def assert_same_model(loaded: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    """Same widths, same tap masks (and some taps really pruned), same outputs."""
    loaded.eval()
    model.eval()
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    masks, ref = list(masked_convs(loaded)), list(masked_convs(model))
    assert [n for n, _ in masks] == [n for n, _ in ref] and len(ref) > 0
    for (_, a), (_, b) in zip(masks, ref):
        assert torch.equal(tap_mask(a), tap_mask(b))
    assert any(not bool(tap_mask(c).all()) for _, c in ref)
    with torch.no_grad():
        y, y_ref = loaded(x), model(x)
    assert y.abs().sum() > 0 and torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)


def widths(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def test_a_loaded_and_re_pruned_model_saves_and_loads_with_the_composed_history(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    model = build_model("timm", "mobilenetv2_050", num_classes=10)
    p1 = mbv2_pruner(model, x, pw=0.3)
    p1.step()
    h1 = p1.pruning_history()
    assert len(h1) > 0
    save(model, tmp_path / "once.pt", history=h1, arch=MBV2, input_shape=MBV2_SHAPE)
    once = load(tmp_path / "once.pt")
    assert once.deprune_history == h1
    assert_same_model(once, model, x)
    once_widths = widths(once)

    with pytest.warns(UserWarning, match="already carry tap masks"):
        p2 = mbv2_pruner(once, x, pw=0.3)
    p2.step()
    assert widths(once) < once_widths  # the second run removed channels too
    h2 = p2.pruning_history()
    assert h2[: len(h1)] == h1 and len(h2) == len(h1) + len(p2.DG.pruning_history()) > len(h1)
    assert once.deprune_history == h2
    save(once, tmp_path / "twice.pt", history=h2, arch=MBV2, input_shape=MBV2_SHAPE)
    twice = load(tmp_path / "twice.pt")
    assert twice.deprune_history == h2
    assert_same_model(twice, once, x)


def test_an_iterative_pruner_saved_midway_loads_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = tiny_net()
    x = torch.randn(2, 3, 6, 6)
    arch, shape, build = {"source": "mine"}, (1, 3, 6, 6), (lambda arch: tiny_net())
    p = DEPruner(model, x, dw_pruning_ratio=0.6, pw_pruning_ratio=0.5, iterative_steps=2, variant="plain",
                 ignored_layers=[model[7]])
    p.step()
    mid_history = p.pruning_history()
    assert p.current_step == 1 and model[4].out_channels == 6 and len(mid_history) == 1
    save(model, tmp_path / "mid.pt", history=mid_history, arch=arch, input_shape=shape)
    mid = load(tmp_path / "mid.pt", build=build)
    assert mid.deprune_history == mid_history
    assert_same_model(mid, model, x)

    # resume from the checkpoint with a new pruner: its history begins with the checkpoint's
    with pytest.warns(UserWarning, match="already carry tap masks"):
        p2 = DEPruner(mid, x, dw_pruning_ratio=0.6, pw_pruning_ratio=0.5, variant="plain", ignored_layers=[mid[7]])
    p2.step()
    assert mid[4].out_channels == 3
    assert p2.pruning_history()[:1] == mid_history and len(p2.pruning_history()) == 2
    save(mid, tmp_path / "resumed.pt", history=p2.pruning_history(), arch=arch, input_shape=shape)
    assert_same_model(load(tmp_path / "resumed.pt", build=build), mid, x)

    # the original pruner's second step saves and loads as well
    p.step()
    assert model[4].out_channels == 4 and p.pruning_history()[:1] == mid_history
    save(model, tmp_path / "end.pt", history=p.pruning_history(), arch=arch, input_shape=shape)
    assert_same_model(load(tmp_path / "end.pt", build=build), model, x)


def test_pruners_chained_without_saving_compose_and_copies_keep_the_history(tmp_path):
    m, p1, x = small_pruned(pw=0.5)
    assert m[4].out_channels == 4 and m.deprune_history == p1.pruning_history()
    with pytest.warns(UserWarning, match="already carry tap masks"):
        p2 = DEPruner(m, x, dw_pruning_ratio=0.7, pw_pruning_ratio=0.5, variant="plain", ignored_layers=[m[7]])
    p2.step()
    assert m[4].out_channels == 2 and m[7].in_features == 2
    assert p2.pruning_history() == p1.pruning_history() + p2.DG.pruning_history()
    path = tmp_path / "chained.pt"
    save(m, path, history=p2.pruning_history(), arch={"source": "mine"}, input_shape=(1, 3, 6, 6))
    loaded = load(path, build=lambda arch: tiny_net())
    assert_same_model(loaded, m, x)
    assert copy.deepcopy(loaded).deprune_history == p2.pruning_history() == loaded.deprune_history
    with pytest.warns(UserWarning, match="already carry tap masks"):
        taps_only = DEPruner(loaded, x, dw_pruning_ratio=0.8, pw_pruning_ratio=0.0, variant="plain",
                             ignored_layers=[loaded[7]])
    assert taps_only.pruning_history() == p2.pruning_history()  # DW taps only: nothing added


def test_an_incomplete_history_is_refused_at_save_and_at_load_naming_the_file(tmp_path):
    m, p1, x = small_pruned(pw=0.5)
    first = tmp_path / "first.pt"
    save(m, first, history=p1.pruning_history(), arch={"source": "mine"}, input_shape=(1, 3, 6, 6))
    loaded = load(first, build=lambda arch: tiny_net())
    with pytest.warns(UserWarning, match="already carry tap masks"):
        p2 = DEPruner(loaded, x, dw_pruning_ratio=0.7, pw_pruning_ratio=0.5, variant="plain",
                      ignored_layers=[loaded[7]])
    p2.step()
    raw = p2.DG.pruning_history()  # torch-pruning's own history: the second run only
    bad = tmp_path / "bad.pt"
    with pytest.raises(ValueError, match=r"does not begin with the 2 pruning step\(s\) the model already carries"):
        save(loaded, bad, history=raw, arch={"source": "mine"}, input_shape=(1, 3, 6, 6))
    assert not bad.exists()

    # a file that still holds only the last run's history (a model that carries nothing was saved)
    stripped = copy.deepcopy(loaded)
    del stripped.deprune_history
    save(stripped, bad, history=raw, arch={"source": "mine"}, input_shape=(1, 3, 6, 6))
    with pytest.raises(ValueError) as info:
        load(bad, build=lambda arch: tiny_net())
    msg = str(info.value)
    assert str(bad) in msg and "does not match its weights" in msg, msg
    assert "4.weight is (6, 16, 1, 1), the saved weight is (2, 16, 1, 1)" in msg, msg  # 8 - 2, not 8 - 4 - 2
