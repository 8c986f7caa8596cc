"""Launches fill the GPU where the problem allows it, and the static time model charges launches that do not.

- the planners (direct, DR, fused) launch at least ``min(SMs, allowed)`` CTAs, ``allowed`` the most CTAs any
  plan the kernel supports launches for the call (:func:`deprune_plugin.kernels.plan.fill_target`);
- the report's model scales its whole-GPU throughput terms by the grid's fill: a 1-CTA launch gets 1/SMs of
  the copy bandwidth (:func:`deprune_plugin.kernels.report.grid_occupancy`).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import replace

import pytest
import torch

from deprune_plugin.kernels import report
from deprune_plugin.kernels.launch import ConvGeometry
from deprune_plugin.kernels.plan import DEFAULT_SMS, GPU_SMS, KernelPlan, fill_target
from deprune_plugin.kernels.report import ARCHS, SassStats, grid_occupancy, kernel_plan

# the launcher modules (the package re-exports their functions under the same names)
dr_mod = importlib.import_module("deprune_plugin.kernels.dw_dr")
fused_mod = importlib.import_module("deprune_plugin.kernels.dw_pw_fused")


def _g(n: int, c: int, h: int, stride: int = 1) -> ConvGeometry:
    oh = (h + 2 - 3) // stride + 1
    return ConvGeometry(n, c, h, h, oh, oh, 3, 3, stride, stride, (1, 1, 1, 1), 1, 1, True)


def test_sm_counts_are_the_datasheets_and_the_report_uses_them():
    assert GPU_SMS == {"sm_80": 108, "sm_90": 132} and DEFAULT_SMS == 132
    assert {a: ARCHS[a].sms for a in GPU_SMS} == GPU_SMS
    assert fill_target(30, 132) == 30 and fill_target(5000, 132) == 132 and fill_target(5000, 108) == 108


def test_dr_positions_per_cta_shrink_until_the_grid_fills():
    # 7x7, 960 channels, batch 1: 30 ranges, one 64-position block each: 30 CTAs are all the problem allows
    assert dr_mod.dr_plan_positions(49, 30, 1, 32) == (64, 30)
    # 14x14, 192 channels (6 ranges), batch 1: PT 64 gives 4 x 6 = 24 CTAs, PT 256 only 6
    assert dr_mod.dr_plan_positions(196, 6, 1, 32) == (64, 24)
    # batch 32: 6 x 32 = 192 CTAs already at PT 256
    assert dr_mod.dr_plan_positions(196, 6, 32, 32) == (256, 768)
    # 28x28, 144 channels (5 ranges), batch 1: PT 128 gives 7 x 5 = 35 < 132, PT 64 13 x 5 = 65
    assert dr_mod.dr_plan_positions(784, 5, 1, 32)[0] == 64
    # 128-channel ranges allow PT 64 only
    assert dr_mod.dr_pt_options(128) == (64,) and dr_mod.dr_pt_options(32) == (256, 128, 64)
    plan = dr_mod.dw_dr_plan(_g(1, 960, 7), torch.float16, [64] * 30)
    assert plan.grid == (1, 30, 1) and plan.defines["DEPRUNE_DR_PT"] == 64
    assert plan.extra["static_smem_bytes"] == dr_mod.dr_static_smem_bytes(32, True, 64)


def test_fused_allowed_ctas_of_a_14x14_pair_at_batch_1():
    """192 channels, 28x28 -> 14x14 (stride 2), 64 outputs, fp16 on tensor cores (<= 16 accumulators per
    thread): an m16 tile per warp needs whole n8 tiles, 8 per CTA. P = 16 pixels (14 tiles) takes COB 64 (one
    block): 14 CTAs; P = 32 (8 tiles of 4x8) COB 32: 16; P = 64 (4 tiles) COB 16: 16; P = 128 (2 tiles) COB 8:
    16. So 16 CTAs is all the kernel allows, and the plan launches them (one CTA before)."""
    plan = fused_mod.dw_pw_fused_plan(_g(1, 192, 28, 2), 64, torch.float16)
    assert plan.extra["allowed_ctas"] == 16 and plan.ctas == 16


def test_fused_7x7_pair_at_batch_32_fills_132_sms():
    """960 channels at 7x7, 96 outputs, batch 32: two 4x8 tiles per image (64 CTAs) left 68 of 132 SMs idle."""
    g = _g(32, 960, 7)
    plan = fused_mod.dw_pw_fused_plan(g, 96, torch.float16)
    assert plan.ctas >= 132 <= plan.extra["allowed_ctas"]
    assert fused_mod.dw_pw_fused_plan(g, 96, torch.float16, sms=64).ctas >= 64
    a100 = fused_mod.dw_pw_fused_plan(g, 96, torch.float16, sms=108)
    assert a100.ctas >= 108


# ---- every plan of the zoo ----------------------------------------------------------------------------

ZOO = {"mobilenetv2_100": (1, 32), "efficientnet_b0": (1, 32), "convnext_tiny": (1, 32)}


@pytest.fixture(scope="module")
def zoo_layers():
    from test_nvrtc_zoo import _layers  # the layers the NVRTC zoo compiles (timm, random init, 224x224)

    return {m: _layers(m) for m in ZOO}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_zoo_plan_fills_the_gpu_where_the_problem_allows(zoo_layers, arch):
    a = ARCHS[arch]
    short, checked = [], 0
    for model, batches in ZOO.items():
        for n in batches:
            for layer in zoo_layers[model]:
                layer = replace(layer, geometry=replace(layer.geometry, n=n))
                g = layer.geometry
                for kernel in ("direct", "dr") + (("fused",) if layer.pw_out else ()):
                    for dtype in (torch.float16, torch.float32):
                        plan = kernel_plan(kernel, layer, dtype, a)
                        allowed = plan.extra["allowed_ctas"]
                        if kernel == "dr":  # independent: 64 positions per CTA, 32-channel ranges
                            assert allowed == math.ceil(g.oh * g.ow / 64) * math.ceil(g.c / 32) * n
                        assert plan.ctas <= allowed
                        checked += 1
                        if plan.ctas < min(a.sms, allowed):
                            short.append(f"{model}-b{n}:{layer.name}/{kernel}/{dtype}: {plan.ctas} CTAs of "
                                         f"{allowed}")
    assert checked > 200 and short == []


# ---- the time model -----------------------------------------------------------------------------------

def _stats() -> SassStats:
    return SassStats(instructions=100, global_load_bits=128, staging_load_bits=128, staging_instructions=10,
                     staging_elements=64.0, staging_loads=4, staging_load_bytes_per_warp=2048, mac_instructions=10,
                     macs_per_warp_iteration=1024, lds_cycles_per_iteration=4.0, tensor_cores=False, loops=2)


def _plan(grid: tuple[int, int, int], moved: int = 64 << 20) -> KernelPlan:
    return KernelPlan("direct", "dw_direct.cu", "deprune_dw_direct", {}, grid, (256, 1, 1), 0, moved // 2,
                      moved // 2, moved)


def test_grid_occupancy_counts_waves_and_idle_sms():
    a = ARCHS["sm_90"]
    assert grid_occupancy(a, 1, 2) == {"waves": 1, "grid_factor": 132.0}
    assert grid_occupancy(a, 132, 2) == {"waves": 1, "grid_factor": 1.0}
    assert grid_occupancy(a, 264, 2) == {"waves": 1, "grid_factor": 1.0}
    assert grid_occupancy(a, 265, 2)["waves"] == 2
    assert grid_occupancy(a, 133, 2)["grid_factor"] == pytest.approx(264 / 133)
    assert grid_occupancy(ARCHS["sm_80"], 54, 1) == {"waves": 1, "grid_factor": 2.0}
    with pytest.raises(ValueError):
        grid_occupancy(a, 0, 2)


def test_a_one_cta_launch_is_modelled_slower_than_the_same_bytes_over_a_full_grid():
    a = ARCHS["sm_90"]
    occ = report.occupancy(a, 256, 64, 16 << 10)
    full = report._model(a, _plan((132, 1, 1)), _stats(), occ, 1 << 20, 2, 64 << 20, False)
    one = report._model(a, _plan((1, 1, 1)), _stats(), occ, 1 << 20, 2, 64 << 20, False)
    assert (full["ctas"], full["waves"], one["ctas"], one["waves"]) == (132, 1, 1, 1)
    assert one["t_mem_us"] == pytest.approx(132 * full["t_mem_us"])
    assert one["modelled_us"] > 50 * full["modelled_us"]
    # 64 CTAs (the old 7x7 pairs at batch 32) cost about twice a full grid
    half = report._model(a, _plan((64, 1, 1)), _stats(), occ, 1 << 20, 2, 64 << 20, False)
    assert half["t_mem_us"] == pytest.approx(132 / 64 * full["t_mem_us"])
