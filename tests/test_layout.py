"""The package layout is the architecture: import rules read off the source, no import cycles, and
torch-pruning's private method that DEPruner overrides still yields what DEPruner expects.

Rooms and the arrows between them (README, "Layout"):
core (torch only) <- tp_glue (the only importer of torch_pruning) <- app, and core <- kernels <- accel <- app.
"""
from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "deprune_plugin"
ROOMS = ("core", "tp_glue", "kernels", "accel", "app")
# room -> rooms it may import (itself always allowed)
ALLOWED = {
    "core": set(),
    "tp_glue": {"core"},
    "kernels": {"core"},
    "accel": {"core", "kernels"},
    "app": {"core", "tp_glue", "kernels", "accel", "root"},
    "root": {"core", "tp_glue", "kernels", "accel"},  # deprune_plugin/__init__.py: the public face
    "main": {"app"},                                   # deprune_plugin/__main__.py: `python -m deprune_plugin`
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] == "__main__":
        return "main"
    return parts[1]


def _is_our_module(dotted: str) -> bool:
    """True if ``dotted`` (``deprune_plugin.x.y``) names a module or subpackage of the tree under ``PKG``."""
    where = PKG.parent.joinpath(*dotted.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every imported module name (absolute), module level and inside functions alike.

    ``from PKG import X`` imports ``PKG.X`` when ``PKG/X`` is a module or subpackage of ours (``from ..
    import kernels`` inside ``accel`` imports ``deprune_plugin.kernels``, not the root package), and ``PKG``
    itself when ``X`` is a plain name defined in ``PKG/__init__.py`` (``from .. import accelerate``)."""
    tree = ast.parse(path.read_text())
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            if name.split(".")[0] != "deprune_plugin":
                out.append((node.lineno, name))
                continue
            for a in node.names:
                sub = f"{name}.{a.name}"
                out.append((node.lineno, sub if a.name != "*" and _is_our_module(sub) else name))
    return out


def _violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        room = _room(mod)
        for line, name in _imports(path):
            where = f"{path.relative_to(PKG.parent)}:{line} imports {name}"
            if name.split(".")[0] == "torch_pruning" and room != "tp_glue":
                bad.append(f"{where}: only tp_glue may import torch_pruning")
            if not name.startswith("deprune_plugin"):
                continue
            target = _room(name) if name != "deprune_plugin" else "root"
            if target == room or target in ALLOWED[room]:
                continue
            if target not in ALLOWED and target != "root":
                continue  # a name imported from a module, not a module of ours
            bad.append(f"{where}: {room} may not import {target}")
    return bad


def test_every_module_belongs_to_a_room():
    loose = [p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == [], f"modules outside the rooms {ROOMS}: {loose}"
    assert sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(ROOMS)


def test_import_rules_hold():
    assert _violations() == []


def test_the_rule_reader_catches_a_planted_violation(tmp_path, monkeypatch):
    """Plant `kernels -> accel` and `core -> torch_pruning` imports in a copy: both must be reported."""
    import shutil

    copy = tmp_path / "deprune_plugin"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "kernels" / "planted.py").write_text("from ..accel import api\n")
    (copy / "core" / "planted.py").write_text("def f():\n    import torch_pruning\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", copy)
    found = _violations()
    assert any("kernels/planted.py:1" in v and "kernels may not import accel" in v for v in found), found
    assert any("core/planted.py:2" in v and "only tp_glue may import torch_pruning" in v for v in found), found


def test_from_package_import_submodule_is_read_as_that_submodule(tmp_path, monkeypatch):
    """``from .. import X`` imports the room ``X`` when ``X`` is a subpackage, the root only when ``X`` is a
    plain name of ``deprune_plugin/__init__.py``: planted in a copy, each must be reported as exactly that."""
    import shutil

    copy = tmp_path / "deprune_plugin"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "kernels" / "planted.py").write_text(
        "from .. import tp_glue\n"            # line 1: kernels -> tp_glue (not root)
        "from deprune_plugin import accel\n"  # line 2: the absolute form, kernels -> accel
        "from .. import accelerate\n"         # line 3: a name of the root package: kernels -> root
        "from . import formats\n")            # line 4: own room: fine
    (copy / "accel" / "planted.py").write_text("from .. import kernels\nfrom ..kernels import formats\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", copy)
    found = [v for v in _violations() if "planted.py" in v]
    assert sorted(found) == [
        "deprune_plugin/kernels/planted.py:1 imports deprune_plugin.tp_glue: kernels may not import tp_glue",
        "deprune_plugin/kernels/planted.py:2 imports deprune_plugin.accel: kernels may not import accel",
        "deprune_plugin/kernels/planted.py:3 imports deprune_plugin: kernels may not import root",
    ], found
    # how each form is read
    assert _imports(copy / "kernels" / "planted.py") == [
        (1, "deprune_plugin.tp_glue"), (2, "deprune_plugin.accel"), (3, "deprune_plugin"),
        (4, "deprune_plugin.kernels.formats")]
    assert _imports(copy / "accel" / "planted.py") == [(1, "deprune_plugin.kernels"),
                                                       (2, "deprune_plugin.kernels.formats")]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=PKG.parent, timeout=600)


def test_every_module_imports_first_in_a_fresh_interpreter_and_rooms_in_every_order():
    """One interpreter (imports of torch and timm are shared), our modules dropped from sys.modules before
    each attempt: every module of the package imported first, then the rooms in all 120 orders."""
    modules = sorted(_module_name(p) for p in PKG.rglob("*.py") if p.name != "__main__.py")
    proc = _run(f"""
        import importlib, itertools, sys
        import torch, torch_pruning  # third-party imports stay cached between attempts
        def fresh():
            for k in [k for k in sys.modules if k == "deprune_plugin" or k.startswith("deprune_plugin.")]:
                del sys.modules[k]
        failures = []
        for mod in {modules!r}:
            fresh()
            try:
                importlib.import_module(mod)
            except Exception as e:
                failures.append(f"{{mod}}: {{type(e).__name__}}: {{e}}")
        for order in itertools.permutations({list(ROOMS)!r}):
            fresh()
            try:
                for room in order:
                    importlib.import_module("deprune_plugin." + room)
            except Exception as e:
                failures.append(f"{{order}}: {{type(e).__name__}}: {{e}}")
        print("FAILURES", failures)
        print("COUNT", len({modules!r}))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "FAILURES []" in proc.stdout, proc.stdout
    assert f"COUNT {len(modules)}" in proc.stdout and len(modules) > 30


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_alone(room):
    proc = _run(f"import deprune_plugin.{room}")
    assert proc.returncode == 0, proc.stderr


def test_base_pruner_prune_contract():
    """DEPruner overrides torch-pruning's private ``BasePruner._prune``: it consumes the groups the base
    generator yields (``group[0].dep.target.module``, ``.handler``, ``group[0].idxs``) and rebuilds them with
    ``DG.get_pruning_group``. If a torch-pruning release changes that, this fails with the reason, so the pin
    (torch-pruning==1.6.1) can be widened safely."""
    import torch
    import torch.nn as nn
    import torch_pruning as tp

    src = inspect.getsource(tp.pruner.BasePruner._prune)
    assert "yield group" in src, "BasePruner._prune no longer yields groups: DEPruner._prune must be revisited"
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    pruner = tp.pruner.BasePruner(model, torch.randn(2, 3, 4, 4), importance=tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[model[3]], in_channel_groups={},
                                  out_channel_groups={}, num_heads={})
    pruner.current_step = 1
    groups = list(pruner._prune())
    assert len(groups) == 1, "BasePruner._prune should yield the one prunable group"
    g = groups[0]
    module, handler, idxs = g[0].dep.target.module, g[0].dep.handler, list(g[0].idxs)
    assert module is model[0] and pruner.DG.is_out_channel_pruning_fn(handler) and len(idxs) == 4, (
        "the first item of a yielded group is no longer (root module, out-channel handler, indices)")
    rebuilt = pruner.DG.get_pruning_group(module, handler, idxs)
    assert {id(dep.target.module) for dep, _ in rebuilt} == {id(dep.target.module) for dep, _ in g}


TRACKER_WORDS = re.compile(r"\bissue\s*#?\d+|\(issue\b|\bthe issue'?s?\b|\bticket\b", re.I)


def _tracker_text(root: Path) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*")):
        if path.suffix in {".py", ".cu", ".cuh", ".h"}:
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if TRACKER_WORDS.search(line):
                    hits.append(f"{path.name}:{i}: {line.strip()}")
    return hits


def test_the_product_states_requirements_not_tracker_history(tmp_path):
    """Code and kernels say what they require, never which ticket asked for it."""
    repo = PKG.parent
    assert _tracker_text(PKG) == [] and _tracker_text(repo / "cuda") == []
    planted = tmp_path / "m.py"
    planted.write_text('print("Goals (issue 14):")\nx = 1  # Python issues the next call\n')
    assert _tracker_text(tmp_path) == ['m.py:1: print("Goals (issue 14):")']
