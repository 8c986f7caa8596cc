"""Every cuda/*.cu specialisation compiles for the GPU: nvcc for sm_80 and sm_90 (no register spills), and
NVRTC (the runtime path of deprune_plugin.kernels.cupy_launch) when its library is installed.

No GPU is needed. The sources are specialised exactly as the launchers do and written alone into a
temporary directory, so a build that needed cuda_host_emulation.h would fail here.
"""
from __future__ import annotations

import ctypes
import glob
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from deprune_plugin.kernels.cupy_launch import NVRTC_OPTIONS, nvrtc_include_dirs
from deprune_plugin.kernels.dw_direct import dw_direct_defines
from deprune_plugin.kernels.dw_dr import dr_plan_positions, dw_dr_defines
from deprune_plugin.kernels.dw_pw_fused import dw_pw_fused_defines
from deprune_plugin.kernels.nvrtc import load_nvrtc, nvrtc_version
from deprune_plugin.kernels.report import find_tool, sass_local_instrs
from deprune_plugin.kernels.sources import EMULATION_HEADER, KernelSource, cuda_dir, specialize

NVCC = shutil.which("nvcc")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ARCHS = ("80", "90")
DR_VARIANTS = [(32, 32)]                     # (group_size, tile) for every dtype and layout: the default
DR_EXTRA = [(torch.float32, True, 64, 16)]   # (dtype, nhwc, group_size, tile): one more group/tile variant


def _dr_pt(group_size: int) -> int:
    """Positions per CTA the DR launcher plans for the reference call below (2 x 40 x 9 x 10): the grid-filling
    rule of :func:`dr_plan_positions` picks it from the shape."""
    return dr_plan_positions(9 * 10, -(-40 // group_size), 2, group_size)[0]


def _specialisations() -> list[tuple[str, KernelSource]]:
    """(entry, source) pairs built from the launchers' own define sets (:func:`dw_direct_defines`,
    :func:`dw_dr_defines`): kernel x dtype x layout, plus a DR group/tile variant."""
    out = []
    for dtype in DTYPES:
        for nhwc in (False, True):
            out.append(("deprune_dw_direct", specialize("dw_direct.cu", dw_direct_defines(dtype, nhwc))))
            out += [("deprune_dw_dr", specialize("dw_dr.cu", dw_dr_defines(dtype, nhwc, gs, tile,
                                                                           positions_per_cta=_dr_pt(gs))))
                    for gs, tile in DR_VARIANTS]
    out += [("deprune_dw_dr", specialize("dw_dr.cu", dw_dr_defines(dtype, nhwc, gs, tile,
                                                                   positions_per_cta=_dr_pt(gs))))
            for dtype, nhwc, gs, tile in DR_EXTRA]
    out += [("deprune_dw_pw_fused", specialize("dw_pw_fused.cu", dw_pw_fused_defines(dtype))) for dtype in DTYPES]
    return out


def _id(item: tuple[str, KernelSource]) -> str:
    entry, src = item
    d = dict(src.defines)
    extra = f"-g{d['DEPRUNE_GROUP_SIZE']}-t{d['DEPRUNE_KTILE']}" if "DEPRUNE_GROUP_SIZE" in d else ""
    layout = "nhwc" if d.get("DEPRUNE_LAYOUT_NHWC", "1") == "1" else "nchw"
    return f"{src.name[:-3]}-{d['DEPRUNE_SCALAR'].strip('_')}-{layout}{extra}"


SPECS = _specialisations()


def test_every_cu_file_is_covered():
    names = {Path(p).name for p in glob.glob(str(cuda_dir() / "*.cu"))}
    assert names == {src.name for _, src in SPECS}


def _launched_sources(monkeypatch) -> set[tuple[str, tuple[tuple[str, str], ...], str]]:
    """``(entry, defines, source hash)`` of what the launchers hand to the emulation's compile-and-run step,
    for every dtype x layout (+ the DR_EXTRA variants). The step is replaced by a recorder: nothing is
    built, so this runs in milliseconds."""
    from deprune_plugin.kernels import dw_direct, dw_dr, dw_pw_fused, emulation
    from deprune_plugin.kernels.dw_pw_fused import REFERENCE_OUT_CHANNELS
    from deprune_plugin.kernels.formats import CompactTaps, DRColumns

    seen = set()
    monkeypatch.setattr(emulation, "launch",
                        lambda src, entry, *args: seen.add((entry, src.defines, src.hash)))
    weight = torch.randn(40, 1, 3, 3)
    runs = [(dtype, nhwc, gs, tile) for dtype in DTYPES for nhwc in (False, True) for gs, tile in DR_VARIANTS]
    for dtype, nhwc, gs, tile in runs + DR_EXTRA:
        x = torch.randn(2, 40, 9, 10).to(dtype)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        dw_direct(x, CompactTaps.from_dense(weight), None, padding=1, backend="emu")
        dw_dr(x, DRColumns.from_dense(weight, group_size=gs, tile=tile), None, padding=1, backend="emu")
    for dtype in DTYPES:  # the fused kernel is channels_last only
        x = torch.randn(2, 40, 9, 10).to(dtype).contiguous(memory_format=torch.channels_last)
        dw_pw_fused(x, CompactTaps.from_dense(weight), None, torch.randn(REFERENCE_OUT_CHANNELS, 40), None,
                    padding=1, backend="emu")
    return seen


def test_the_compiled_specialisations_are_exactly_what_the_launchers_use(monkeypatch):
    """Before, this file retyped the launchers' #define sets by hand; now both come from dw_*_defines. A
    launcher that compiled other defines than it reports (or the list here drifting) fails this test."""
    launched = _launched_sources(monkeypatch)
    listed = {(entry, src.defines, src.hash) for entry, src in SPECS}
    direct = {s for s in launched if s[0] == "deprune_dw_direct"}
    # one shape (dw_direct_defines' reference geometry, geometry is compile-time): one specialisation per
    # dtype and layout
    assert len(direct) == 2 * len(DTYPES)
    assert launched == listed


def test_the_define_record_catches_a_launcher_that_drifts(monkeypatch):
    """The comparison above can fail: a launcher compiling one define more than dw_direct_defines says
    (planted in the planner's define builder; its plan cache is cleared around the planted run)."""
    direct_mod = importlib.import_module("deprune_plugin.kernels.dw_direct")
    real = direct_mod._defines
    monkeypatch.setattr(direct_mod, "_defines", lambda *a: {**real(*a), "DEPRUNE_ROWS": 2})
    direct_mod._plan.cache_clear()
    try:
        launched = _launched_sources(monkeypatch)
    finally:
        direct_mod._plan.cache_clear()
    assert launched != {(entry, src.defines, src.hash) for entry, src in SPECS}


@pytest.mark.nvcc
@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("spec", SPECS, ids=[_id(s) for s in SPECS])
def test_nvcc_compiles_without_spills(spec, tmp_path):
    entry, src = spec
    cu = tmp_path / src.name  # alone: cuda_host_emulation.h is not next to it
    cu.write_text(src.code)
    assert not (tmp_path / EMULATION_HEADER).exists()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, "-x", "cu", "-std=c++17", "--threads", "2", *gencode, "-Xptxas", "-v", "-c", str(cu),
           "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    log = proc.stdout + proc.stderr
    for arch in ARCHS:
        assert f"Compiling entry function '{entry}' for 'sm_{arch}'" in log
    # (stack frame, spill stores, spill loads): an array indexed at run time sits in the stack frame with 0
    # spill bytes reported, and costs the same local-memory traffic
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert frames and all(f == ("0", "0", "0") for f in frames), f"local memory (stack frame or spills):\n{log}"
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is not None:
        sass = subprocess.run([cuobjdump, "-sass", str(tmp_path / "k.o")], capture_output=True, text=True,
                              check=True).stdout
        assert sass_local_instrs(sass) == 0, "LDL/STL in the SASS"


# ---- NVRTC (what CuPy uses at run time) -----------------------------------------------------------

NVRTC = load_nvrtc()  # the package's loader: wheel or toolkit, builtins preloaded


def _nvrtc_compile(code: str, options: list[str]) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"kernel.cu", 0, None, None) == 0
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = NVRTC.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    NVRTC.nvrtcGetProgramLog(prog, log)
    NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")


def _nvrtc_major() -> int | None:
    return None if NVRTC is None else nvrtc_version()[0]


@pytest.mark.nvcc
@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (CUDA toolkit or nvidia-cuda-nvrtc wheel)")
@pytest.mark.skipif(not nvrtc_include_dirs(), reason="cuda_fp16.h not found for NVRTC")
@pytest.mark.parametrize("spec", SPECS, ids=[_id(s) for s in SPECS])
def test_nvrtc_compiles_with_the_launcher_options(spec):
    _, src = spec
    options = [*NVRTC_OPTIONS, *(f"-I{d}" for d in nvrtc_include_dirs(_nvrtc_major()))]
    for arch in ARCHS:
        rc, log = _nvrtc_compile(src.code, [*options, f"-arch=compute_{arch}"])
        assert rc == 0, log
