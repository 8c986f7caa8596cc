"""cuda/dw_dr.cu (the paper's DR sub-GEMMs) run through the host emulation (g++), checked against F.conv2d.

Same property tests as the direct kernel (random shapes, C not a multiple of the group size, even and odd
kernels, strides, dilations, paddings, all-pruned channels and ranges, both layouts, three dtypes, every
activation), plus group-size / K-tile variants and mutations of the kernel source that must be caught.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deprune_plugin.kernels.formats import DRColumns
from deprune_plugin.kernels import ACTIVATIONS, dw_dr, emulation_available
from deprune_plugin.kernels.dw_dr import dr_static_smem_bytes
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


def run_case(case: Case, dtype: torch.dtype, channels_last: bool, group_size: int = 32,
             tile: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x, weight, mask, bias = case.tensors(dtype, channels_last)
    cols = DRColumns.from_dense(weight, mask, group_size=group_size, tile=tile)
    y = dw_dr(x, cols, bias, stride=case.stride, padding=case.padding, dilation=case.dilation, act=case.act,
              backend="emu")
    return y, reference(x, cols.to_dense(), bias, case)


def check_case(case: Case, dtype: torch.dtype, channels_last: bool, group_size: int = 32,
               tile: int = 32) -> None:
    y, ref = run_case(case, dtype, channels_last, group_size, tile)
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) if channels_last else y.is_contiguous()
    assert matches(y, ref, dtype), f"max abs err {(y.float() - ref).abs().max().item():.3g} for {case}"


# ---- property tests over random shapes ------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(max_c=48))
def test_matches_conv2d(case, dtype, layout):
    check_case(case, DTYPES[dtype], layout == "nhwc")


@pytest.mark.parametrize("group_size,tile,layout", [(16, 8, "nchw"), (16, 8, "nhwc"), (64, 16, "nhwc"),
                                                    (8, 32, "nchw")])
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(max_c=80))
def test_group_size_and_tile_variants(case, group_size, tile, layout):
    check_case(case, torch.float32, layout == "nhwc", group_size, tile)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_every_activation(act, layout):
    case = Case(2, 40, 9, 10, (3, 3), (1, 1), (1, 1), (1, 1), 0.6, 2, act, True, seed=7)
    check_case(case, torch.float32, layout == "nhwc")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", [
    # 7x7 dense range: K' = 32 * 49 = 1568 columns, 49 K tiles
    Case(1, 33, 9, 9, (7, 7), (1, 1), (3, 3), (1, 1), 1.0, 0, "gelu", True, seed=1),
    # every channel pruned: output is act(bias) everywhere
    Case(2, 40, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 0.0, 0, "hardswish", True, seed=2),
    # large batch (grid z), tiny planes
    Case(256, 3, 4, 4, (3, 3), (2, 2), (1, 1), (1, 1), 0.6, 0, "relu6", True, seed=3),
    # more output positions than one CTA covers (64), with a partial last CTA
    Case(1, 20, 13, 11, (5, 5), (1, 1), (2, 2), (1, 1), 0.5, 1, "silu", True, seed=4),
], ids=["k7-dense", "all-pruned", "batch256", "multi-cta"])
def test_special_geometries(case, layout):
    check_case(case, torch.float32, layout == "nhwc")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_rounding_is_exact(dtype, layout):
    """One kept tap of weight 1 per channel and a bias: y = RNE(x + b) bit for bit as torch rounds.

    Inputs stay finite: in the DR GEMM every column multiplies the whole range's rows, so an infinite
    input would turn the explicit zeros of W_g into NaNs (0 * inf) for the other channels of its range."""
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    c = 24
    scales = torch.tensor([1e-6, 3e-5, 1.0, 300.0, 3e4, 6.5e4] * 4)[:c] if dt == torch.float16 else \
        torch.tensor([1e-30, 1e-3, 1.0, 1e3, 1e30, 3e38] * 4)[:c]
    limit = torch.finfo(dt).max / 2
    x = (torch.randn(2, c, 6, 7, generator=g) * scales.view(1, c, 1, 1)).clamp(-limit, limit).to(dt)
    bias = torch.randn(c, generator=g) * scales * 0.5
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    y = dw_dr(x, DRColumns.from_dense(torch.ones(c, 1, 1, 1)), bias, backend="emu")
    expected = (x.float() + bias.view(1, c, 1, 1)).to(dt)
    assert torch.equal(y.float().nan_to_num(), expected.float().nan_to_num())


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
    (lambda: dw_dr(torch.randn(1, 8, 5, 5), _cols(group_size=128, tile=128), None, backend="emu"), ValueError,
     "tile"),
    (lambda: dw_dr(torch.randn(1, 8, 5, 5), None, None, backend="emu"), TypeError, "cols"),
])
def test_bad_arguments_raise(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_static_smem_of_default_configuration():
    # s_w 32x32 + s_x 32x65 floats + 4x32 column ints + 2x64 position ints, as ptxas reports (13440 bytes)
    assert dr_static_smem_bytes(32, 32) == 13440


# ---- the tests can fail ---------------------------------------------------------------------------

RICH = Case(2, 40, 11, 12, (3, 3), (2, 2), (1, 2), (2, 2), 0.7, 2, "identity", True, seed=11)
MULTI_CTA = Case(1, 40, 30, 30, (3, 3), (1, 2), (1, 1), (1, 1), 0.7, 1, "identity", True, seed=12)


def test_perturbed_column_is_detected():
    x, weight, mask, bias = RICH.tensors(torch.float32, False)
    cols = DRColumns.from_dense(weight, mask)
    ref = reference(x, cols.to_dense(), bias, RICH)
    cols.col_val[3] += 0.5  # one wrong column of one sub-GEMM
    y = dw_dr(x, cols, bias, stride=RICH.stride, padding=RICH.padding, dilation=RICH.dilation, backend="emu")
    assert not matches(y, ref, torch.float32)


MUTATIONS = [
    # (original text, mutated text, occurrences, case, layouts it breaks)
    # W tile filled from the wrong column
    ("s_w[j][r] = s_row[j] == r ? col_val[k0 + j] : 0.0f;",
     "s_w[j][r] = s_row[j] == r ? col_val[k0] : 0.0f;", 1, RICH, ["nchw", "nhwc"]),
    # column dilation dropped
    ("s_dx[j] = ok ? (tap % KW) * DW : DR_OUTSIDE;",
     "s_dx[j] = ok ? (tap % KW) : DR_OUTSIDE;", 1, RICH, ["nchw", "nhwc"]),
    # top padding dropped
    ("s_py[e] = p < P ? oy * SH - PH : DR_OUTSIDE;",
     "s_py[e] = p < P ? oy * SH : DR_OUTSIDE;", 1, RICH, ["nchw", "nhwc"]),
    # accumulator row <-> channel map
    ("const int c = c0 + rl + i * DR_T;", "const int c = c0 + rl * DR_RM + i;", 1, RICH, ["nchw", "nhwc"]),
    # last K tile skipped
    ("for (int k0 = k_begin; k0 < k_end; k0 += DEPRUNE_KTILE)",
     "for (int k0 = k_begin; k0 + DEPRUNE_KTILE < k_end; k0 += DEPRUNE_KTILE)", 1, RICH, ["nchw", "nhwc"]),
    # NHWC gather reads the wrong channel
    ("* C + s_chan[j]]", "* C + s_chan[0]]", 1, RICH, ["nhwc"]),
    # stride axes swapped
    ("s_px[e] = p < P ? ox * SW - PW : DR_OUTSIDE;",
     "s_px[e] = p < P ? ox * SH - PW : DR_OUTSIDE;", 1, MULTI_CTA, ["nchw", "nhwc"]),
    # output position decoded with the wrong width
    ("const int oy = p / OW;", "const int oy = p / OH;", 1, MULTI_CTA, ["nchw", "nhwc"]),
]


@pytest.mark.parametrize("old,new,count,case,layouts", MUTATIONS,
                         ids=[f"mut{i}" for i in range(len(MUTATIONS))])
def test_kernel_mutation_is_caught(tmp_path, monkeypatch, old, new, count, case, layouts):
    source = (cuda_dir() / "dw_dr.cu").read_text()
    assert source.count(old) == count, "mutation no longer matches the kernel source; update MUTATIONS"
    mutated = tmp_path / "cuda"
    shutil.copytree(cuda_dir(), mutated)
    (mutated / "dw_dr.cu").write_text(source.replace(old, new))
    monkeypatch.setenv("DEPRUNE_CUDA_DIR", str(mutated))
    for layout in layouts:
        y, ref = run_case(case, torch.float32, layout == "nhwc")
        assert not matches(y, ref, torch.float32), f"mutation {new!r} went unnoticed in {layout}"
