"""The wheel carries the kernels: a non-editable install finds every ``cuda/`` source through
``importlib.resources`` and compiles a kernel from there (here through the host emulation).

The wheel is built from a copy of the project's build inputs (so no ``build/`` folder is left in the
repository and no stale one leaks into the wheel), installed with ``pip --target`` into a temporary folder
and used from a subprocess whose ``PYTHONPATH`` puts that folder first and whose cwd is outside the repo.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from deprune_plugin.kernels import emulation_available
from deprune_plugin.kernels.sources import EMULATION_HEADER, PACKAGED_DIR, cuda_dir

REPO = Path(__file__).resolve().parents[1]
CUDA_FILES = sorted(p.name for p in (REPO / "cuda").iterdir() if p.suffix in {".cu", ".cuh", ".h"})
BUILD_INPUTS = ("pyproject.toml", "setup.cfg", "README.md", "deprune_plugin", "cuda")

pytestmark = pytest.mark.slow


def _pip(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    wheels = list((tmp / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_cuda_dir_of_the_checkout():
    """Editable install / checkout: the sources are the repository's top-level cuda/ folder."""
    assert not (REPO / "deprune_plugin" / PACKAGED_DIR).exists(), "cuda/ must stay at the top level"
    assert cuda_dir().resolve() == (REPO / "cuda").resolve()


def test_wheel_contains_every_cuda_file_and_module(wheel):
    assert {"dw_direct.cu", "dw_dr.cu", EMULATION_HEADER} <= set(CUDA_FILES)
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in CUDA_FILES if f"deprune_plugin/{PACKAGED_DIR}/{f}" not in names]
    assert not missing, f"cuda/ files missing from {wheel.name}: {missing}"
    assert not any(n.startswith("cuda/") for n in names), "cuda/ must go inside the package, not top level"
    # pyproject.toml lists the packages explicitly (the cuda/ mapping needs it): a new subpackage that is not
    # listed there would be missing from the wheel.
    modules = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "deprune_plugin").rglob("*.py"))
    missing = [m for m in modules if m not in names]
    assert not missing, f"modules missing from the wheel (add their package to pyproject.toml): {missing}"
    assert "deprune_plugin/py.typed" in names


_CHECK = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    import torch.nn.functional as F
    import deprune_plugin
    from deprune_plugin.kernels import dw_direct
    from deprune_plugin.kernels.emulation import cache_dir
    from deprune_plugin.kernels.formats import CompactTaps
    from deprune_plugin.kernels.sources import EMULATION_HEADER, cuda_dir, specialize

    names = json.loads(sys.argv[1])
    d = cuda_dir()
    resolved = {}
    for name in names:
        assert (d / name).is_file(), name
        resolved[name] = str(d / name)
    for name in names:
        if name.endswith(".cu"):
            src = specialize(name, {})
            assert src.directory == d and (src.directory / EMULATION_HEADER).is_file(), src.directory

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 11, generator=g)
    weight = torch.randn(5, 1, 3, 3, generator=g)
    mask = torch.rand(5, 1, 3, 3, generator=g) < 0.6
    bias = torch.randn(5, generator=g)
    taps = CompactTaps.from_dense(weight, mask)
    y = dw_direct(x, taps, bias, stride=(1, 1), padding=(1, 1), backend="emu")
    ref = F.conv2d(x, taps.to_dense(), bias, 1, 1, 1, groups=5)
    print(json.dumps({"package": deprune_plugin.__file__, "cuda_dir": str(d), "resolved": resolved,
                      "max_err": (y - ref).abs().max().item(), "shape_ok": y.shape == ref.shape,
                      "built": sorted(p.name for p in cache_dir().glob("*.so"))}))
""")


def test_installed_wheel_finds_and_compiles_the_kernels(wheel, tmp_path):
    ok, why = emulation_available()
    if not ok:
        pytest.skip(f"host emulation unavailable: {why}")
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp_path)
    assert (site / "deprune_plugin" / PACKAGED_DIR / "dw_direct.cu").is_file()

    work = tmp_path / "elsewhere"  # cwd outside the repository
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"DEPRUNE_CUDA_DIR", "PYTHONPATH"}}
    env.update(PYTHONPATH=str(site), DEPRUNE_EMU_CACHE=str(tmp_path / "emu"))  # fresh cache: really compile
    proc = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(CUDA_FILES)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    packaged = (site / "deprune_plugin").resolve()
    assert Path(out["package"]).resolve().is_relative_to(packaged), out["package"]  # not the checkout
    assert Path(out["cuda_dir"]).resolve() == packaged / PACKAGED_DIR
    assert sorted(out["resolved"]) == CUDA_FILES
    for name, path in out["resolved"].items():
        assert Path(path).read_bytes() == (REPO / "cuda" / name).read_bytes(), name
    assert out["shape_ok"] and out["max_err"] < 1e-5, out
    assert any(n.startswith("dw_direct-") for n in out["built"]), out["built"]
