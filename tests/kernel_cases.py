"""Shared by the kernel emulation tests (tests/test_dw_direct_emulation.py, tests/test_dw_dr_emulation.py,
tests/test_emulation_fuzz.py, tests/test_emulation_checks.py):

- :class:`Case` and its hypothesis strategy :func:`cases`; the F.conv2d reference on the masked weight
  (:func:`reference`) and the dtype-aware tolerance (:func:`matches`);
- :data:`KERNELS`: each kernel's source, weight format, launcher and planted weight error; :func:`check_case`;
- :class:`KernelEmulationTests`: the tests every kernel passes (activations, :data:`GEOMETRIES`, exact
  rounding, and the :data:`MUTATIONS` of its source that prove the comparison can fail);
- the fuzz generator :func:`fuzz_shapes` (one fixed random stream per kernel: the default run takes a short
  prefix of it, ``pytest -m fuzz`` a long one) and :func:`run_fuzz`.
"""
from __future__ import annotations

import importlib
import random
import shutil
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from deprune_plugin.kernels import ACTIVATIONS, CompactTaps, DRColumns, dw_direct, dw_dr
from deprune_plugin.kernels.sources import cuda_dir

ACT_FNS = {"identity": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu,
           "hardswish": F.hardswish, "gelu": F.gelu}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KERNEL_SIZES = [1, 2, 3, 4, 5, 7]
LAYOUTS = ("nchw", "nhwc")


@dataclass
class Case:
    n: int
    c: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, ...]  # (h, w), or (top, bottom, left, right)
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

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)``."""
        if len(self.padding) == 4:
            return tuple(self.padding)
        ph, pw = self.padding
        return ph, ph, pw, pw


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
    channels_last dilated convs hit a very slow path). Padding by F.pad, so 4-tuples work too."""
    top, bottom, left, right = case.pads
    xp = F.pad(x.float().contiguous(), (left, right, top, bottom))
    y = F.conv2d(xp, weight, bias, case.stride, 0, case.dilation, groups=x.shape[1])
    return ACT_FNS[case.act](y)


def matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    # compare against the reference rounded once to the storage dtype (fp32 accumulation in the kernel)
    return torch.allclose(y.float(), ref.to(dtype).float(), rtol=1e-2, atol=1e-2)


def max_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return (y.float() - ref).abs().max().item() if y.shape == ref.shape else float("inf")


# ---- the kernels under test ------------------------------------------------------------------------

def _perturb_taps(taps: CompactTaps) -> None:
    taps.tap_val[taps.nnz // 2] += 0.5  # one wrong tap among hundreds


def _perturb_cols(cols: DRColumns) -> None:
    cols.col_val[3] += 0.5  # one wrong column of one sub-GEMM


@dataclass(frozen=True)
class Kernel:
    """One kernel as the tests drive it: its source, weight format, launcher and a planted weight error.

    ``finite_inputs_only``: the DR GEMM multiplies every column by the whole range's rows, so an infinite
    input turns the explicit zeros of W_g into NaNs (0 * inf) for the other channels of its range."""

    name: str
    cu_file: str
    fmt: type
    launcher: Callable
    perturb: Callable
    finite_inputs_only: bool = False

    def compact(self, weight: torch.Tensor, mask: torch.Tensor | None = None, **fmt_kw):
        return self.fmt.from_dense(weight, mask, **fmt_kw)

    def launch(self, x: torch.Tensor, fmt, bias: torch.Tensor | None, case: Case | None = None) -> torch.Tensor:
        """Run the kernel in the emulation (``case``: its stride, padding, dilation and act; None: defaults)."""
        if case is None:
            return self.launcher(x, fmt, bias, backend="emu")
        return self.launcher(x, fmt, bias, stride=case.stride, padding=case.padding, dilation=case.dilation,
                             act=case.act, backend="emu")

    def run(self, case: Case, dtype: torch.dtype, channels_last: bool, *, masked_reference: bool = False,
            **fmt_kw) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, reference)``; the reference uses the format's ``to_dense()``, or ``weight * mask`` with
        ``masked_reference`` (independent of the compact format). ``fmt_kw``: e.g. DR group_size / tile."""
        x, weight, mask, bias = case.tensors(dtype, channels_last)
        fmt = self.compact(weight, mask, **fmt_kw)
        dense = weight * mask if masked_reference else fmt.to_dense()
        return self.launch(x, fmt, bias, case), reference(x, dense, bias, case)


KERNELS = {
    "dw_direct": Kernel("dw_direct", "dw_direct.cu", CompactTaps, dw_direct, _perturb_taps),
    "dw_dr": Kernel("dw_dr", "dw_dr.cu", DRColumns, dw_dr, _perturb_cols, finite_inputs_only=True),
}


def check_case(kernel: str, case: Case, dtype: torch.dtype, channels_last: bool, **fmt_kw) -> None:
    """``kernel`` on ``case`` matches the reference, in ``dtype`` and the input's memory format."""
    y, ref = KERNELS[kernel].run(case, dtype, channels_last, **fmt_kw)
    assert_matches(y, ref, dtype, channels_last, case)


def assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, channels_last: bool, what) -> None:
    assert y.shape == ref.shape and y.dtype == dtype, f"{tuple(y.shape)} {y.dtype} for {what}"
    assert y.is_contiguous(memory_format=torch.channels_last) if channels_last else y.is_contiguous()
    assert matches(y, ref, dtype), f"max abs err {max_err(y, ref):.3g} for {what}"


# ---- the fuzz generator -----------------------------------------------------------------------------

FUZZ_KERNELS = tuple(KERNELS)
FUZZ_SEED = 20240601
# DR (group_size, tile, layout) variants beyond the default (32, 32), run in fp32 with the layout that
# test_dw_dr_emulation.py builds anyway: the sample adds no compile.
_DR_VARIANTS = [(16, 8, "nchw"), (16, 8, "nhwc"), (64, 16, "nhwc"), (8, 32, "nchw")]


@dataclass(frozen=True)
class FuzzShape:
    """One random problem: a :class:`Case` plus the specialisation it runs in."""

    case: Case
    dtype: str
    layout: str
    group_size: int = 32
    tile: int = 32
    padding_mode: str = "symmetric"  # "symmetric" (h, w) | "same" (TF SAME 4-tuple) | "asymmetric" 4-tuple

    @property
    def specialisation(self) -> tuple:
        return self.dtype, self.layout, self.group_size, self.tile

    def run(self, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
        fmt_kw = {"group_size": self.group_size, "tile": self.tile} if kernel == "dw_dr" else {}
        return KERNELS[kernel].run(self.case, DTYPES[self.dtype], self.layout == "nhwc", masked_reference=True,
                                   **fmt_kw)


def same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow SAME ``(before, after)``: output ``ceil(size / stride)``, the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _fuzz_shape(rng: random.Random, kernel: str) -> FuzzShape:
    k = rng.choice([3, 5, 7])
    kh, kw = k, (k if rng.random() < 0.85 else rng.choice([3, 5, 7]))
    s = rng.choice([1, 2])
    sh, sw = (s, s) if rng.random() < 0.8 else (rng.choice([1, 2]), rng.choice([1, 2]))
    d = rng.choice([1, 2])
    dh, dw = (d, d) if rng.random() < 0.8 else (rng.choice([1, 2]), rng.choice([1, 2]))
    c = rng.randrange(1, 80, 2) if rng.random() < 0.85 else rng.randint(1, 80)  # mostly odd channel counts
    n = rng.choice([1, 1, 2, 3])
    mode = rng.choices(["symmetric", "same", "asymmetric"], weights=[5, 4, 1])[0]
    if mode == "same":
        h, w = rng.randint(1, 24), rng.randint(1, 24)
        padding = (*same_pads(h, kh, sh, dh), *same_pads(w, kw, sw, dw))
    else:
        if mode == "symmetric":
            ph, pw = rng.randint(0, dh * (kh // 2)), rng.randint(0, dw * (kw // 2))
            padding, pads = (ph, pw), (ph, ph, pw, pw)
        else:
            pads = tuple(rng.randint(0, dil * (kk - 1)) for kk, dil in ((kh, dh), (kh, dh), (kw, dw), (kw, dw)))
            padding = pads
        h_min = max(1, dh * (kh - 1) + 1 - pads[0] - pads[1])
        w_min = max(1, dw * (kw - 1) + 1 - pads[2] - pads[3])
        h, w = rng.randint(h_min, h_min + 14), rng.randint(w_min, w_min + 14)
    case = Case(n=n, c=c, h=h, w=w, kernel=(kh, kw), stride=(sh, sw), padding=padding, dilation=(dh, dw),
                density=rng.choice([0.0, 0.3, 0.6, 0.6, 1.0]), pruned_channels=rng.randint(0, min(3, c)),
                act=rng.choice(sorted(ACTIVATIONS)), with_bias=rng.random() < 0.7, seed=rng.randrange(2**31))
    dtype, layout = rng.choice(list(DTYPES)), rng.choice(LAYOUTS)
    if kernel == "dw_dr" and rng.random() < 0.25:
        gs, tile, layout = rng.choice(_DR_VARIANTS)
        return FuzzShape(case, "fp32", layout, gs, tile, mode)
    return FuzzShape(case, dtype, layout, padding_mode=mode)


def fuzz_shapes(kernel: str, count: int, seed: int = FUZZ_SEED) -> list[FuzzShape]:
    """The first ``count`` shapes of ``kernel``'s fixed random stream (a shorter list is a prefix of a longer)."""
    if kernel not in FUZZ_KERNELS:
        raise ValueError(f"kernel must be one of {FUZZ_KERNELS}, got {kernel!r}")
    rng = random.Random(f"{seed}-{kernel}")
    return [_fuzz_shape(rng, kernel) for _ in range(count)]


def run_fuzz(kernel: str, shapes: list[FuzzShape]) -> list[str]:
    """Run every shape through ``kernel``'s emulation, grouped by specialisation (each library is built and
    loaded once, then serves all its shapes); returns one line per mismatch or error (empty: all matched)."""
    failures = []
    for i, shape in sorted(enumerate(shapes), key=lambda item: item[1].specialisation):
        try:
            y, ref = shape.run(kernel)
        except Exception as exc:  # noqa: BLE001 - report every failing shape, not just the first
            failures.append(f"#{i} {type(exc).__name__}: {exc} for {shape}")
            continue
        dtype = DTYPES[shape.dtype]
        if y.shape != ref.shape or y.dtype != dtype or not matches(y, ref, dtype):
            failures.append(f"#{i} max abs err {max_err(y, ref):.3g} ({tuple(y.shape)} {y.dtype}) for {shape}")
    return failures


# ---- the tests every emulated kernel passes -----------------------------------------------------------

def activation_case(act: str) -> Case:
    """A small fp32 problem with partly and fully pruned channels, for one epilogue activation."""
    return Case(2, 40, 9, 10, (3, 3), (1, 1), (1, 1), (1, 1), 0.6, 2, act, True, seed=7)


# Shapes that stress one kernel's tiling or another; every kernel must get all of them right.
GEOMETRIES = {
    # large and dilated windows (the direct kernel's planners shrink the tile to fit shared memory)
    "k11": Case(1, 5, 20, 19, (11, 11), (1, 1), (5, 5), (1, 1), 0.3, 1, "identity", True, seed=1),
    "k9-dil2-s2": Case(1, 3, 40, 40, (9, 9), (2, 2), (8, 8), (2, 2), 0.4, 0, "relu", False, seed=2),
    # large batch (grid z), tiny planes
    "batch256": Case(256, 3, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 0.6, 0, "relu6", True, seed=3),
    "batch256-s2": Case(256, 3, 4, 4, (3, 3), (2, 2), (1, 1), (1, 1), 0.6, 0, "relu6", True, seed=3),
    # wide planes: several direct tiles in both directions with partial tails
    "multi-tile": Case(1, 33, 37, 70, (5, 5), (1, 2), (2, 2), (1, 1), 0.5, 1, "silu", True, seed=4),
    # 7x7 dense DR range: K' = 32 * 49 = 1568 columns, 49 K tiles
    "k7-dense": Case(1, 33, 9, 9, (7, 7), (1, 1), (3, 3), (1, 1), 1.0, 0, "gelu", True, seed=1),
    # every channel pruned: output is act(bias) everywhere
    "all-pruned": Case(2, 40, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 0.0, 0, "hardswish", True, seed=2),
    # more output positions than one DR CTA covers (64), with a partial last CTA
    "multi-cta": Case(1, 20, 13, 11, (5, 5), (1, 1), (2, 2), (1, 1), 0.5, 1, "silu", True, seed=4),
}

# Cases of the mutation tests below.
RICH = Case(2, 40, 11, 12, (3, 3), (2, 2), (1, 2), (2, 2), 0.7, 2, "identity", True, seed=11)
MULTI_TILE = Case(1, 12, 140, 140, (3, 3), (2, 2), (1, 1), (1, 1), 0.7, 1, "identity", True, seed=12)
MULTI_CTA = Case(1, 40, 30, 30, (3, 3), (1, 2), (1, 1), (1, 1), 0.7, 1, "identity", True, seed=12)


def plan_for_one_sm(monkeypatch) -> None:
    """Make the launchers plan for a GPU of one SM: the planners' cheapest tiles (wide and tall), as before the
    grid-filling rule. Plans that fill 132 SMs with a test's small map take 1-row / 1-column tiles, where a bug
    planted in the code for a tile's second row or column never runs."""
    for module, planner in (("dw_direct", "dw_direct_plan"), ("dw_dr", "dw_dr_plan"),
                            ("dw_pw_fused", "dw_pw_fused_plan")):
        mod = importlib.import_module(f"deprune_plugin.kernels.{module}")
        real = getattr(mod, planner)
        monkeypatch.setattr(mod, planner, lambda *a, _real=real, **k: _real(*a, **{**k, "sms": 1}))


@dataclass(frozen=True)
class Mutation:
    """A bug planted in a kernel source: ``old`` (found ``count`` times in ``path``, default ``cu_file``: a
    header the kernel includes, e.g.) becomes ``new``; the comparison on ``case`` of the kernel of ``cu_file``
    must then fail in each of ``layouts``."""

    cu_file: str
    why: str
    old: str
    new: str
    count: int
    case: Case
    layouts: tuple[str, ...] = LAYOUTS
    path: str = ""

    @property
    def file(self) -> str:
        return self.path or self.cu_file


MUTATIONS = [
    Mutation("dw_direct.cu", "column dilation dropped",
             "s_off[t] = ok ? i * DH * IN_W + (k - i * KW) * DW : 0;",
             "s_off[t] = ok ? i * DH * IN_W + (k - i * KW) : 0;", 1, RICH, ("nchw",)),
    Mutation("dw_direct.cu", "column dilation dropped", "j * DW) * CB", "j) * CB", 2, RICH, ("nhwc",)),
    Mutation("dw_direct.cu", "top padding dropped",
             "const int iy0 = oy0 * SH - PH;", "const int iy0 = oy0 * SH;", 1, RICH),
    Mutation("dw_direct.cu", "NCHW register rows ignore the stride",
             "deprune_to_float(p[r * SH * IN_W])", "deprune_to_float(p[r * IN_W])", 1, RICH, ("nchw",)),
    Mutation("dw_direct.cu", "NHWC pixels ignore the column stride",
             "s_in + ((ly0 * SH) * IN_W + lx * SW) * CB + ch0;", "s_in + ((ly0 * SH) * IN_W + lx) * CB + ch0;",
             1, RICH, ("nhwc",)),
    Mutation("dw_direct.cu", "NHWC sliding window feeds the wrong output row",
             "acc[d / SH][l] += w[i][l] * v[l];", "acc[d / SH / 2][l] += w[i][l] * v[l];", 1, MULTI_CTA,
             ("nhwc",)),
    Mutation("dw_direct.cu", "vector tap mask from its first channel only",
             "keep[m] |= s_mask[m * CB + ch0 + l];", "keep[m] |= s_mask[m * CB + ch0];", 1, RICH, ("nhwc",)),
    Mutation("dw_direct.cu", "16-byte vector unpacked from its first word only",
             "f[k] = bits_to_f32(w[k]);", "f[k] = bits_to_f32(w[0]);", 1, RICH, ("nhwc",), "deprune_vec16.cuh"),
    # halo origin of the second and later tiles (the first tile starts at 0 either way)
    Mutation("dw_direct.cu", "column halo origin ignores the stride",
             "const int ix0 = ox0 * SW - PW;", "const int ix0 = ox0 - PW;", 1, MULTI_TILE),
    Mutation("dw_direct.cu", "row halo origin ignores the stride",
             "const int iy0 = oy0 * SH - PH;", "const int iy0 = oy0 - PH;", 1, MULTI_TILE),
    # dw_dr.cu: the MUTATIONS run in fp32, i.e. through the CUDA-core path (and the staging both paths share);
    # the tensor-core path's fragment mutations are in tests/test_dw_dr_mma.py.
    Mutation("dw_dr.cu", "column weight read from the tile's first column",
             "v = col_val[j];", "v = col_val[k0];", 1, RICH),
    Mutation("dw_dr.cu", "column dilation dropped",
             "s_dx[tid] = ok ? (tap - ti * DEPRUNE_KW) * DEPRUNE_DW : DR_OUTSIDE;",
             "s_dx[tid] = ok ? (tap - ti * DEPRUNE_KW) : DR_OUTSIDE;", 1, RICH),
    Mutation("dw_dr.cu", "top padding dropped",
             "s_py[e] = p < P ? oy * DEPRUNE_SH - PH : DR_OUTSIDE;", "s_py[e] = p < P ? oy * DEPRUNE_SH : DR_OUTSIDE;",
             1, RICH),
    Mutation("dw_dr.cu", "accumulator row <-> channel map", "if (rk == i)", "if (rk == DR_RW - 1 - i)", 1, RICH),
    Mutation("dw_dr.cu", "column metadata of the other tile parity",
             "const int rk = s_row[parity][k] - rbase;", "const int rk = s_row[0][k] - rbase;", 1, RICH),
    Mutation("dw_dr.cu", "last K tile skipped", "for (int k0 = k_begin; k0 < k_end; k0 += DR_KT, parity ^= 1)",
             "for (int k0 = k_begin; k0 + DR_KT < k_end; k0 += DR_KT, parity ^= 1)", 1, RICH),
    Mutation("dw_dr.cu", "NHWC gather reads the range's first channel",
             "s_coff[tid] = ok ? chan : 0;", "s_coff[tid] = ok ? c0 : 0;", 1, RICH, ("nhwc",)),
    Mutation("dw_dr.cu", "stride axes swapped",
             "s_px[e] = p < P ? ox * DEPRUNE_SW - PW : DR_OUTSIDE;",
             "s_px[e] = p < P ? ox * DEPRUNE_SH - PW : DR_OUTSIDE;", 1, MULTI_CTA),
    Mutation("dw_dr.cu", "output position decoded with the wrong width",
             "const int oy = p / OW;", "const int oy = p / OH;", 1, MULTI_CTA),
]


class KernelEmulationTests:
    """The tests every emulated kernel passes. A test file subclasses this as ``Test...`` and sets ``kernel``
    (a key of :data:`KERNELS`); the mutations are those of :data:`MUTATIONS` in that kernel's source."""

    kernel: str

    @property
    def spec(self) -> Kernel:
        return KERNELS[self.kernel]

    def run_case(self, case: Case, dtype: torch.dtype, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.spec.run(case, dtype, channels_last)

    def pytest_generate_tests(self, metafunc) -> None:
        """Parametrize ``geometry`` (every kernel gets all) and ``mutation`` (those of ``cu_file``)."""
        if "geometry" in metafunc.fixturenames:
            metafunc.parametrize("geometry", list(GEOMETRIES.values()), ids=list(GEOMETRIES))
        if "mutation" in metafunc.fixturenames:
            mine = [m for m in MUTATIONS if m.cu_file == self.spec.cu_file]
            metafunc.parametrize("mutation", mine, ids=[f"mut{i}" for i in range(len(mine))])

    @pytest.mark.parametrize("act", sorted(ACTIVATIONS))
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_every_activation(self, act, layout):
        check_case(self.kernel, activation_case(act), torch.float32, layout == "nhwc")

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_special_geometries(self, geometry, layout):
        check_case(self.kernel, geometry, torch.float32, layout == "nhwc")

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", ["fp16", "bf16"])
    def test_low_precision_rounding_is_exact(self, dtype, layout):
        """One kept tap of weight 1 per channel and a bias: y = RNE(x + b) bit for bit as torch rounds (fp16
        subnormals and overflow to inf, bf16 ties)."""
        dt = DTYPES[dtype]
        g = torch.Generator().manual_seed(0)
        c = 24
        scales = torch.tensor([1e-6, 3e-5, 1.0, 300.0, 3e4, 6.5e4] * 4)[:c] if dt == torch.float16 else \
            torch.tensor([1e-30, 1e-3, 1.0, 1e3, 1e30, 3e38] * 4)[:c]
        x = torch.randn(2, c, 6, 7, generator=g) * scales.view(1, c, 1, 1)
        if self.spec.finite_inputs_only:
            x = x.clamp(-torch.finfo(dt).max / 2, torch.finfo(dt).max / 2)
        x = x.to(dt)
        bias = torch.randn(c, generator=g) * scales * 0.5
        if layout == "nhwc":
            x = x.to(memory_format=torch.channels_last)
        y = self.spec.launch(x, self.spec.compact(torch.ones(c, 1, 1, 1)), bias)
        expected = (x.float() + bias.view(1, c, 1, 1)).to(dt)
        assert torch.equal(y.float().nan_to_num(), expected.float().nan_to_num())

    # ---- the tests can fail -------------------------------------------------------------------------

    def test_perturbed_weight_is_detected(self):
        x, weight, mask, bias = RICH.tensors(torch.float32, False)
        fmt = self.spec.compact(weight, mask)
        ref = reference(x, fmt.to_dense(), bias, RICH)
        self.spec.perturb(fmt)
        assert not matches(self.spec.launch(x, fmt, bias, RICH), ref, torch.float32)

    def test_kernel_mutation_is_caught(self, tmp_path, monkeypatch, mutation):
        m = mutation
        source = (cuda_dir() / m.file).read_text()
        assert source.count(m.old) == m.count, f"mutation {m.why!r} no longer matches the kernel; update MUTATIONS"
        mutated = tmp_path / "cuda"
        shutil.copytree(cuda_dir(), mutated)
        (mutated / m.file).write_text(source.replace(m.old, m.new))
        monkeypatch.setenv("DEPRUNE_CUDA_DIR", str(mutated))
        plan_for_one_sm(monkeypatch)
        for layout in m.layouts:
            y, ref = self.run_case(m.case, torch.float32, layout == "nhwc")
            assert not matches(y, ref, torch.float32), f"mutation {m.why!r} went unnoticed in {layout}"
