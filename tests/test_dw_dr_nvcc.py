"""cuda/dw_dr.cu compiled by nvcc to SASS, as its launch plans specialise it: the fp16/bf16 kernels run on tensor
cores (HMMA instructions in the SASS of sm_80 and sm_90), ptxas reports no spills, the fp32 kernel and the
fp16 kernel built for sm_75 (the CUDA-core fallback) contain none.

No GPU is needed: ``nvcc -cubin`` and ``cuobjdump -sass`` (CUDA toolkit, or the copy the triton wheel ships).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from deprune_plugin.kernels.dw_dr import dw_dr_plan
from deprune_plugin.kernels.launch import ConvGeometry
from deprune_plugin.kernels.report import ptxas_local_memory, sass_local_instrs
from deprune_plugin.kernels.sources import specialize

NVCC = shutil.which("nvcc")


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    bases = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bases.append(str(Path(spec.origin).parent / "backends" / "nvidia"))
    for base in filter(None, bases):
        path = Path(base) / "bin" / "cuobjdump"
        if path.is_file():
            return str(path)
    return None


CUOBJDUMP = _cuobjdump()
pytestmark = [pytest.mark.nvcc,
              pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH"),
              pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found (CUDA toolkit or triton wheel)")]

# MobileNetV2's 144-channel 56x56 layer (K' = 64 per range at 78%) at batch 32, and a stride-2 5x5 layer.
LAYERS = {
    "3x3s1": (ConvGeometry(32, 144, 56, 56, 56, 56, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, True), [64, 64, 64, 64, 32]),
    "5x5s2-nchw": (ConvGeometry(32, 240, 28, 28, 14, 14, 5, 5, 2, 2, (2, 2, 2, 2), 1, 1, False), [144] * 7 + [72]),
}


def compile_sass(tmp_path: Path, defines: dict, arch: str) -> tuple[str, str]:
    """``(ptxas -v log, SASS)`` of ``dw_dr.cu`` specialised with ``defines`` for ``sm_<arch>``."""
    src = specialize("dw_dr.cu", defines)
    cu = tmp_path / f"dw_dr_{arch}.cu"
    cu.write_text(src.code)
    cubin = tmp_path / f"dw_dr_{arch}.cubin"
    cmd = [NVCC, "-std=c++17", "-cubin", f"-arch=sm_{arch}", "-Xptxas", "-v", "-o", str(cubin), str(cu)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    sass = subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return proc.stdout + proc.stderr, sass


def hmma_count(sass: str) -> int:
    return len(re.findall(r"\bHMMA\.16816\.F32", sass))


def spills(log: str) -> list[tuple[int, int, int]]:
    """``(stack frame, spill store, spill load)`` bytes per function in a ``-Xptxas -v`` log: a run-time indexed
    array lives in the stack frame with 0 spill bytes, so a clean kernel has all three 0."""
    return list(ptxas_local_memory(log).values())


@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_tensor_core_kernel_has_hmma_and_no_spills(tmp_path, layer, dtype, arch):
    g, kept = LAYERS[layer]
    plan = dw_dr_plan(g, dtype, kept)
    assert plan.tensor_cores
    log, sass = compile_sass(tmp_path, plan.defines, arch)
    # two MMAs (hi and lo weight) per m16 x n8 tile of a warp per K step: 2 m-tiles x 4 n-tiles for 32 channels
    assert hmma_count(sass) >= 16, sass[:2000]
    found = spills(log)
    assert found and all(s == (0, 0, 0) for s in found), log
    assert sass_local_instrs(sass) == 0, "LDL/STL in the SASS"
    registers = re.findall(r"Used (\d+) registers", log)
    print(f"{layer} {dtype} sm_{arch}: {registers} registers, {hmma_count(sass)} HMMA")


@pytest.mark.parametrize("arch", ["80", "90"])
def test_fp32_kernel_runs_on_cuda_cores(tmp_path, arch):
    g, kept = LAYERS["3x3s1"]
    plan = dw_dr_plan(g, torch.float32, kept)
    assert not plan.tensor_cores
    log, sass = compile_sass(tmp_path, plan.defines, arch)
    assert hmma_count(sass) == 0 and "FFMA" in sass
    assert all(s == (0, 0, 0) for s in spills(log)), log
    assert sass_local_instrs(sass) == 0, "LDL/STL in the SASS"


def test_fp16_kernel_for_sm75_is_the_cuda_core_fallback(tmp_path):
    """The same fp16 specialisation compiled for a GPU without mma.sync m16n8k16 (sm_75) takes the fallback."""
    g, kept = LAYERS["3x3s1"]
    plan = dw_dr_plan(g, torch.float16, kept)
    log, sass = compile_sass(tmp_path, plan.defines, "75")
    assert hmma_count(sass) == 0 and "FFMA" in sass
    assert all(s == (0, 0, 0) for s in spills(log)), log
    assert sass_local_instrs(sass) == 0, "LDL/STL in the SASS"
