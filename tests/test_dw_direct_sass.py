"""What the GPU would run, read without a GPU: ``cuda/dw_direct.cu`` specialised as :func:`dw_direct_plan`
plans the DW layers of MobileNetV2 / EfficientNet-B0 (fp16/bf16 channels_last, batch 32) compiles with nvcc
for sm_80 and sm_90 without register spills; the sm_90 SASS of the vector path moves the input and output
with 128-bit global accesses (``LDG.E.128`` / ``STG.E.128``) and no 16-bit global loads, while the scalar
fallback (C not a multiple of 8) does use 16-bit loads (so the SASS check can fail).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from test_dw_direct_plan import EFFICIENTNET_B0, MOBILENET_V2, dw_geometry

from deprune_plugin.kernels.dw_direct import dw_direct_plan
from deprune_plugin.kernels.report import ptxas_local_memory, sass_local_instrs
from deprune_plugin.kernels.sources import KernelSource, specialize

NVCC = shutil.which("nvcc")
KB = 1024
SM90_OPTIN = 227 * KB


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or the copy the triton wheel bundles."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for base in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        path = Path(base) / "bin" / "cuobjdump"
        if path.is_file():
            return str(path)
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if path.is_file():
            return str(path)
    return None


CUOBJDUMP = _cuobjdump()
pytestmark = [pytest.mark.nvcc, pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")]


def _layer_sources(dtype: torch.dtype) -> dict[tuple, KernelSource]:
    """One source per distinct define set the planner picks for the two nets' DW layers (sm_90 limit)."""
    out = {}
    for c, size, k, s in MOBILENET_V2 + EFFICIENTNET_B0:
        plan = dw_direct_plan(dw_geometry(c, size, k, s), dtype, smem_limit=SM90_OPTIN)
        out.setdefault(tuple(sorted(plan.defines.items())), specialize(plan.source, plan.defines))
    return out


FP16_SOURCES = list(_layer_sources(torch.float16).values())
BF16_SOURCES = list(_layer_sources(torch.bfloat16).values())


def _id(src: KernelSource) -> str:
    d = dict(src.defines)
    return (f"k{d['DEPRUNE_KH']}s{d['DEPRUNE_SH']}-t{d['DEPRUNE_TILE_H']}x{d['DEPRUNE_TILE_W']}"
            f"-cb{d['DEPRUNE_CB']}-v{d['DEPRUNE_VEC']}")


@lru_cache(maxsize=None)
def _compile(code: str, arch: str, tmp: str) -> tuple[Path, str]:
    """``(cubin, ptxas -v log)`` of one source for ``sm_<arch>``."""
    folder = Path(tmp)
    cu = folder / "k.cu"
    cu.write_text(code)
    cubin = folder / f"k_{arch}.cubin"
    cmd = [NVCC, "-x", "cu", "-std=c++17", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", "-o", str(cubin), str(cu)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return cubin, proc.stdout + proc.stderr


def ptxas_usage(log: str) -> tuple[int, int, int, int]:
    """``(registers, stack frame bytes, spill store bytes, spill load bytes)`` of the one kernel in a
    ``-Xptxas -v`` log (a run-time indexed array lives in the stack frame with 0 spill bytes)."""
    regs = re.findall(r"Used (\d+) registers", log)
    frames = list(ptxas_local_memory(log).values())
    assert len(regs) == 1 and len(frames) == 1, log
    return (int(regs[0]), *frames[0])


def sass_of(cubin: Path) -> str:
    return subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout


def runtime_divisions(sass: str) -> int:
    """Integer divisions by run-time values: each compiles to a reciprocal seeded by ``I2F.RP`` (divisions by
    constants are multiply-shifts and leave none)."""
    return sass.count("I2F.RP")


def global_accesses(cubin: Path) -> dict[str, int]:
    """Counts of each global load / store opcode (``LDG.E.128``, ``STG.E.U16``, ...) in the SASS."""
    sass = sass_of(cubin)
    counts: dict[str, int] = {}
    for op in re.findall(r"\b((?:LDG|STG)(?:\.[A-Z0-9_]+)*)", sass):
        counts[op] = counts.get(op, 0) + 1
    return counts


def test_the_layers_give_several_specialisations():
    assert 8 <= len(FP16_SOURCES) <= 20  # geometry and tiles are compile-time; layers share what they can


@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("src", FP16_SOURCES + BF16_SOURCES[:3],
                         ids=[_id(s) + "-fp16" for s in FP16_SOURCES] + [_id(s) + "-bf16" for s in BF16_SOURCES[:3]])
def test_layer_specialisations_compile_without_spills(src, arch, tmp_path):
    cubin, log = _compile(src.code, arch, str(tmp_path))
    regs, stack, spill_st, spill_ld = ptxas_usage(log)
    assert (stack, spill_st, spill_ld) == (0, 0, 0), log
    assert regs <= 128  # __launch_bounds__(256, 2)
    if CUOBJDUMP is not None:
        assert sass_local_instrs(sass_of(cubin)) == 0


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found")
@pytest.mark.parametrize("src", FP16_SOURCES[:4] + BF16_SOURCES[:1],
                         ids=[_id(s) for s in FP16_SOURCES[:4]] + [_id(s) + "-bf16" for s in BF16_SOURCES[:1]])
def test_vector_path_sass_has_128_bit_global_accesses(src, tmp_path):
    ops = global_accesses(_compile(src.code, "90", str(tmp_path))[0])
    loads128 = sum(n for op, n in ops.items() if op.startswith("LDG.E.128"))
    stores128 = sum(n for op, n in ops.items() if op.startswith("STG.E.128"))
    narrow = {op: n for op, n in ops.items() if op.startswith(("LDG.E.U16", "LDG.E.S16", "STG.E.U16"))}
    assert loads128 >= 4, ops  # the staging loop's 4 loads in flight, each 16 bytes
    assert stores128 >= 1, ops
    assert not narrow, ops     # no element-wise fp16/bf16 traffic left


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found")
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_one_runtime_division_per_cta(layout, tmp_path):
    """Geometry is compile-time: the only division by a run-time value left is the CTA's tile row
    (blockIdx.x / tiles_w); the staging and tap loops divide by constants only (before: 14 in NHWC)."""
    plan = dw_direct_plan(dw_geometry(144, 56, 3, 1, nhwc=layout == "nhwc"), torch.float16)
    sass = sass_of(_compile(specialize(plan.source, plan.defines).code, "90", str(tmp_path))[0])
    assert runtime_divisions(sass) == 1


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found")
def test_scalar_fallback_sass_is_what_the_check_would_catch(tmp_path):
    """C = 44 (not a multiple of 8): the planner picks the scalar path, whose SASS loads 16-bit elements."""
    plan = dw_direct_plan(dw_geometry(44, 28, 3, 1), torch.float16)
    assert plan.defines["DEPRUNE_VEC"] == 1
    ops = global_accesses(_compile(specialize(plan.source, plan.defines).code, "90", str(tmp_path))[0])
    assert any(op.startswith("LDG.E.U16") for op in ops), ops
    assert not any(op.startswith("LDG.E.128") for op in ops), ops
