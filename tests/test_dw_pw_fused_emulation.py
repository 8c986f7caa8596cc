"""cuda/dw_pw_fused.cu through the host emulation, against the unfused pair in PyTorch (the DW conv on the
masked, BN-folded weight, the activation, one rounding to the storage dtype, the 1x1 conv, the residual).

- fixed cases shaped like MobileNetV2 / V3 / EfficientNet-B0 pairs: 3x3 and 5x5, stride 1 and 2, a residual,
  channel counts that are not a multiple of the chunk, output counts not a multiple of 8 and larger than one
  output block, SAME (asymmetric) padding, dilation, every activation, fp32 / fp16 / bf16;
- a seeded fuzz over random shapes (a short prefix by default, ``pytest -m fuzz``: 1000 shapes);
- the CUDA-core fallback compiled for fp16 (what a GPU before sm_80 runs) gives the tensor-core result;
- mutations of the kernel (fragment registers, the epilogue rows, the residual, the tap skip) are caught;
- the planner's choices and bytes for MobileNetV2 pairs, and bad input.
"""
from __future__ import annotations

import importlib
import os
import random
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from deprune_plugin.kernels import CompactTaps, dw_pw_fused, emulation_available
from deprune_plugin.kernels.activations import ACTIVATIONS, apply_activation
from deprune_plugin.kernels.launch import ConvGeometry
from deprune_plugin.kernels.sources import cuda_dir

fused_mod = importlib.import_module("deprune_plugin.kernels.dw_pw_fused")

_OK, _WHY = emulation_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"host emulation unavailable: {_WHY}")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FUZZ_SHAPES = int(os.environ.get("DEPRUNE_FUZZ_SHAPES", 1000))


def make(n, c, co, h, w, k, stride=1, pads=None, dilation=1, density=0.5, act="relu6", residual=False,
         dtype=torch.float16, seed=0):
    """Tensors of one pair: x (channels_last), taps, DW bias, 1x1 weight/bias, residual, padding."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    if pads is None:
        pads = (dilation * (kh - 1) // 2,) * 2 + (dilation * (kw - 1) // 2,) * 2
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, kh, kw, generator=g)
    keep = torch.rand(c, 1, kh, kw, generator=g) < density
    keep[: max(1, c // 10)] = False  # fully pruned channels: only their bias reaches the 1x1 conv
    dw_bias = torch.randn(c, generator=g)
    pw = torch.randn(co, c, generator=g) / c ** 0.5
    pw_bias = torch.randn(co, generator=g)
    oh = (h + pads[0] + pads[1] - dilation * (kh - 1) - 1) // stride + 1
    ow = (w + pads[2] + pads[3] - dilation * (kw - 1) - 1) // stride + 1
    res = torch.randn(n, co, oh, ow, generator=g).to(dtype) if residual else None
    return dict(x=x, weight=weight, keep=keep, dw_bias=dw_bias, pw=pw, pw_bias=pw_bias, res=res, pads=pads,
                stride=stride, dilation=dilation, act=act)


def reference(t) -> torch.Tensor:
    """The unfused pair: DW conv (fp32 on the storage values), activation, rounded to the storage dtype (as
    the DW kernel writes it), then the 1x1 conv and the residual in fp32."""
    x = t["x"]
    top, bottom, left, right = t["pads"]
    y = F.conv2d(F.pad(x.float().contiguous(), (left, right, top, bottom)), t["weight"] * t["keep"], t["dw_bias"],
                 t["stride"], 0, t["dilation"], x.shape[1])
    y = apply_activation(t["act"], y).to(x.dtype).float()
    out = F.conv2d(y, t["pw"].to(x.dtype).float()[:, :, None, None], t["pw_bias"])
    return out + t["res"].float() if t["res"] is not None else out


def run(t, **kw) -> torch.Tensor:
    return dw_pw_fused(t["x"], CompactTaps.from_dense(t["weight"], t["keep"]), t["dw_bias"], t["pw"], t["pw_bias"],
                       stride=t["stride"], padding=t["pads"], dilation=t["dilation"], act=t["act"],
                       residual=t["res"], backend="emu", **kw)


def check(t) -> None:
    y = run(t)
    ref = reference(t)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == t["x"].dtype
    dtype = t["x"].dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    else:  # one rounding of the fp32 result (plus the 1x1's summation order): a couple of ulps
        torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=2e-2, atol=2e-2)


# name: (n, c, co, h, w, k, stride, residual, act)
CASES = {
    "mbv2-144-56-s1-res": (2, 144, 24, 12, 12, 3, 1, True, "relu6"),
    "mbv2-96-s2": (2, 96, 24, 13, 11, 3, 2, False, "relu6"),
    "effnet-5x5-s2-silu": (1, 240, 40, 9, 9, 5, 2, False, "silu"),
    "effnet-5x5-s1-res-c-tail": (1, 72, 40, 7, 7, 5, 1, True, "silu"),  # 72 = 64 + a partial chunk
    "mbv3-hardswish-co-tail": (2, 40, 20, 6, 7, 3, 1, False, "hardswish"),
    "wide-out-several-blocks": (1, 64, 330, 5, 5, 3, 1, False, "relu"),  # 330 outputs: > one block, odd tail
    "identity-gelu-tiny-map": (3, 16, 8, 1, 1, 3, 1, True, "gelu"),
    "effnet-last-1152-5x5": (1, 1152, 160, 7, 7, 5, 1, False, "silu"),  # the widest expanded DW of the zoo
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_fused_pair_matches_the_unfused_pair(name, dtype):
    n, c, co, h, w, k, s, res, act = CASES[name]
    if DTYPES[dtype] == torch.float32 and c % 4 or DTYPES[dtype] != torch.float32 and c % 8:
        pytest.skip("C not a multiple of the vector")
    check(make(n, c, co, h, w, k, stride=s, act=act, residual=res, dtype=DTYPES[dtype]))


@pytest.mark.parametrize("pads", [(0, 1, 0, 1), (1, 1, 0, 2), (2, 0, 1, 1)])
def test_same_and_asymmetric_padding(pads):
    """TensorFlow SAME at stride 2 pads (0, 1, 0, 1); arbitrary asymmetric pads too."""
    check(make(2, 32, 16, 8, 9, 3, stride=2, pads=pads))


def test_dilation_and_a_non_square_window():
    check(make(1, 48, 24, 10, 9, (3, 5), dilation=2, pads=(2, 2, 4, 4)))


def test_all_taps_pruned_leaves_bias_through_the_1x1():
    t = make(1, 32, 16, 5, 5, 3, act="relu")
    t["keep"][:] = False
    y = run(t)
    expected = F.conv2d(F.relu(t["dw_bias"]).to(torch.float16).float()[None, :, None, None], t["pw"][:, :, None, None],
                        t["pw_bias"])
    torch.testing.assert_close(y.float(), expected.expand_as(y).to(torch.float16).float(), rtol=1e-2, atol=1e-2)


def test_nchw_input_is_made_channels_last_and_gives_the_same_result():
    t = make(2, 32, 16, 6, 6, 3)
    y_cl = run(t)
    t["x"] = t["x"].contiguous()
    torch.testing.assert_close(run(t), y_cl)


# ---- the planner ------------------------------------------------------------------------------------

def _mbv2(c, h, s, co, n=32):
    oh = (h + 2 - 3) // s + 1
    return ConvGeometry(n, c, h, h, oh, oh, 3, 3, s, s, (1, 1, 1, 1), 1, 1, True)


def test_plan_of_a_mobilenetv2_pair():
    """The 144-channel 56x56 pair (PW-conv2 pruned to 12 of 24 outputs), batch 32, fp16, residual: one
    output block (no DW recompute), tensor cores, within 48 KB, halos < 1.4x the input, and under a third of
    the eager BN-folded pair's bytes (gpu_performance.md: 163.8 MB for the unpruned 24-output pair)."""
    g = _mbv2(144, 56, 1, 24)
    plan = fused_mod.dw_pw_fused_plan(g, 24, torch.float16, residual=True, act="relu6")
    assert plan.kernel == "fused" and plan.tensor_cores and plan.block == (256, 1, 1)
    assert plan.extra["dw_recompute"] == 1 and plan.grid[1] == 1 and plan.grid[2] == 32
    assert plan.smem_bytes <= 48 * 1024 and 1.0 < plan.staged_over_unique < 1.4
    assert plan.extra["bytes_moved_unfused"] == pytest.approx(163.8e6, rel=0.01)  # the doc's eager figure
    assert plan.extra["bytes_moved_layer"] == pytest.approx(96.3e6, rel=0.01)     # perfect epilogues
    assert plan.bytes_moved < plan.extra["bytes_moved_unfused"] / 3
    unique = 32 * 144 * 56 * 56 * 2 + 2 * 32 * 24 * 56 * 56 * 2  # input once, output and residual once
    assert unique < plan.bytes_moved < 1.4 * unique


def test_plan_keeps_accumulators_within_registers_and_covers_wide_outputs():
    for co in (8, 24, 160, 320, 1000):
        plan = fused_mod.dw_pw_fused_plan(_mbv2(960, 7, 1, co), co, torch.float16, smem_limit=227 * 1024)
        th, tw = plan.extra["tile"]
        cob = plan.extra["out_block"]
        assert th * tw * cob <= 40 * 256 and cob % 8 == 0 and ((th * tw // 16) * (cob // 8)) % 8 == 0
        assert plan.grid[1] * cob >= co


def test_fp32_plans_use_cuda_cores():
    assert not fused_mod.dw_pw_fused_plan(_mbv2(144, 56, 1, 24), 24, torch.float32).tensor_cores


# ---- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    (lambda t: t.update(x=t["x"][:, :30].contiguous(memory_format=torch.channels_last),
                        weight=t["weight"][:30], keep=t["keep"][:30], dw_bias=t["dw_bias"][:30], pw=t["pw"][:, :30]),
     "C a multiple of 8"),
    (lambda t: t.update(pw=t["pw"][:, :16]), "pw_weight must be"),
    (lambda t: t.update(pw_bias=t["pw_bias"][:3]), "pw_bias must be"),
    (lambda t: t.update(res=torch.zeros(2, 16, 3, 3)), "residual must be"),
])
def test_bad_input_names_the_argument(change, match):
    t = make(2, 32, 16, 6, 6, 3, residual=True)
    change(t)
    with pytest.raises((ValueError, TypeError), match=match):
        run(t)


# ---- the CUDA-core fallback -------------------------------------------------------------------------

def test_cuda_core_fallback_matches_the_tensor_core_path(monkeypatch):
    t = make(2, 72, 40, 7, 7, 3, residual=True, dtype=torch.float16)
    y_mma = run(t)
    real = fused_mod.dw_pw_fused_plan
    monkeypatch.setattr(fused_mod, "dw_pw_fused_plan", lambda *a, **k: real(*a, **{**k, "tensor_cores": False}))
    y_cc = run(t)
    assert fused_mod.dw_pw_fused_plan(_mbv2(72, 7, 1, 40), 40, torch.float16).defines["DEPRUNE_FUSED_MMA"] == 0
    torch.testing.assert_close(y_cc.float(), y_mma.float(), rtol=2e-2, atol=2e-2)
    check(t)


# ---- mutations of the kernel are caught -------------------------------------------------------------

def _swap(text: str, a: str, b: str) -> str:
    return text.replace(a, "\0").replace(b, a).replace("\0", b)


MUTATIONS = {
    "A registers 1 and 2 swapped": lambda s: _swap(s, "af[1] = ", "af[2] = "),
    "B registers swapped": lambda s: _swap(s, "bf[0] = ", "bf[1] = "),
    "epilogue rows 0-7 and 8-15 swapped": lambda s: s.replace("const int p = mrow + group + 8 * h;",
                                                              "const int p = mrow + group + 8 * (1 - h);"),
    "residual dropped": lambda s: s.replace("v[0] += deprune_to_float(r.v[0]);", ""),
    "paired outputs swapped": lambda s: s.replace("&out.v[0], v[0]", "&out.v[0], v[1]").replace("&out.v[1], v[1]",
                                                                                              "&out.v[1], v[0]"),
    "residual dropped in the per-element tail": lambda s: s.replace(
        "if (rn != nullptr) w += deprune_to_float(rn[pix * CO + o]);", ""),
    "tap skip inverted": lambda s: s.replace("{ return (keep[t >> 5] >> (t & 31)) & 1u; }",
                                             "{ return !((keep[t >> 5] >> (t & 31)) & 1u); }"),
    "second DW row reads the first row's input": lambda s: s.replace("a[r / SH][e] += wt[e] * xv[e];",
                                                                     "a[0][e] += wt[e] * xv[e];"),
    "DW bias dropped": lambda s: s.replace("(dw_bias != nullptr && c < C ? dw_bias[c] : 0.0f)", "0.0f"),
    "top padding dropped": lambda s: s.replace("const int iy0 = oy0 * SH - PH;", "const int iy0 = oy0 * SH;"),
}


@pytest.mark.parametrize("why", list(MUTATIONS))
def test_kernel_mutation_is_caught(tmp_path, monkeypatch, why):
    source = (cuda_dir() / "dw_pw_fused.cu").read_text()
    mutated_text = MUTATIONS[why](source)
    assert mutated_text != source, f"mutation {why!r} no longer matches the kernel"
    mutated = tmp_path / "cuda"
    shutil.copytree(cuda_dir(), mutated)
    (mutated / "dw_pw_fused.cu").write_text(mutated_text)
    monkeypatch.setenv("DEPRUNE_CUDA_DIR", str(mutated))
    # the plan a GPU of one SM gets (8-row tiles, two DW rows per item): a plan that fills 132 SMs with this
    # small map would take 1-row tiles, and the mutated two-row code would not run
    real = fused_mod.dw_pw_fused_plan
    monkeypatch.setattr(fused_mod, "dw_pw_fused_plan", lambda *a, **k: real(*a, **{**k, "sms": 1}))
    # 72 channels: a partial last chunk; 40 outputs (39, odd: the per-element epilogue); a residual: every
    # mutated line matters here
    t = make(2, 72, 39 if "per-element" in why else 40, 7, 7, 3, residual=True, dtype=torch.float16)
    y = run(t)
    ref = reference(t)
    assert not torch.allclose(y.float(), ref.to(torch.float16).float(), rtol=2e-2, atol=2e-2), f"{why} unnoticed"


# ---- fuzz -------------------------------------------------------------------------------------------

def fuzz_cases(count: int, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        dtype = rng.choice(list(DTYPES))
        lane = 4 if dtype == "fp32" else 8
        k = rng.choice([3, 3, 5, 7, (3, 5)])
        stride = rng.choice([1, 1, 2])
        dilation = rng.choice([1, 1, 1, 2])
        kh, kw = (k, k) if isinstance(k, int) else k
        pads = tuple(rng.randint(0, dilation * (kk - 1)) for kk in (kh, kh, kw, kw))
        h, w = rng.randint(1, 14), rng.randint(1, 14)
        if h + pads[0] + pads[1] < dilation * (kh - 1) + 1 or w + pads[2] + pads[3] < dilation * (kw - 1) + 1:
            h, w = h + dilation * (kh - 1), w + dilation * (kw - 1)
        out.append(dict(n=rng.randint(1, 2), c=lane * rng.randint(1, 24), co=rng.randint(1, 200), h=h, w=w, k=k,
                        stride=stride, pads=pads, dilation=dilation, density=rng.random(),
                        act=rng.choice(["identity", "relu", "relu6", "silu", "hardswish", "gelu"]),
                        residual=rng.random() < 0.5, dtype=DTYPES[dtype], seed=i))
    return out


def _fuzz(count: int) -> None:
    failures = []
    for kw in fuzz_cases(count):
        try:
            check(make(**kw))
        except AssertionError as e:
            failures.append(f"{kw}: {str(e).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {count} shapes failed:\n" + "\n".join(failures[:10])


def test_fuzz_sample():
    _fuzz(16)  # each shape is a build of its own (geometry is compile-time): a short prefix in CI


@pytest.mark.fuzz
def test_fuzz():
    _fuzz(FUZZ_SHAPES)


# ---- walks: several tiles per CTA, the shared input rows kept in shared memory ----------------------

def _force_walk(monkeypatch, walk: int) -> None:
    """Make the launcher use ``walk`` tiles per CTA (the planner's tile, chunk and output block otherwise; the
    halo buffer may then need more than the default 48 KB: the emulated device opts in to 100 KB)."""
    real = fused_mod.dw_pw_fused_plan
    monkeypatch.setenv("DEPRUNE_EMU_SMEM_OPTIN", str(100 * 1024))

    def plan(g, co, dtype, **kw):
        p = real(g, co, dtype, **kw)
        th, tw = p.extra["tile"]
        defines = {**p.defines, "DEPRUNE_WALK": walk}
        smem = fused_mod.fused_smem_bytes(g, torch.empty((), dtype=dtype).element_size(), th, tw,
                                          p.extra["chunk"], p.extra["out_block"], walk)
        grid = (-(-g.oh // (th * walk)) * -(-g.ow // tw), p.grid[1], p.grid[2])
        return replace(p, defines=defines, smem_bytes=smem, grid=grid)
    monkeypatch.setattr(fused_mod, "dw_pw_fused_plan", plan)


@pytest.mark.parametrize("walk", [3, 8])
@pytest.mark.parametrize("k, stride", [(3, 1), (3, 2), (5, 1)])
def test_a_walk_over_tiles_gives_the_same_result(monkeypatch, walk, k, stride):
    """Tall maps (more tile rows than the walk, and a last walk cut short) through 2-8 tiles per CTA."""
    _force_walk(monkeypatch, walk)
    check(make(1, 72, 24, 37, 9, k, stride=stride, residual=stride == 1, act="silu"))


def test_planner_walks_on_large_stride1_maps():
    plan = fused_mod.dw_pw_fused_plan(_mbv2(144, 56, 1, 12), 12, torch.float16, residual=True)
    assert plan.extra["walk"] > 1 and plan.defines["DEPRUNE_WALK"] == plan.extra["walk"]
    th, tw = plan.extra["tile"]
    assert plan.grid[0] == -(-56 // (th * plan.extra["walk"])) * -(-56 // tw)
    assert plan.staged_over_unique < 1.2  # vs ~1.34 for single 8x16 tiles


@pytest.mark.parametrize("why, old, new", [
    ("halo rows not kept", "for (int e = tid; e < HALO_ITEMS; e += THREADS) halo[e] = tail[e];", ""),
    ("halo kept from the wrong rows", "(IN_H - OVERLAP) * IN_W * NVC;", "(IN_H - OVERLAP - 1) * IN_W * NVC;"),
])
def test_walk_mutation_is_caught(tmp_path, monkeypatch, why, old, new):
    source = (cuda_dir() / "dw_pw_fused.cu").read_text()
    assert source.count(old) == 1, f"mutation {why!r} no longer matches the kernel"
    mutated = tmp_path / "cuda"
    shutil.copytree(cuda_dir(), mutated)
    (mutated / "dw_pw_fused.cu").write_text(source.replace(old, new))
    monkeypatch.setenv("DEPRUNE_CUDA_DIR", str(mutated))
    _force_walk(monkeypatch, 4)
    t = make(1, 32, 16, 33, 8, 3, residual=True)
    assert not torch.allclose(run(t).float(), reference(t).to(torch.float16).float(), rtol=2e-2, atol=2e-2), why


# ---- the tap tables ---------------------------------------------------------------------------------

def test_tap_tables_by_hand():
    """8 channels of a 3x3 weight: channel c keeps tap c (and channel 0 also tap 8); with 4-channel vectors
    vector 0 keeps taps {0, 1, 2, 3, 8}, vector 1 taps {4, 5, 6, 7}."""
    weight = torch.arange(1, 73, dtype=torch.float32).reshape(8, 1, 3, 3)
    keep = torch.zeros(8, 1, 3, 3, dtype=torch.bool)
    for c in range(8):
        keep.view(8, 9)[c, c] = True
    keep.view(8, 9)[0, 8] = True
    taps = CompactTaps.from_dense(weight, keep)
    tap_w, vec_keep = fused_mod.fused_tap_tables(taps, 4)
    assert tap_w.shape == (9, 8) and tap_w.dtype == torch.float32
    assert tap_w[0, 0] == 1 and tap_w[8, 0] == 9 and tap_w[3, 3] == 3 * 9 + 4 and tap_w[1, 0] == 0
    assert int((tap_w != 0).sum()) == 9
    assert vec_keep.tolist() == [[0b100001111, 0b11110000]]
    assert fused_mod.fused_tap_tables(taps, 8)[1].tolist() == [[0b111111111]]


def test_tap_tables_are_cached_and_rebuilt_after_an_in_place_change():
    taps = CompactTaps.from_dense(torch.randn(16, 1, 5, 5))
    first = fused_mod.fused_tap_tables(taps, 8)
    assert fused_mod.fused_tap_tables(taps, 8)[0] is first[0]  # same tensors: a planned launch may hold them
    taps.tap_val.mul_(2)
    again = fused_mod.fused_tap_tables(taps, 8)
    assert again[0] is not first[0] and torch.equal(again[0], 2 * first[0])


def test_taps_past_bit_31_and_windows_over_32_taps():
    """A 7x7 window: 49 taps in two mask words, bit 31 set (an int32 sign bit) and tap 48 in word 1."""
    keep = torch.zeros(8, 1, 7, 7, dtype=torch.bool)
    keep.view(8, 49)[0, 31] = keep.view(8, 49)[1, 48] = True
    _, vec_keep = fused_mod.fused_tap_tables(CompactTaps.from_dense(torch.ones(8, 1, 7, 7), keep), 8)
    assert vec_keep.shape == (2, 1) and vec_keep[0, 0].item() == -(2**31) and vec_keep[1, 0].item() == 1 << 16
    check(make(1, 8, 8, 9, 9, 7, density=0.3))


def test_the_activation_is_compiled_in_and_a_runtime_code_still_works(monkeypatch):
    """The planner compiles the activation's code in (DEPRUNE_ACT); a specialisation without it (-1) takes the
    launch's runtime code and gives the same result."""
    plan = fused_mod.dw_pw_fused_plan(_mbv2(32, 8, 1, 16), 16, torch.float16, act="hardswish")
    assert plan.defines["DEPRUNE_ACT"] == ACTIVATIONS["hardswish"].code
    t = make(1, 32, 16, 8, 8, 3, act="hardswish")
    compiled = run(t)
    real = fused_mod.dw_pw_fused_plan

    def runtime_act(*a, **k):
        p = real(*a, **k)
        return replace(p, defines={**p.defines, "DEPRUNE_ACT": -1})
    monkeypatch.setattr(fused_mod, "dw_pw_fused_plan", runtime_act)
    torch.testing.assert_close(run(t), compiled)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("k, stride, dilation", [(3, 1, 1), (5, 1, 2), ((3, 5), 2, 1)])
def test_one_and_two_output_rows_per_dw_item(monkeypatch, rows, k, stride, dilation):
    real = fused_mod.dw_pw_fused_plan

    def plan(*a, **kw):
        p = real(*a, **{**kw, "sms": 1})  # one SM: the tallest tile (a 132-SM plan of this map has 1-row tiles)
        return replace(p, defines={**p.defines, "DEPRUNE_DW_ROWS": rows})
    monkeypatch.setattr(fused_mod, "dw_pw_fused_plan", plan)
    check(make(2, 48, 24, 12, 11, k, stride=stride, dilation=dilation, residual=stride == 1, density=0.4))


def test_planner_uses_two_rows_where_every_thread_still_gets_an_item():
    g = _mbv2(144, 56, 1, 12)
    plan = fused_mod.dw_pw_fused_plan(g, 12, torch.float16)
    th, tw = plan.extra["tile"]
    vectors = plan.extra["chunk"] // 8
    assert plan.defines["DEPRUNE_DW_ROWS"] == (2 if th % 2 == 0 and th * tw // 2 * vectors >= 256 else 1)
