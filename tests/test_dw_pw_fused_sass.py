"""What the compiler makes of cuda/dw_pw_fused.cu (nvcc + cuobjdump, no GPU): the 1x1 GEMM on tensor cores
(``HMMA.16816``) from sm_80, on CUDA cores before (sm_75) and for fp32; 128-bit loads of the input; no spills
for the plans of MobileNetV2's pairs at batch 32 (fp16) and in fp32."""
from __future__ import annotations

import pytest
import torch

from deprune_plugin.kernels.dw_pw_fused import ENTRY, SOURCE, dw_pw_fused_defines, dw_pw_fused_plan
from deprune_plugin.kernels.launch import ConvGeometry
from deprune_plugin.kernels.report import analyze_sass, compile_stats, find_tool
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
    assert ss.global_load_bits == 128 and cs.spill_bytes == 0


def test_fp32_runs_on_cuda_cores():
    cs, ss = _stats(dw_pw_fused_defines(torch.float32), "sm_90")
    assert not ss.tensor_cores and "FFMA" in cs.sass and cs.spill_bytes == 0


# (C, H, stride, 1x1 outputs after 50% PW pruning): MobileNetV2's pair shapes at 224x224
MBV2_PAIRS = [(32, 112, 1, 8), (96, 112, 2, 12), (144, 56, 1, 12), (144, 56, 2, 16), (192, 28, 1, 16),
              (192, 28, 2, 32), (384, 14, 1, 32), (384, 14, 1, 48), (576, 14, 1, 48), (576, 14, 2, 80),
              (960, 7, 1, 80), (960, 7, 1, 160)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_mobilenetv2_pair_plans_do_not_spill(dtype):
    spills = {}
    for c, h, s, co in MBV2_PAIRS:
        oh = (h - 1) // s + 1
        g = ConvGeometry(32, c, h, h, oh, oh, 3, 3, s, s, (1, 1, 1, 1), 1, 1, True)
        plan = dw_pw_fused_plan(g, co, dtype, smem_limit=227 * 1024, residual=s == 1, act="relu6")
        cs, _ = _stats(dict(plan.defines), "sm_90")
        if cs.spill_bytes:
            spills[(c, h, s, co)] = (cs.registers, cs.spill_bytes)
    assert spills == {}
