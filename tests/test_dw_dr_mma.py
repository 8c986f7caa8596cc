"""The tensor-core path of cuda/dw_dr.cu (mma.sync m16n8k16) and its host emulation.

- The emulated ``mma.sync`` alone (cuda/cuda_host_emulation.h, warp-level matrix section) against ``A @ B + C``,
  with the fragments packed here from the PTX ISA's layout (an implementation independent of the header's),
  for two warps at once; swapped fragment registers, or a planted layout bug in the emulator, disagree.
- ``dw_dr`` in fp16 / bf16 (the MMA path) against F.conv2d: NCHW and NHWC, 3x3 / 5x5, strides 1 / 2, SAME
  padding, ranges whose K' is not a multiple of 16 (partial K steps), channel counts not a multiple of 32.
- The CUDA-core fallback compiled for fp16 (what a GPU older than sm_80 runs) gives the same results.
- Mutations of the kernel's fragment code (two A registers swapped, the B registers swapped, the C rows) make
  the comparison fail.
- :func:`dw_dr_plan`: tensor cores, K steps and zero columns, staged bytes, and ``dw_dr`` launching the plan.
"""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import Case, matches, max_err, reference, same_pads

from deprune_plugin.kernels import DRColumns, dw_dr, emulation, emulation_available
from deprune_plugin.kernels.launch import prepare_conv
from deprune_plugin.kernels.sources import arg_i32, arg_ptr, cuda_dir, specialize

dw_dr_module = importlib.import_module("deprune_plugin.kernels.dw_dr")

_OK, _WHY = emulation_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"host emulation unavailable: {_WHY}")

LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}

# ---- the emulated mma.sync alone ------------------------------------------------------------------

PROBE = r"""
// One mma.sync.m16n8k16 per warp; every lane passes the registers read from a[], b[], c[] at its linear id.
#define DEPRUNE_SCALAR float
#include "deprune_common.cuh"

extern "C" __global__ void mma_probe(const unsigned int* a, const unsigned int* b, const float* c, float* d,
                                     int bf16) {
    const unsigned int t = threadIdx.x;
    const unsigned int ra[4] = {a[4 * t], a[4 * t + 1], a[4 * t + 2], a[4 * t + 3]};
    const unsigned int rb[2] = {b[2 * t], b[2 * t + 1]};
    const float rc[4] = {c[4 * t], c[4 * t + 1], c[4 * t + 2], c[4 * t + 3]};
    float rd[4];
    deprune_emu_mma_m16n8k16(bf16 ? deprune_emu::MmaType::bf16 : deprune_emu::MmaType::f16, rd, ra, rb, rc);
    for (int i = 0; i < 4; ++i) d[4 * t + i] = rd[i];
}
"""

# The PTX ISA's "Matrix Fragments for mma.m16n8k16 with floating point type", per register of a lane with
# groupID g = lane >> 2 and t = lane % 4: the (row, col) of its low element (the high one is the next column
# for A, the next row for B).
A_REGS = lambda g, t: [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]  # noqa: E731
B_REGS = lambda g, t: [(2 * t, g), (2 * t + 8, g)]  # noqa: E731
C_ELEMS = lambda g, t: [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]  # noqa: E731


def pack_fragments(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, swap_a=None, swap_b=False):
    """Per-lane registers ``([32, 4] int32, [32, 2] int32, [32, 4] fp32)`` of one warp's 16x16 A, 16x8 B
    (16-bit dtype) and 16x8 fp32 C. ``swap_a=(i, j)`` / ``swap_b`` exchange two registers (a planted bug)."""
    abits, bbits = a.view(torch.int16), b.view(torch.int16)
    ra = torch.zeros(32, 4, 2, dtype=torch.int16)
    rb = torch.zeros(32, 2, 2, dtype=torch.int16)
    rc = torch.zeros(32, 4)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i, (row, col) in enumerate(A_REGS(g, t)):
            ra[lane, i] = abits[row, col:col + 2]
        for i, (row, col) in enumerate(B_REGS(g, t)):
            rb[lane, i] = bbits[row:row + 2, col]
        for i, (row, col) in enumerate(C_ELEMS(g, t)):
            rc[lane, i] = c[row, col]
    if swap_a:
        i, j = swap_a
        ra[:, [i, j]] = ra[:, [j, i]]
    if swap_b:
        rb[:, [0, 1]] = rb[:, [1, 0]]
    # two int16 halves, low first (little endian), make one .b32 register
    return ra.view(32, 8).view(torch.int32), rb.view(32, 4).view(torch.int32), rc


def unpack_d(rd: torch.Tensor) -> torch.Tensor:
    d = torch.full((16, 8), float("nan"))
    for lane in range(32):
        for i, (row, col) in enumerate(C_ELEMS(lane >> 2, lane % 4)):
            d[row, col] = rd[lane, i]
    return d


def probe_source(root: Path) -> object:
    directory = root / "cuda"
    if not directory.exists():
        shutil.copytree(cuda_dir(), directory)
    (directory / "mma_probe.cu").write_text(PROBE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEPRUNE_CUDA_DIR", str(directory))
        return specialize("mma_probe.cu", {})


def run_probe(src, dtype: torch.dtype, warps: int, seed: int = 0, **packing):
    """``(D from the emulated mma, A @ B + C)`` per warp, each warp with its own random operands."""
    g = torch.Generator().manual_seed(seed)
    regs, expected = [], []
    for _ in range(warps):
        a = torch.randn(16, 16, generator=g).to(dtype)
        b = torch.randn(16, 8, generator=g).to(dtype)
        c = torch.randn(16, 8, generator=g)
        regs.append(pack_fragments(a, b, c, **packing))
        expected.append(a.double() @ b.double() + c.double())
    ra = torch.cat([r[0] for r in regs]).contiguous()
    rb = torch.cat([r[1] for r in regs]).contiguous()
    rc = torch.cat([r[2] for r in regs]).contiguous()
    rd = torch.full((32 * warps, 4), float("nan"))
    emulation.launch(src, "mma_probe", (1, 1, 1), (32 * warps, 1, 1), 0,
                     [arg_ptr(ra), arg_ptr(rb), arg_ptr(rc), arg_ptr(rd), arg_i32(int(dtype == torch.bfloat16))])
    got = [unpack_d(rd[32 * w:32 * (w + 1)]) for w in range(warps)]
    return got, [e.float() for e in expected]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return probe_source(tmp_path_factory.mktemp("probe"))


@pytest.mark.parametrize("dtype", list(LOW))
def test_emulated_mma_is_the_matmul_of_the_documented_fragments(probe, dtype):
    got, expected = run_probe(probe, LOW[dtype], warps=2)
    for d, e in zip(got, expected):
        assert not d.isnan().any()
        assert torch.allclose(d, e, rtol=1e-5, atol=1e-5), (d - e).abs().max()
    assert not torch.allclose(got[0], got[1])  # the two warps exchanged their own fragments


@pytest.mark.parametrize("packing", [{"swap_a": (1, 2)}, {"swap_a": (0, 3)}, {"swap_b": True}],
                         ids=["a1<->a2", "a0<->a3", "b0<->b1"])
def test_swapped_fragment_registers_give_a_different_product(probe, packing):
    got, expected = run_probe(probe, torch.float16, warps=1, **packing)
    assert (got[0] - expected[0]).abs().max() > 0.1


@pytest.mark.parametrize("old,new", [
    # the emulator reads A's a[1] as the high columns of row groupID instead of row groupID + 8
    ("const unsigned int row = group + ((r & 1) ? 8 : 0);", "const unsigned int row = group + ((r & 2) ? 8 : 0);"),
    # the emulator's C/D columns ignore the register's parity
    ("Cm[group + ((r & 2) ? 8 : 0)][tig * 2 + (r & 1)]", "Cm[group + ((r & 2) ? 8 : 0)][tig * 2]"),
], ids=["A-rows", "C-cols"])
def test_a_wrong_layout_in_the_emulator_is_caught(tmp_path, old, new):
    root = tmp_path / "mutated"
    shutil.copytree(cuda_dir(), root / "cuda")
    header = root / "cuda" / "cuda_host_emulation.h"
    text = header.read_text()
    assert text.count(old) == 1, "the emulator changed; update this mutation"
    header.write_text(text.replace(old, new))
    got, expected = run_probe(probe_source(root), torch.float16, warps=1)
    assert not torch.allclose(got[0].nan_to_num(1e9), expected[0], rtol=1e-5, atol=1e-5)


# ---- dw_dr on the tensor-core path against F.conv2d -------------------------------------------------

def _same(h: int, w: int, k: int, s: int) -> tuple[int, int, int, int]:
    return (*same_pads(h, k, s, 1), *same_pads(w, k, s, 1))


# (case, DRColumns tile): tile=1 leaves K' unpadded, so ranges end inside a K step.
MMA_CASES = {
    "3x3-s1-same-c72": (Case(2, 72, 12, 11, (3, 3), (1, 1), _same(12, 11, 3, 1), (1, 1), 0.55, 2, "relu6", True, 5),
                        1),
    "3x3-s2-same-c40": (Case(1, 40, 13, 14, (3, 3), (2, 2), _same(13, 14, 3, 2), (1, 1), 0.7, 1, "identity", True, 6),
                        32),
    "5x5-s1-same-c50": (Case(1, 50, 10, 9, (5, 5), (1, 1), _same(10, 9, 5, 1), (1, 1), 0.4, 0, "silu", True, 7), 1),
    "5x5-s2-same-c33": (Case(2, 33, 15, 16, (5, 5), (2, 2), _same(15, 16, 5, 2), (1, 1), 0.5, 1, "hardswish", False,
                             8), 16),
    "3x3-dil2-c20": (Case(1, 20, 9, 9, (3, 3), (1, 1), (2, 2), (2, 2), 1.0, 0, "gelu", True, 9), 1),
}


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(LOW))
@pytest.mark.parametrize("name", list(MMA_CASES))
def test_tensor_core_path_matches_conv2d(name, dtype, layout):
    case, tile = MMA_CASES[name]
    x, weight, mask, bias = case.tensors(LOW[dtype], layout == "nhwc")
    cols = DRColumns.from_dense(weight, mask, tile=tile)
    with emulation.record_launches() as launches:
        y = dw_dr(x, cols, bias, stride=case.stride, padding=case.padding, dilation=case.dilation, act=case.act,
                  backend="emu")
    assert dict(launches[0].defines)["DEPRUNE_DR_MMA"] == "1"
    ref = reference(x, weight * mask, bias, case)
    assert y.dtype == LOW[dtype] and y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last) if layout == "nhwc" else y.is_contiguous()
    assert matches(y, ref, LOW[dtype]), f"max abs err {max_err(y, ref):.3g}"


def test_the_cases_have_partial_k_steps_and_partial_ranges():
    """The cases above exercise what they claim: K' % 16 != 0 in some range, C % 32 != 0."""
    partial = 0
    for case, tile in MMA_CASES.values():
        _, weight, mask, _ = case.tensors(torch.float16, False)
        kept, _ = DRColumns.from_dense(weight, mask, tile=tile).host_counts()
        partial += sum(k % 16 != 0 for k in kept)
        assert case.c % 32 != 0
    assert partial >= 4


def test_exact_products_on_tensor_cores():
    """fp16 inputs and weights that are small integers: every product and sum is exact in fp32, so the MMA path
    must reproduce F.conv2d bit for bit (a fragment element in the wrong place cannot hide in a tolerance)."""
    g = torch.Generator().manual_seed(3)
    c, k = 45, 3
    x = torch.randint(-4, 5, (2, c, 9, 8), generator=g).to(torch.float16).contiguous(memory_format=torch.channels_last)
    weight = torch.randint(-3, 4, (c, 1, k, k), generator=g).float()
    mask = torch.rand(c, 1, k, k, generator=g) < 0.6
    y = dw_dr(x, DRColumns.from_dense(weight, mask, tile=1), None, padding=1, backend="emu")
    ref = F.conv2d(x.float().contiguous(), weight * mask, None, 1, 1, groups=c)
    assert torch.equal(y.float(), ref)


# ---- the CUDA-core fallback of the fp16 / bf16 kernel (GPUs older than sm_80) gives the same results ------

@pytest.mark.parametrize("dtype", list(LOW))
def test_fallback_matches_the_tensor_core_path(monkeypatch, dtype):
    case, tile = MMA_CASES["3x3-s1-same-c72"]
    x, weight, mask, bias = case.tensors(LOW[dtype], True)
    cols = DRColumns.from_dense(weight, mask, tile=tile)
    run = lambda: dw_dr(x, cols, bias, stride=case.stride, padding=case.padding, act=case.act,  # noqa: E731
                        backend="emu")
    with emulation.record_launches() as launches:
        y_mma = run()
        monkeypatch.setattr(dw_dr_module, "dr_uses_tensor_cores", lambda dt: False)  # what sm < 80 compiles
        y_cuda_cores = run()
    assert [dict(r.defines)["DEPRUNE_DR_MMA"] for r in launches] == ["1", "0"]
    # same rounded weights, same inputs: only the order of the fp32 sums differs
    assert torch.allclose(y_mma.float(), y_cuda_cores.float(), rtol=1e-2, atol=1e-2)
    assert (y_mma.float() - y_cuda_cores.float()).abs().max() <= 2 * torch.finfo(LOW[dtype]).eps * \
        y_mma.float().abs().max()
    assert matches(y_cuda_cores, reference(x, weight * mask, bias, case), LOW[dtype])


# ---- mutations of the kernel's fragment code are caught ---------------------------------------------

def _swap(text: str, a: str, b: str) -> str:
    return text.replace(a, "\0").replace(b, a).replace("\0", b)


FRAGMENT_MUTATIONS = {
    # a[1] (row groupID + 8, low columns) and a[2] (row groupID, high columns) exchanged
    "A registers 1 and 2 swapped": lambda s: _swap(_swap(s, "ah[1] = ", "ah[2] = "), "al[1] = ", "al[2] = "),
    "B registers swapped": lambda s: _swap(s, "DR_XW(pp, ks * 8 + tig)]", "DR_XW(pp, ks * 8 + tig + 4)]"),
    # the staging writes the X tile unswizzled while the B fragments read it swizzled
    "X tile swizzle on one side only": lambda s: s.replace("s_xw[DR_XW(pp, kp)] = lo | (hi << 16);",
                                                           "s_xw[pp * DR_XS + kp] = lo | (hi << 16);"),
    "C/D rows 0-7 and 8-15 swapped": lambda s: s.replace("const int row = mt * 16 + group + ((r & 2) ? 8 : 0);",
                                                         "const int row = mt * 16 + group + ((r & 2) ? 0 : 8);"),
    "A's high columns read 4 columns early": lambda s: s.replace("h8 = s_ahi[parity][kc + 8]",
                                                                 "h8 = s_ahi[parity][kc + 4]"),
}


@pytest.mark.parametrize("why", list(FRAGMENT_MUTATIONS))
def test_fragment_mutation_is_caught(tmp_path, monkeypatch, why):
    source = (cuda_dir() / "dw_dr.cu").read_text()
    mutated_text = FRAGMENT_MUTATIONS[why](source)
    assert mutated_text != source, f"mutation {why!r} no longer matches the kernel"
    mutated = tmp_path / "cuda"
    shutil.copytree(cuda_dir(), mutated)
    (mutated / "dw_dr.cu").write_text(mutated_text)
    monkeypatch.setenv("DEPRUNE_CUDA_DIR", str(mutated))
    case, tile = MMA_CASES["3x3-s1-same-c72"]
    for layout in ("nchw", "nhwc"):
        x, weight, mask, bias = case.tensors(torch.float16, layout == "nhwc")
        y = dw_dr(x, DRColumns.from_dense(weight, mask, tile=tile), bias, padding=case.padding, act=case.act,
                  backend="emu")
        assert not matches(y, reference(x, weight * mask, bias, case), torch.float16), f"{why} unnoticed in {layout}"


# ---- the launch plan ----------------------------------------------------------------------------------

def _geometry(x: torch.Tensor, cols: DRColumns, **conv):
    return prepare_conv(x, weight_name="cols", weight_tensors=(), num_channels=cols.num_channels,
                        kernel_size=cols.kernel_size, bias=None, act="identity", backend="emu",
                        **{"stride": 1, "padding": 0, "dilation": 1, **conv})[1]


def test_plan_of_a_mobilenet_layer():
    """MobileNetV2's 144-channel 56x56 3x3 layer at 78% (K' = 64 per full range, 32 in the 16-channel tail),
    batch 32, fp16 channels_last."""
    g = dw_dr_module.ConvGeometry(32, 144, 56, 56, 56, 56, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, True)
    plan = dw_dr_module.dw_dr_plan(g, torch.float16, [64, 64, 64, 64, 32])
    assert plan.kernel == "dr" and plan.entry == "deprune_dw_dr" and plan.tensor_cores
    assert plan.defines["DEPRUNE_DR_MMA"] == 1 and plan.defines["DEPRUNE_KH"] == 3 and plan.defines["DEPRUNE_SH"] == 1
    assert plan.grid == (-(-56 * 56 // 256), 5, 32) and plan.block == (256, 1, 1) and plan.smem_bytes == 0
    assert plan.extra["k_steps"] == (4, 4, 4, 4, 2) and plan.extra["zero_columns"] == 0
    assert plan.staged_bytes == 32 * (4 * 64 + 32) * 56 * 56 * 2
    assert plan.unique_bytes == 32 * 144 * 56 * 56 * 2
    assert plan.bytes_moved == plan.staged_bytes + 12 * 288 + 8 * 5 + 4 * 144 + 32 * 144 * 56 * 56 * 2
    fp32 = dw_dr_module.dw_dr_plan(g, torch.float32, [64, 64, 64, 64, 32])
    assert not fp32.tensor_cores and fp32.defines["DEPRUNE_DR_MMA"] == 0
    # HSR: an unaligned K' = 52 (MobileNetV3-Small at 82%) leaves 12 zero columns in its last K step
    unaligned = dw_dr_module.dw_dr_plan(g, torch.float16, [52, 64, 64, 64, 32])
    assert unaligned.extra["k_steps"][0] == 4 and unaligned.extra["zero_columns"] == 12


def test_plan_staged_bytes_count_in_bounds_gathers():
    """With DRColumns the plan counts exactly the input elements the im2col loads (padding reads skipped)."""
    g_ = torch.Generator().manual_seed(1)
    weight, mask = torch.randn(37, 1, 5, 5, generator=g_), torch.rand(37, 1, 5, 5, generator=g_) < 0.5
    cols = DRColumns.from_dense(weight, mask)
    x = torch.randn(2, 37, 11, 9).to(torch.bfloat16)
    g = _geometry(x, cols, stride=2, padding=(2, 1, 3, 1), dilation=(1, 2))
    plan = dw_dr_module.dw_dr_plan(g, x.dtype, cols)
    # brute force: every kept (channel, tap) x output position whose input coordinate is in the image
    xp = F.pad(torch.ones(1, 37, 11, 9), (3, 1, 2, 1))
    loads = F.conv2d(xp, mask.float(), None, 2, 0, (1, 2), groups=37).sum()
    assert plan.staged_bytes == 2 * int(loads) * 2


def test_dw_dr_launches_its_plan():
    case, tile = MMA_CASES["5x5-s2-same-c33"]
    x, weight, mask, bias = case.tensors(torch.bfloat16, True)
    cols = DRColumns.from_dense(weight, mask, tile=tile)
    with emulation.record_launches() as launches:
        dw_dr(x, cols, bias, stride=case.stride, padding=case.padding, act=case.act, backend="emu")
    plan = dw_dr_module.dw_dr_plan(_geometry(x, cols, stride=case.stride, padding=case.padding), x.dtype, cols)
    (launch,) = launches
    assert launch.entry == plan.entry and launch.grid == plan.grid and launch.block == plan.block
    assert dict(launch.defines) == {k: str(v) for k, v in plan.defines.items()}
    assert launch.static_smem == plan.extra["static_smem_bytes"]


@pytest.mark.parametrize("kwargs,match", [
    ({"cols": [64, 64]}, "ranges"),
    ({"cols": [64, 64, 64, 64, 300]}, "ranges"),
    ({"cols": [8] * 2, "group_size": 256}, "group_size"),
])
def test_plan_rejects_bad_column_counts(kwargs, match):
    g = dw_dr_module.ConvGeometry(1, 144, 8, 8, 8, 8, 3, 3, 1, 1, (1, 1, 1, 1), 1, 1, False)
    with pytest.raises(ValueError, match=match):
        dw_dr_module.dw_dr_plan(g, torch.float16, **kwargs)
