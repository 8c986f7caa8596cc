"""cuda/dw_dr.cu (the paper's DR sub-GEMMs) run through the host emulation (g++), checked against F.conv2d.

Same property tests as the direct kernel (random shapes, C not a multiple of the group size, even and odd
kernels, strides, dilations, paddings, all-pruned channels and ranges, both layouts, three dtypes), plus
group-size / K-tile variants and the static shared memory planner checked against what the kernel declares.
The tests both kernels share (every activation, special geometries, exact rounding, and the mutations of the
source that prove the comparison can fail) come from ``kernel_cases.KernelEmulationTests`` (``TestDwDr``).
"""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from kernel_cases import DTYPES, KernelEmulationTests, cases, check_case

from deprune_plugin.kernels import dw_dr, emulation, emulation_available
from deprune_plugin.kernels.formats import DRColumns

dw_dr_module = importlib.import_module("deprune_plugin.kernels.dw_dr")  # the package's `dw_dr` is the function

_OK, _WHY = emulation_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"host emulation unavailable: {_WHY}")


# ---- property tests over random shapes ------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(max_c=48))
def test_matches_conv2d(case, dtype, layout):
    check_case("dw_dr", case, DTYPES[dtype], layout == "nhwc")


@pytest.mark.parametrize("group_size,tile,layout", [(16, 8, "nchw"), (16, 8, "nhwc"), (64, 16, "nhwc"),
                                                    (8, 32, "nchw")])
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(max_c=80))
def test_group_size_and_tile_variants(case, group_size, tile, layout):
    check_case("dw_dr", case, torch.float32, layout == "nhwc", group_size=group_size, tile=tile)


# ---- argument checking ----------------------------------------------------------------------------

def _cols(c=8, k=3, **kw):
    return DRColumns.from_dense(torch.randn(c, 1, k, k), **kw)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: dw_dr(torch.randn(1, 9, 5, 5), _cols(), None, backend="emu"), ValueError, "channels"),
    (lambda: dw_dr(torch.randn(1, 8, 5, 5), _cols(), None, act="tanh", backend="emu"), ValueError, "act"),
    (lambda: dw_dr(torch.randn(1, 8, 5, 5).to(torch.int32), _cols(), None, backend="emu"), TypeError,
     "x must"),
    (lambda: dw_dr(torch.randn(1, 8, 5, 5), _cols(), None, backend="cupy"), ValueError, "CUDA"),
    (lambda: dw_dr(torch.randn(1, 8, 5, 5), _cols(), torch.zeros(8, 1), backend="emu"), ValueError, "bias"),
    (lambda: dw_dr(torch.randn(1, 8, 5, 5), _cols(), None, dilation=(1, 0), backend="emu"), ValueError,
     "dilation"),
    (lambda: dw_dr(torch.randn(1, 8, 5, 5), _cols(group_size=256), None, backend="emu"), ValueError,
     "group_size"),
    (lambda: dw_dr(torch.randn(1, 8, 5, 5), None, None, backend="emu"), TypeError, "cols"),
])
def test_bad_arguments_raise(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- the static shared memory planner agrees with the kernel ---------------------------------------

# (group_size, dtype, layout, PT): both paths (fp32: CUDA cores, fp16/bf16: tensor cores), group sizes that are
# and are not multiples of the 16-row MMA tile, the largest group (128 rows, 64 positions per CTA), and the
# positions per CTA the planner picks for a small input (64: the most CTAs) or larger ones (forced).
SMEM_CONFIGS = [(32, "fp32", "nchw", None), (32, "fp16", "nhwc", None), (8, "fp32", "nchw", None),
                (8, "fp16", "nhwc", None), (40, "fp16", "nchw", None), (128, "bf16", "nhwc", None),
                (64, "fp32", "nhwc", None), (32, "fp16", "nhwc", 256), (32, "fp32", "nchw", 128)]


def declared_static_smem(group_size: int, dtype: str, layout: str, pt: int | None = None) -> tuple[int, int]:
    """``(static shared memory, PT)`` of the kernel ``dw_dr`` launches for such columns, as declared by the
    emulated build: the sum of the ``sizeof`` of its ``__shared__`` arrays (read from the built library, never
    retyped); ``pt``: force that many positions per CTA (default: the planner's)."""
    x = torch.randn(1, 8, 5, 5).to(DTYPES[dtype])
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    cols = DRColumns.from_dense(torch.randn(8, 1, 3, 3), group_size=group_size)
    real = dw_dr_module.dr_plan_positions
    if pt is not None:
        dw_dr_module.dr_plan_positions = lambda *a, **k: (pt, real(*a, **k)[1])
    try:
        with emulation.record_launches() as launches:
            dw_dr(x, cols, None, padding=1, backend="emu")
    finally:
        dw_dr_module.dr_plan_positions = real
    (launch,) = launches
    assert launch.entry == "deprune_dw_dr" and launch.dynamic_smem == 0
    assert {name.split("::")[-1] for name in launch.shared_arrays} >= {"s_buf", "s_py", "s_dy"}, launch.shared_arrays
    launched_pt = int(dict(launch.defines)["DEPRUNE_DR_PT"])
    assert pt is None or launched_pt == pt
    return launch.static_smem, launched_pt


def planner_disagreements() -> list[str]:
    """One line per configuration where ``dr_static_smem_bytes`` (looked up at call time, so a test can
    replace it) differs from what the kernel declares."""
    out = []
    for gs, dtype, layout, pt in SMEM_CONFIGS:
        tensor_cores = dtype != "fp32"
        declared, launched_pt = declared_static_smem(gs, dtype, layout, pt)
        planned = dw_dr_module.dr_static_smem_bytes(gs, tensor_cores, launched_pt)
        if planned != declared:
            out.append(f"group_size={gs} {dtype} PT={launched_pt}: planner {planned} bytes, kernel declares "
                       f"{declared}")
    return out


def test_static_smem_planner_matches_the_kernel():
    assert planner_disagreements() == []


_PLANNED = dw_dr_module.dr_static_smem_bytes
_PT = dw_dr_module.dr_positions_per_cta


def _rows(gs: int) -> int:
    return -(-gs // 16) * 16


@pytest.mark.parametrize("wrong", [
    # sizes the X tile as the fp32 [column][position] tile on both paths (wrong where it outgrows the output
    # tile: 16-row ranges)
    lambda gs, tc, pt=None: 4 * (max(32 * ((pt or _PT(gs)) + 1), _rows(gs) * ((pt or _PT(gs)) + 1))
                                 + 2 * (pt or _PT(gs)) + 7 * 32),
    # does not round the rows up to whole 16-row MMA tiles
    lambda gs, tc, pt=None: _PLANNED(gs, tc, pt) - 4 * (_rows(gs) - gs) * ((pt or _PT(gs)) + 1),
    # sizes every CTA for the largest PT, whatever the plan launches
    lambda gs, tc, pt=None: _PLANNED(gs, tc),
], ids=["x-tile-layout", "no-row-rounding", "largest-pt-always"])
def test_wrong_static_smem_planner_is_caught(monkeypatch, wrong):
    monkeypatch.setattr(dw_dr_module, "dr_static_smem_bytes", wrong)
    assert planner_disagreements()


# ---- the tests both kernels share (kernel_cases.KernelEmulationTests) -------------------------------

class TestDwDr(KernelEmulationTests):
    kernel = "dw_dr"
