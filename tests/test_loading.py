"""Loading never runs code from a file: weights-only by default, full unpickling only with trusted=True."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deprune_plugin import DEPruner
from deprune_plugin.app.cli import main
from deprune_plugin.core.masks import masked_convs, tap_mask
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
