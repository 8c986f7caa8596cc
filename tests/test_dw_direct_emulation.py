"""cuda/dw_direct.cu run through the host emulation (g++), checked against F.conv2d on the masked weight.

The emulation compiles the very same .cu source the GPU runs, so these tests check the kernel's indexing,
halo tiles, tails, layouts, dtype conversions and epilogue. The tests both kernels share (every activation,
special geometries, exact rounding, and the mutations of the source that prove the comparison can fail) come
from ``kernel_cases.KernelEmulationTests`` (class ``TestDwDirect``).
"""
from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from kernel_cases import (ACT_FNS, DTYPES, Case, KernelEmulationTests, assert_matches, cases, check_case,
                          reference, same_pads)
from test_emulation_checks import needs_sanitizer, run_sanitized

from deprune_plugin.kernels import dw_direct, emulation, emulation_available
from deprune_plugin.kernels.formats import CompactTaps

_OK, _WHY = emulation_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"host emulation unavailable: {_WHY}")


# ---- property tests over random shapes ------------------------------------------------------------

# Every shape is its own compile-time specialisation (window, stride, dilation, tile are #defines), i.e. one
# g++ build each: 12 examples per dtype and layout; the fuzz sample (test_emulation_fuzz.py) adds 40 more.
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_matches_conv2d(case, dtype, layout):
    check_case("dw_direct", case, DTYPES[dtype], layout == "nhwc")


# ---- 16-byte vector path and scalar fallback -------------------------------------------------------------

def _launched_vec(x, taps, bias, **conv) -> tuple[torch.Tensor, int]:
    """Run dw_direct in the emulation; ``(y, DEPRUNE_VEC of the launch)``."""
    with emulation.record_launches() as launches:
        y = dw_direct(x, taps, bias, backend="emu", **conv)
    (launch,) = launches
    return y, int(dict(launch.defines)["DEPRUNE_VEC"])


def _offset_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` (channels_last) copied into a storage at a 1-element offset: same values, pointer not 16-byte
    aligned."""
    n, c, h, w = x.shape
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    view = buf[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    view.copy_(x)
    assert view.is_contiguous(memory_format=torch.channels_last) and view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("dtype,c,misalign,vec", [
    ("fp16", 48, False, 8), ("bf16", 48, False, 8), ("fp32", 48, False, 4),
    ("fp16", 44, False, 1), ("bf16", 21, False, 1), ("fp32", 42, False, 1),  # C not a multiple of the vector
    ("fp16", 48, True, 1), ("fp32", 48, True, 1),                             # storage offset: misaligned
])
@pytest.mark.parametrize("kernel,stride,dil", [(3, 1, 1), (5, 2, 1), (3, 1, 2)])
def test_vector_and_scalar_paths(dtype, c, misalign, vec, kernel, stride, dil):
    """channels_last takes 16-byte channel vectors exactly when C allows and the pointers are aligned, and
    both paths match F.conv2d (partly and fully pruned channels, bias, activation)."""
    dt = DTYPES[dtype]
    pad = dil * (kernel // 2)
    case = Case(2, c, 13, 11, (kernel, kernel), (stride, stride), (pad, pad), (dil, dil), 0.5, 2, "relu6", True,
                seed=c + kernel)
    x, weight, mask, bias = case.tensors(dt, True)
    if misalign:
        x = _offset_view(x)
    taps = CompactTaps.from_dense(weight, mask)
    y, launched = _launched_vec(x, taps, bias, stride=case.stride, padding=case.padding, dilation=case.dilation,
                                act=case.act)
    assert launched == vec
    assert_matches(y, reference(x, taps.to_dense(), bias, case), dt, True, case)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("c,size,kernel,stride", [
    (32, 28, 3, 1), (24, 28, 3, 2), (40, 14, 5, 1), (48, 14, 5, 2),   # MobileNetV2 / EfficientNet-B0 kinds
])
def test_mobilenet_like_layers(dtype, c, size, kernel, stride):
    """SAME-padded DW layers of the kinds MobileNetV2 and EfficientNet-B0 have (channel counts cut down so
    the emulation stays quick), 78% of taps pruned, vector path, SiLU epilogue."""
    dt = DTYPES[dtype]
    pads = (*same_pads(size, kernel, stride, 1), *same_pads(size, kernel, stride, 1))
    case = Case(2, c, size, size, (kernel, kernel), (stride, stride), pads, (1, 1), 0.22, 1, "silu", True,
                seed=size + c)
    x, weight, mask, bias = case.tensors(dt, True)
    taps = CompactTaps.from_dense(weight, mask)
    y, launched = _launched_vec(x, taps, bias, stride=case.stride, padding=case.padding, act=case.act)
    assert launched == 8
    assert_matches(y, reference(x, taps.to_dense(), bias, case), dt, True, case)


def test_a_tap_kept_by_one_channel_of_a_vector_is_not_skipped():
    """Each of 8 channels (one vector) keeps a different single tap: the vector's mask is their union, and
    every channel still gets only its own tap (the others' weights are zero for it)."""
    c = 8
    weight = torch.randn(c, 1, 3, 3)
    mask = torch.zeros(c, 1, 3, 3, dtype=torch.bool)
    for ch in range(c):
        mask[ch, 0, ch // 3, ch % 3] = True
    case = Case(1, c, 6, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, 0, "identity", False, seed=0)
    x = torch.randn(1, c, 6, 7).to(memory_format=torch.channels_last)
    taps = CompactTaps.from_dense(weight, mask)
    y, launched = _launched_vec(x, taps, None, padding=1)
    assert launched == 4  # fp32: 4 channels per vector, two vectors
    torch.testing.assert_close(y, reference(x, weight * mask, None, case), rtol=1e-5, atol=1e-5)


# The shared fuzz stream (kernel_cases.fuzz_shapes) draws mostly odd channel counts, i.e. the scalar path: this
# stream draws channels_last shapes whose C is a multiple of 8, so they take the 16-byte vector path.
VECTOR_FUZZ_SHAPES = int(os.environ.get("DEPRUNE_FUZZ_SHAPES", 1000))


def vector_cases(count: int, seed: int = 20261204) -> list[tuple[Case, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        k = rng.choice([3, 3, 5, 7])
        s, d = rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
        h = rng.randint(4, 30)
        w = max(1, h + rng.randint(-3, 3))
        if rng.random() < 0.5:
            pads = (*same_pads(h, k, s, d), *same_pads(w, k, s, d))
        else:
            pads = (d * (k // 2),) * 4  # output h x w at stride 1: never empty
        case = Case(rng.choice([1, 2]), 8 * rng.randint(1, 12), h, w, (k, k), (s, s),
                    pads, (d, d), rng.choice([0.2, 0.5, 1.0]), rng.randint(0, 3), rng.choice(sorted(ACT_FNS)),
                    rng.random() < 0.7, seed=rng.randrange(2**31))
        out.append((case, rng.choice(["fp16", "bf16", "fp32"])))
    return out


def _run_vector_cases(cases_: list[tuple[Case, str]]) -> None:
    for case, dtype in cases_:
        dt = DTYPES[dtype]
        x, weight, mask, bias = case.tensors(dt, True)
        taps = CompactTaps.from_dense(weight, mask)
        y, launched = _launched_vec(x, taps, bias, stride=case.stride, padding=case.padding,
                                    dilation=case.dilation, act=case.act)
        assert launched == 16 // x.element_size(), case
        assert_matches(y, reference(x, weight * mask, bias, case), dt, True, (case, dtype))


def test_vector_path_sample():
    _run_vector_cases(vector_cases(12))


@pytest.mark.fuzz
def test_vector_path_fuzz():
    _run_vector_cases(vector_cases(VECTOR_FUZZ_SHAPES))


@needs_sanitizer
def test_vector_path_runs_clean_under_sanitizers(tmp_path):
    """Three vector-path shapes (fp16, bf16, fp32) in ASan + UBSan builds: every 16-byte access in bounds."""
    result = run_sanitized("""
    from deprune_plugin.kernels import emulation
    from test_dw_direct_emulation import _run_vector_cases, vector_cases
    assert emulation.asan_runtime_loaded() and emulation.sanitize_requested()
    picked = {}
    for case, dtype in vector_cases(40):
        picked.setdefault(dtype, (case, dtype))
    _run_vector_cases(list(picked.values()))
    print("done", sorted(picked))
    """, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "done ['bf16', 'fp16', 'fp32']" in result.stdout, result.stdout


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
