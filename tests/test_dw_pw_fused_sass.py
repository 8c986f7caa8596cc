"""What the compiler makes of cuda/dw_pw_fused.cu (nvcc + cuobjdump, no GPU): the 1x1 GEMM on tensor cores
(``HMMA.16816``) from sm_80, on CUDA cores before (sm_75) and for fp32; 128-bit loads of the input; no local
memory (no spills, no stack frame, no LDL/STL in the SASS) for the plans of MobileNetV2's pairs at batch 1 and
32, fp16/bf16/fp32, sm_80 and sm_90."""
from __future__ import annotations

import pytest
import torch

from deprune_plugin.kernels.dw_pw_fused import ENTRY, SOURCE, dw_pw_fused_defines, dw_pw_fused_plan
from deprune_plugin.kernels.launch import ConvGeometry
from deprune_plugin.kernels.report import (CompileStats, analyze_sass, compile_stats, find_tool, ptxas_local_memory,
                                           sass_local_instrs)
from deprune_plugin.kernels.sources import specialize

TOOLS = find_tool("nvcc") is not None and find_tool("cuobjdump") is not None
pytestmark = [pytest.mark.nvcc, pytest.mark.skipif(not TOOLS, reason="nvcc or cuobjdump not found")]
PARAM_BASE = {"sm_75": 0x160, "sm_80": 0x160, "sm_90": 0x210}  # constant-bank offset of the first parameter


def _stats(defines: dict, arch: str):
    cs = compile_stats(specialize(SOURCE, defines).code, ENTRY, arch)
    return cs, analyze_sass(cs.sass, 16 if "half" in str(defines["DEPRUNE_SCALAR"]) or "bfloat" in str(
        defines["DEPRUNE_SCALAR"]) else 32, PARAM_BASE[arch])


@pytest.mark.parametrize("arch, tensor_cores", [("sm_90", True), ("sm_80", True), ("sm_75", False)])
def test_tensor_cores_from_sm80_and_128_bit_input_loads(arch, tensor_cores):
    cs, ss = _stats(dw_pw_fused_defines(torch.float16), arch)
    assert ss.tensor_cores == tensor_cores
    assert ("HMMA.16816.F32" in cs.sass) == tensor_cores
    assert ss.global_load_bits == 128 and not cs.local_memory


def test_fp32_runs_on_cuda_cores():
    cs, ss = _stats(dw_pw_fused_defines(torch.float32), "sm_90")
    assert not ss.tensor_cores and "FFMA" in cs.sass and not cs.local_memory


# (C, H, stride, 1x1 outputs after 50% PW pruning): MobileNetV2's pair shapes at 224x224
MBV2_PAIRS = [(32, 112, 1, 8), (96, 112, 2, 12), (144, 56, 1, 12), (144, 56, 2, 16), (192, 28, 1, 16),
              (192, 28, 2, 32), (384, 14, 1, 32), (384, 14, 1, 48), (576, 14, 1, 48), (576, 14, 2, 80),
              (960, 7, 1, 80), (960, 7, 1, 160)]


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_mobilenetv2_pair_plans_keep_everything_in_registers(dtype, arch):
    """Spill bytes alone miss an array indexed at run time (e.g. the accumulators in a rolled loop): ptxas puts
    it in the stack frame, reports 0 spill bytes, and the SASS reads and writes it with LDL/STL every chunk."""
    local, seen = {}, set()
    for n in (1, 32):
        for c, h, s, co in MBV2_PAIRS:
            oh = (h - 1) // s + 1
            g = ConvGeometry(n, c, h, h, oh, oh, 3, 3, s, s, (1, 1, 1, 1), 1, 1, True)
            plan = dw_pw_fused_plan(g, co, dtype, smem_limit=227 * 1024, residual=s == 1, act="relu6")
            key = tuple(sorted(plan.defines.items()))
            if key in seen:
                continue
            seen.add(key)
            cs, _ = _stats(dict(plan.defines), arch)
            if cs.local_memory:
                local[(n, c, h, s, co)] = (cs.registers, cs.stack_bytes, cs.spill_bytes, cs.local_instrs)
    assert local == {}  # (batch, C, H, stride, CO): (registers, stack frame, spill bytes, LDL/STL)


def test_local_memory_is_read_from_ptxas_and_the_sass():
    """The parsers the no-spill checks rely on, on the output of a kernel with a stack frame and no spills."""
    log = ("ptxas info    : Function properties for deprune_dw_pw_fused\n"
           "    96 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    assert ptxas_local_memory(log) == {"deprune_dw_pw_fused": (96, 0, 0)}
    sass = ("        /*4c50*/                   LDL.LU R2, [R1] ;\n"
            "        /*0370*/                   STL.128 [R1+0x10], R60 ;\n"
            "        /*0380*/               @P0 STL [R1], R60 ;\n"
            "        /*0390*/                   LDG.E.128 R4, desc[UR4][R2.64] ;\n")
    assert sass_local_instrs(sass) == 3
    assert CompileStats(64, 0, 0, sass, 96, 3).local_memory and not CompileStats(64, 0, 0, "", 0, 0).local_memory
