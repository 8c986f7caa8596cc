"""cuda/dw_direct.cu run through the host emulation (g++), checked against F.conv2d on the masked weight.

The emulation compiles the very same .cu source the GPU runs, so these tests check the kernel's indexing,
halo tiles, tails, layouts, dtype conversions and epilogue. The tests both kernels share (every activation,
special geometries, exact rounding, and the mutations of the source that prove the comparison can fail) come
from ``kernel_cases.KernelEmulationTests`` (class ``TestDwDirect``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from kernel_cases import DTYPES, KernelEmulationTests, cases, check_case

from deprune_plugin.kernels import dw_direct, emulation_available
from deprune_plugin.kernels.formats import CompactTaps

_OK, _WHY = emulation_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"host emulation unavailable: {_WHY}")


# ---- property tests over random shapes ------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_matches_conv2d(case, dtype, layout):
    check_case("dw_direct", case, DTYPES[dtype], layout == "nhwc")


# ---- argument checking ----------------------------------------------------------------------------

def _taps(c=8, k=3):
    return CompactTaps.from_dense(torch.randn(c, 1, k, k))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: dw_direct(torch.randn(1, 9, 5, 5), _taps(), None, backend="emu"), ValueError, "channels"),
    (lambda: dw_direct(torch.randn(1, 8, 5, 5), _taps(), None, act="tanh", backend="emu"), ValueError, "act"),
    (lambda: dw_direct(torch.randn(1, 8, 5, 5).double(), _taps(), None, backend="emu"), TypeError, "x must"),
    (lambda: dw_direct(torch.randn(8, 5, 5), _taps(), None, backend="emu"), ValueError, "4-D"),
    (lambda: dw_direct(torch.randn(1, 8, 5, 5), _taps(), None, backend="opencl"), ValueError, "backend"),
    (lambda: dw_direct(torch.randn(1, 8, 5, 5), _taps(), None, backend="cupy"), ValueError, "CUDA"),
    (lambda: dw_direct(torch.randn(1, 8, 5, 5), _taps(), torch.zeros(7), backend="emu"), ValueError, "bias"),
    (lambda: dw_direct(torch.randn(1, 8, 5, 5), _taps(), torch.zeros(8).double(), backend="emu"), TypeError,
     "bias"),
    (lambda: dw_direct(torch.randn(1, 8, 5, 5), _taps(), torch.zeros(8, device="meta"), backend="emu"),
     ValueError, "bias is on meta"),
    (lambda: dw_direct(torch.randn(1, 8, 5, 5), _taps(), None, stride=0, backend="emu"), ValueError,
     "stride"),
    (lambda: dw_direct(torch.randn(1, 8, 5, 5), _taps(), None, padding=(1, -1), backend="emu"), ValueError,
     "padding"),
    (lambda: dw_direct(torch.randn(1, 8, 2, 2), _taps(), None, backend="emu"), ValueError, "empty output"),
    (lambda: dw_direct(torch.randn(1, 8, 5, 5), torch.randn(8, 1, 3, 3), None, backend="emu"), TypeError,
     "taps"),
])
def test_bad_arguments_raise(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_non_contiguous_input_is_accepted():
    x = torch.randn(1, 8, 12, 12)[:, :, ::2, ::2]
    taps = _taps()
    y = dw_direct(x, taps, None, padding=1, backend="emu")
    torch.testing.assert_close(y, F.conv2d(x, taps.to_dense(), None, 1, 1, groups=8), rtol=1e-5, atol=1e-5)


# ---- the tests both kernels share (kernel_cases.KernelEmulationTests) -------------------------------

class TestDwDirect(KernelEmulationTests):
    kernel = "dw_direct"
