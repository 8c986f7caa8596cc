"""cuda/dw_direct.cu run through the host emulation (g++), checked against F.conv2d on the masked weight.

The emulation compiles the very same .cu source the GPU runs, so these tests check the kernel's indexing,
halo tiles, tails, layouts, dtype conversions and epilogue. The mutation tests at the end prove that an
indexing bug in the kernel source makes the comparison fail.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deprune_plugin.kernels.formats import CompactTaps
from deprune_plugin.kernels import ACTIVATIONS, dw_direct, emulation_available
from deprune_plugin.kernels.sources import EMULATION_HEADER, cuda_dir

_OK, _WHY = emulation_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"host emulation unavailable: {_WHY}")

ACT_FNS = {"identity": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu,
           "hardswish": F.hardswish, "gelu": F.gelu}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KERNEL_SIZES = [1, 2, 3, 4, 5, 7]


@dataclass
class Case:
    n: int
    c: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    density: float
    pruned_channels: int
    act: str
    with_bias: bool
    seed: int

    def tensors(self, dtype: torch.dtype, channels_last: bool):
        """``(x, weight [C,1,kh,kw], mask, bias)``; x in ``dtype`` and the requested memory format."""
        g = torch.Generator().manual_seed(self.seed)
        kh, kw = self.kernel
        x = torch.randn(self.n, self.c, self.h, self.w, generator=g).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        weight = torch.randn(self.c, 1, kh, kw, generator=g)
        mask = torch.rand(self.c, 1, kh, kw, generator=g) < self.density
        mask[torch.randperm(self.c, generator=g)[: self.pruned_channels]] = False  # all-pruned channels
        bias = torch.randn(self.c, generator=g) if self.with_bias else None
        return x, weight, mask, bias


@st.composite
def cases(draw, max_c: int = 70) -> Case:
    c = draw(st.integers(1, max_c).filter(lambda v: v % 32 != 0))
    kh = draw(st.sampled_from(KERNEL_SIZES))
    kw = draw(st.sampled_from([kh, kh, *KERNEL_SIZES]))  # mostly square, sometimes not
    sh, sw = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    dh, dw = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    ph, pw = draw(st.integers(0, kh)), draw(st.integers(0, kw))
    h_min = max(1, dh * (kh - 1) + 1 - 2 * ph)
    w_min = max(1, dw * (kw - 1) + 1 - 2 * pw)
    return Case(
        n=draw(st.integers(1, 3)), c=c,
        h=draw(st.integers(h_min, h_min + 9)), w=draw(st.integers(w_min, w_min + 9)),
        kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
        density=draw(st.sampled_from([0.0, 0.3, 0.6, 1.0])), pruned_channels=draw(st.integers(0, min(3, c))),
        act=draw(st.sampled_from(sorted(ACTIVATIONS))), with_bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def reference(x, weight, bias, case: Case) -> torch.Tensor:
    """act(F.conv2d) in float32 on the masked weight (x upcast exactly; NCHW because CPU float64 and
    channels_last dilated convs hit a very slow path)."""
    y = F.conv2d(x.float().contiguous(), weight, bias, case.stride, case.padding, case.dilation,
                 groups=x.shape[1])
    return ACT_FNS[case.act](y)


def matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    # compare against the reference rounded once to the storage dtype (fp32 accumulation in the kernel)
    return torch.allclose(y.float(), ref.to(dtype).float(), rtol=1e-2, atol=1e-2)


def run_case(case: Case, dtype: torch.dtype, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, weight, mask, bias = case.tensors(dtype, channels_last)
    taps = CompactTaps.from_dense(weight, mask)
    y = dw_direct(x, taps, bias, stride=case.stride, padding=case.padding, dilation=case.dilation,
                  act=case.act, backend="emu")
    return y, reference(x, taps.to_dense(), bias, case)


def check_case(case: Case, dtype: torch.dtype, channels_last: bool) -> None:
    y, ref = run_case(case, dtype, channels_last)
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) if channels_last else y.is_contiguous()
    assert matches(y, ref, dtype), f"max abs err {(y.float() - ref).abs().max().item():.3g} for {case}"


# ---- property tests over random shapes ------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_matches_conv2d(case, dtype, layout):
    check_case(case, DTYPES[dtype], layout == "nhwc")


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_every_activation(act, layout):
    case = Case(2, 40, 9, 10, (3, 3), (1, 1), (1, 1), (1, 1), 0.6, 2, act, True, seed=7)
    check_case(case, torch.float32, layout == "nhwc")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", [
    # large and dilated windows (the NCHW/NHWC planners shrink the tile to fit shared memory)
    Case(1, 5, 20, 19, (11, 11), (1, 1), (5, 5), (1, 1), 0.3, 1, "identity", True, seed=1),
    Case(1, 3, 40, 40, (9, 9), (2, 2), (8, 8), (2, 2), 0.4, 0, "relu", False, seed=2),
    # large batch (grid z), tiny planes
    Case(256, 3, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 0.6, 0, "relu6", True, seed=3),
    # wide planes: several tiles in both directions with partial tails
    Case(1, 33, 37, 70, (5, 5), (1, 2), (2, 2), (1, 1), 0.5, 1, "silu", True, seed=4),
], ids=["k11", "k9-dil2-s2", "batch256", "multi-tile"])
def test_special_geometries(case, layout):
    check_case(case, torch.float32, layout == "nhwc")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_rounding_is_exact(dtype, layout):
    """One tap of weight 1 and a bias: y = RNE(x + b) must equal torch's own rounding bit for bit
    (covers fp16 subnormals and overflow to inf, and bf16 ties)."""
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    c = 24
    scales = torch.tensor([1e-6, 3e-5, 1.0, 300.0, 3e4, 6.5e4] * 4)[:c] if dt == torch.float16 else \
        torch.tensor([1e-30, 1e-3, 1.0, 1e3, 1e30, 3e38] * 4)[:c]
    x = (torch.randn(2, c, 6, 7, generator=g) * scales.view(1, c, 1, 1)).to(dt)
    bias = torch.randn(c, generator=g) * scales * 0.5
    weight = torch.ones(c, 1, 1, 1)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    y = dw_direct(x, CompactTaps.from_dense(weight), bias, backend="emu")
    expected = (x.float() + bias.view(1, c, 1, 1)).to(dt)
    assert torch.equal(y.float().nan_to_num(), expected.float().nan_to_num())


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


# ---- the tests can fail ---------------------------------------------------------------------------

RICH = Case(2, 40, 11, 12, (3, 3), (2, 2), (1, 2), (2, 2), 0.7, 2, "identity", True, seed=11)
MULTI_TILE = Case(1, 12, 140, 140, (3, 3), (2, 2), (1, 1), (1, 1), 0.7, 1, "identity", True, seed=12)


def test_perturbed_tap_is_detected():
    x, weight, mask, bias = RICH.tensors(torch.float32, False)
    taps = CompactTaps.from_dense(weight, mask)
    ref = reference(x, taps.to_dense(), bias, RICH)
    taps.tap_val[taps.nnz // 2] += 0.5  # one wrong tap among hundreds
    y = dw_direct(x, taps, bias, stride=RICH.stride, padding=RICH.padding, dilation=RICH.dilation,
                  backend="emu")
    assert not matches(y, ref, torch.float32)


MUTATIONS = [
    # (original text, mutated text, occurrences, case, layouts it breaks)
    # column dilation dropped
    ("(k % KW) * DW", "(k % KW)", 2, RICH, ["nchw", "nhwc"]),
    # top padding dropped
    ("const int iy0 = oy0 * SH - PH;", "const int iy0 = oy0 * SH;", 1, RICH, ["nchw", "nhwc"]),
    # NCHW register rows ignore the stride
    ("acc[r] += w * p[r * row_step];", "acc[r] += w * p[r * in_w];", 1, RICH, ["nchw"]),
    # NHWC pixels ignore the column stride
    ("base[q] = ((ly * SH) * in_w + lx * SW) * cb + ch;",
     "base[q] = ((ly * SH) * in_w + lx) * cb + ch;", 1, RICH, ["nhwc"]),
    # halo origin of the second and later tiles (the first tile starts at 0 either way)
    ("const int ix0 = ox0 * SW - PW;", "const int ix0 = ox0 - PW;", 1, MULTI_TILE, ["nchw", "nhwc"]),
    ("const int iy0 = oy0 * SH - PH;", "const int iy0 = oy0 - PH;", 1, MULTI_TILE, ["nchw", "nhwc"]),
]


@pytest.mark.parametrize("old,new,count,case,layouts", MUTATIONS,
                         ids=[f"mut{i}" for i in range(len(MUTATIONS))])
def test_kernel_mutation_is_caught(tmp_path, monkeypatch, old, new, count, case, layouts):
    source = (cuda_dir() / "dw_direct.cu").read_text()
    assert source.count(old) == count, "mutation no longer matches the kernel source; update MUTATIONS"
    mutated = tmp_path / "cuda"
    shutil.copytree(cuda_dir(), mutated)
    (mutated / "dw_direct.cu").write_text(source.replace(old, new))
    monkeypatch.setenv("DEPRUNE_CUDA_DIR", str(mutated))
    for layout in layouts:
        y, ref = run_case(case, torch.float32, layout == "nhwc")
        assert not matches(y, ref, torch.float32), f"mutation {new!r} went unnoticed in {layout}"
