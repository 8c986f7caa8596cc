"""The static kernel report (``deprune kernels``, :mod:`deprune_plugin.kernels.report`): SASS parsing and the
occupancy arithmetic on hand-made inputs (no toolkit needed), then the report over MobileNetV2's DW layers at
batch 32, fp16, channels_last, sm_90 (``nvcc``-marked: compiles with nvcc, reads cuobjdump) and the promises
made about the kernels: no spills, 128-bit loads, little halo re-staging, HMMA in the DR kernel, >= 60% of
copy bandwidth modelled for the direct kernel."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deprune_plugin.kernels.launch import ConvGeometry
from deprune_plugin.kernels.plan import KernelPlan
from deprune_plugin.kernels.report import (ARCHS, DWLayer, analyze_sass, find_tool, format_report, kernel_plan,
                                           kernel_report, load_layers, occupancy, save_layers)

RESULTS = Path(__file__).resolve().parents[1] / "examples" / "results"
TOOLS = find_tool("nvcc") is not None and find_tool("cuobjdump") is not None
ROW_FIELDS = {"layer", "kernel", "registers", "spills", "occupancy", "global_load_bits", "staging_load_bits",
              "instr_per_staged_element", "instr_per_mac", "staged_over_unique", "bytes_moved", "bytes_min",
              "tensor_cores", "modelled_us", "roofline_us", "modelled_pct_copy_bw", "bound", "grid", "block",
              "smem_bytes", "geometry"}


def _sass(lines: list[str]) -> str:
    """cuobjdump-style text: one ``/*addr*/ OP operands ;`` per instruction, 16 bytes apart."""
    body = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(lines))
    return f"\t\tFunction : k\n{body}\n"


def test_sass_staging_loop_width_and_instructions_per_element():
    # the input pointer (parameter 0, c[0x0][0x210] on sm_90) feeds a staging loop (LDG.E.U16 then STS, 5
    # instructions, one element per iteration); a tap loop of 2 LDS + 2 FFMA + branch (8 instructions) loads
    # 32-bit weights through another parameter (c[0x0][0x220]): not an input load
    sass = _sass(["LDC.64 R4, c[0x0][0x210]", "IMAD.WIDE R4, R0, 0x2, R4", "LDC.64 R8, c[0x0][0x220]",
                  "IADD3 R2, R2, 0x1, RZ", "LDG.E.U16 R3, desc[UR4][R4.64]", "STS.U16 [R5], R3",
                  "ISETP.GE.AND P0, PT, R2, R6, PT", "@!P0 BRA 0x30", "BAR.SYNC.DEFER_BLOCKING 0x0",
                  "LDG.E.CONSTANT R7, desc[UR4][R8.64]", "LDS R9, [R10]", "LDS R11, [R12]",
                  "FFMA R13, R7, R9, R13", "FFMA R14, R7, R11, R14", "HFMA2.MMA R15, -RZ, RZ, 0, 0",
                  "ISETP.GE.AND P1, PT, R2, R6, PT", "@!P1 BRA 0x90", "EXIT", "BRA 0x120"])
    s = analyze_sass(sass, elem_bits=16)
    assert s.loops == 2  # the trailing self-branch is no loop
    assert s.global_load_bits == 16 and s.staging_load_bits == 16  # the 32-bit weight load is not the input
    assert s.staging_instructions == 5 and s.instr_per_staged_element == 5
    assert s.macs_per_warp_iteration == 64 and s.mac_instructions == 8  # HFMA2.MMA RZ moves are no math
    assert s.lds_cycles_per_iteration == 2 and not s.tensor_cores
    assert analyze_sass(sass, elem_bits=16, input_param=None).global_load_bits == 32  # every load counts


def test_sass_unrolled_vector_staging_cp_async_and_tensor_cores():
    # staging fully unrolled: two 128-bit input loads between a label and the barrier, no loop around them
    sass = _sass(["ULDC.64 UR6, c[0x0][0x210]", "LDC.64 R20, c[0x0][0x228]", "@P0 BRA 0x30",
                  "MOV R1, R0", "IADD3 R2, P0, R0, UR6, RZ", "IADD3.X R3, RZ, UR7, RZ, P0, !PT",
                  "LDG.E.128.CONSTANT R4, desc[UR4][R2.64]", "LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x10]",
                  "STS.128 [R1], R4", "STS.128 [R1+0x10], R8", "BAR.SYNC.DEFER_BLOCKING 0x0",
                  "LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R20.64]", "LDSM.16.M88.4 R4, [R1]",
                  "HMMA.16816.F32 R8, R4, R6, R8", "@P1 BRA 0xb0", "EXIT"])
    s = analyze_sass(sass, elem_bits=16)
    assert s.global_load_bits == 128 and s.staging_load_bits == 128  # LTC128B is a cache hint, not the width
    assert s.staging_instructions == 7 and s.staging_elements == 16 and s.staging_loads == 2
    assert s.tensor_cores and s.macs_per_warp_iteration == 16 * 8 * 16


def test_sass_per_kind_loops_of_a_fused_kernel():
    """A fused pair's SASS: a CUDA-core loop (FFMA) for the DW taps, and tensor-core steps (HMMA) either in a
    loop of their own or, with one K step per chunk, straight-line between two barriers."""
    dw_loop = ["LDG.E.128 R20, desc[UR4][R22.64]", "STS.128 [R1], R20", "BAR.SYNC.DEFER_BLOCKING 0x0",
               "LDS.128 R4, [R2]", "FFMA R8, R4, R5, R8", "FFMA R9, R6, R7, R9", "@P0 BRA 0x30"]
    looped = _sass([*dw_loop, "BAR.SYNC.DEFER_BLOCKING 0x0", "LDS R10, [R3]", "HMMA.16816.F32 R12, R10, R11, R12",
                    "HMMA.16816.F32 R16, R10, R11, R16", "@P1 BRA 0x80", "EXIT"])
    s = analyze_sass(looped, elem_bits=16, input_param=None)
    assert s.cc_loop == (64, 4, 4.0) and s.tc_loop == (2 * 16 * 8 * 16, 4, 1.0)
    straight = _sass([*dw_loop, "BAR.SYNC.DEFER_BLOCKING 0x0", "LDS R10, [R3]", "HMMA.16816.F32 R12, R10, R11, R12",
                      "BAR.SYNC.DEFER_BLOCKING 0x0", "EXIT"])
    s = analyze_sass(straight, elem_bits=16, input_param=None)
    assert s.cc_loop == (64, 4, 4.0) and s.tc_loop == (16 * 8 * 16, 2, 1.0)


def test_occupancy_against_the_sm90_limits():
    sm90 = ARCHS["sm_90"]
    occ = occupancy(sm90, 256, 40, 0)  # 1280 registers per warp -> 51 warps -> 6 blocks of 8 warps
    assert occ["warps_per_sm"] == 48 and occ["occupancy"] == 0.75 and occ["limiter"] == "registers"
    assert occupancy(sm90, 128, 32, 0)["occupancy"] == 1.0
    occ = occupancy(sm90, 128, 32, 100 * 1024)  # 228 KB / (100 KB + 1 KB reserved) = 2 blocks
    assert occ["blocks_per_sm"] == 2 and occ["limiter"] == "shared_memory"


def _layer(c=144, hw=56, stride=1, n=32, nhwc=True) -> DWLayer:
    out = (hw + 2 - 3) // stride + 1
    g = ConvGeometry(n, c, hw, hw, out, out, 3, 3, stride, stride, (1, 1, 1, 1), 1, 1, nhwc)
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(c, 9, generator=gen)
    keep = torch.zeros(c, 9, dtype=torch.bool)
    keep.scatter_(1, scores.topk(2, dim=1).indices, True)  # 2 of 9 taps per channel (78% pruned)
    return DWLayer(f"dw{c}x{hw}s{stride}", g, keep.reshape(c, 1, 3, 3))


@pytest.mark.parametrize("kernel", ["direct", "dr"])
def test_plans_count_bytes_consistently(kernel):
    la = _layer()
    plan = kernel_plan(kernel, la, torch.float16, ARCHS["sm_90"])
    assert isinstance(plan, KernelPlan) and plan.kernel == kernel
    g = la.geometry
    assert plan.unique_bytes == 2 * g.n * g.c * g.h * g.w
    assert plan.bytes_moved >= plan.staged_bytes + 2 * g.n * g.c * g.oh * g.ow
    assert plan.grid[2] >= 1 and all(d >= 1 for d in plan.block)


def test_layers_file_round_trip(tmp_path):
    layers = [_layer(), _layer(96, 112, 2)]
    save_layers(layers, tmp_path / "l.pt")
    back = load_layers(tmp_path / "l.pt")
    assert [b.geometry for b in back] == [a.geometry for a in layers]
    assert all(torch.equal(a.keep, b.keep) for a, b in zip(layers, back))


def test_the_cli_without_the_toolkit_is_one_line(monkeypatch, capsys):
    from deprune_plugin.app import cli
    from deprune_plugin.kernels import report

    monkeypatch.setattr(report, "find_tool", lambda name: None)
    assert cli.main(["kernels", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nvcc" in err[0]


# ---- the report over MobileNetV2's DW layers (nvcc + cuobjdump) -------------------------------------------

def _mobilenetv2_layers(batch: int = 32) -> list[DWLayer]:
    """MobileNetV2's 17 DW layers at 224x224 (geometry from the timm model, unpruned 1x1 convs), 2 of 9 taps kept
    per channel."""
    from deprune_plugin.app.kernel_report import dw_layers
    from deprune_plugin.core.zoo import build_model

    layers = dw_layers(build_model("timm", "mobilenetv2_100"), 224, batch)
    out = []
    for la in layers:
        c = la.geometry.c
        scores = torch.rand(c, 9, generator=torch.Generator().manual_seed(c))
        keep = torch.zeros(c, 9, dtype=torch.bool).scatter_(1, scores.topk(2, dim=1).indices, True)
        out.append(replace(la, keep=keep.reshape(c, 1, 3, 3)))  # the pairs (pw_out, residual) kept
    return out


@pytest.fixture(scope="module")
def mbv2_report():
    if not TOOLS:
        pytest.skip("nvcc or cuobjdump not found")
    return kernel_report(_mobilenetv2_layers(), "sm_90", torch.float16, progress=False)


@pytest.mark.nvcc
@pytest.mark.skipif(not TOOLS, reason="nvcc or cuobjdump not found")
def test_report_schema(mbv2_report):
    rep = json.loads(json.dumps(mbv2_report))  # plain JSON
    assert (rep["arch"], rep["batch"], rep["dtype"]) == ("sm_90", 32, "float16")
    assert len(rep["layers"]) == 17 * 3
    for row in rep["layers"]:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["kernel"] in ("direct", "dr", "fused")
        assert isinstance(row["tensor_cores"], bool) and row["global_load_bits"] in (8, 16, 32, 64, 128)
        assert row["modelled_pct_copy_bw"] > 0 and row["modelled_us"] > 0 and row["roofline_us"] > 0
        if row["staged_over_unique"] >= 1:  # (a kernel reading less than the input, e.g. a stride-2 DR whose
            assert row["modelled_pct_copy_bw"] <= 100  # kept taps skip pixels, can beat the dense roofline)
        assert 0 < row["occupancy"] <= 1
        # the grid: CTAs, the waves they make, a CTA per SM where the kernel's plans allow it; no stack frame
        assert row["ctas"] == math.prod(row["grid"]) and row["ctas"] >= min(132, row["allowed_ctas"])
        assert row["waves"] >= 1 and row["grid_factor"] >= 1
        assert row["stack_frame_bytes"] == 0 and row["local_instrs"] == 0
        if row["kernel"] == "fused" and row["dw_recompute"] == 1:  # (output blocks that each recompute the DW
            assert row["bytes_moved_unfused"] > row["bytes_moved"]     # chunk can lose: measured at run time)
    assert set(rep["summary"]) == {"direct", "dr", "fused"} and rep["unfused_layers"] == []


@pytest.mark.nvcc
@pytest.mark.skipif(not TOOLS, reason="nvcc or cuobjdump not found")
def test_no_kernel_spills(mbv2_report):
    assert [r["layer"] + "/" + r["kernel"] for r in mbv2_report["layers"] if r["spills"]] == []


@pytest.mark.nvcc
@pytest.mark.skipif(not TOOLS, reason="nvcc or cuobjdump not found")
def test_direct_stages_little_halo_on_large_stride1_layers(mbv2_report):
    rows = [r for r in mbv2_report["layers"] if r["kernel"] == "direct" and r["geometry"]["stride"] == [1, 1]
            and r["geometry"]["oh"] >= 28 and r["geometry"]["ow"] >= 28]
    assert len(rows) == 4  # 112x112 (32 ch), 56x56 (144), 28x28 (192) x 2
    assert {r["layer"]: r["staged_over_unique"] for r in rows if r["staged_over_unique"] > 1.3} == {}


@pytest.mark.nvcc
@pytest.mark.skipif(not TOOLS, reason="nvcc or cuobjdump not found")
def test_fp16_nhwc_direct_loads_128_bits(mbv2_report):
    rows = [r for r in mbv2_report["layers"] if r["kernel"] == "direct"]
    assert {(r["global_load_bits"], r["staging_load_bits"]) for r in rows} == {(128, 128)}


@pytest.mark.nvcc
@pytest.mark.skipif(not TOOLS, reason="nvcc or cuobjdump not found")
def test_dr_runs_on_tensor_cores(mbv2_report):
    rows = [r for r in mbv2_report["layers"] if r["kernel"] == "dr"]
    assert all(r["tensor_cores"] for r in rows)


@pytest.mark.nvcc
@pytest.mark.skipif(not TOOLS, reason="nvcc or cuobjdump not found")
def test_direct_is_modelled_at_60_percent_of_copy_bandwidth(mbv2_report):
    assert mbv2_report["summary"]["direct"]["modelled_pct_copy_bw"] >= 60


@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.skipif(not TOOLS, reason="nvcc or cuobjdump not found")
def test_deprune_kernels_command_writes_the_json(tmp_path, capsys):
    from deprune_plugin.app import cli

    out = tmp_path / "k.json"
    code = cli.main(["kernels", "--model", "mobilenetv2_100", "--arch", "sm_90", "--batch", "32", "--dtype",
                     "float16", "--json", str(out), "--quiet", "--kernels", "direct"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads(out.read_text())
    assert (rep["arch"], rep["batch"], rep["dtype"], rep["model"]) == ("sm_90", 32, "float16", "mobilenetv2_100")
    assert len(rep["layers"]) == 17 and rep["pruning"]["variant"] == "BH"
    kept = [r["kept_taps"] / r["taps"] for r in rep["layers"]]
    assert all(0.15 < k < 0.3 for k in kept), kept  # DEPrune-BH at 78% of taps
    assert "direct:" in capsys.readouterr().out


@pytest.mark.nvcc
@pytest.mark.skipif(not TOOLS, reason="nvcc or cuobjdump not found")
def test_fused_rows(mbv2_report):
    """Every MobileNetV2 DW conv pairs with its projection (10 with the residual add); the pairs run the 1x1 on
    tensor cores and, where one output block covers the 1x1 (no DW recompute), move fewer bytes than even the
    perfect-epilogue pair; the summary adds them up."""
    rows = [r for r in mbv2_report["layers"] if r["kernel"] == "fused"]
    assert len(rows) == 17 and sum(r["residual"] for r in rows) == 10
    assert all(r["tensor_cores"] and r["act"] == "relu6" for r in rows)
    for r in rows:
        assert r["bytes_min"] <= r["bytes_moved"] and r["bytes_moved_layer"] < r["bytes_moved_unfused"]
        if r["dw_recompute"] == 1:  # output blocks that each recompute the DW chunk (wide 1x1s) may move more
            assert r["bytes_moved"] < r["bytes_moved_layer"]
        assert r["fused_over_unfused"] == round(r["bytes_moved"] / r["bytes_moved_unfused"], 3)
        assert r["modelled_us"] < r["modelled_unfused_us"]
    assert sum(r["dw_recompute"] > 1 for r in rows) <= 3  # only the widest late pairs (14x14 / 7x7, 1x1 >= 320)
    s = mbv2_report["summary"]["fused"]
    assert s["bytes_moved"] == sum(r["bytes_moved"] for r in rows)
    # 0.347 when the 14x14 / 7x7 pairs launched 64-96 CTAs at batch 32; a CTA per SM costs their smaller tiles'
    # halos and, on the 7x7 pairs, a DW recompute per output block (about 0.40 with these unpruned 1x1 convs)
    assert s["fused_over_unfused"] == round(s["bytes_moved"] / s["bytes_moved_unfused"], 3) < 0.42
    assert s["modelled_us"] < s["modelled_unfused_us"]


def test_dw_layers_know_their_pairs_and_why_se_blocks_are_not_fused():
    from deprune_plugin.app.kernel_report import dw_layers
    from deprune_plugin.core.zoo import build_model

    mbv2 = dw_layers(build_model("timm", "mobilenetv2_050"), 64, 2)
    assert [la.pw_out for la in mbv2[:3]] == [8, 16, 16] and sum(la.residual for la in mbv2) == 10
    eff = dw_layers(build_model("timm", "efficientnet_b0"), 64, 2)
    assert len(eff) == 16 and all(la.pw_out == 0 and "SE block" in la.pw_note for la in eff)
    with pytest.raises(ValueError, match="no fusable 1x1 conv"):
        kernel_plan("fused", eff[0], torch.float16, ARCHS["sm_90"])


@pytest.mark.parametrize("name", ["kernels_report_baseline_sm90_b32_fp16.json", "kernels_report_sm90_b32_fp16.json"])
def test_committed_reports_hold_every_layer_and_kernel(name):
    rep = json.loads((RESULTS / name).read_text())
    assert (rep["arch"], rep["batch"], rep["dtype"]) == ("sm_90", 32, "float16")
    assert {(r["kernel"]) for r in rep["layers"]} == {"direct", "dr"} and len(rep["layers"]) == 34
    assert all(ROW_FIELDS <= set(r) for r in rep["layers"])


def test_the_committed_fused_report_fills_the_gpu():
    """The committed fused report (``deprune kernels --model mobilenetv2_100 --arch sm_90 --batch 32``): every
    row launches a CTA per SM (the problem allows more everywhere at batch 32), no stack frame or spill, and the
    text report shows the CTAs, waves and stack frame per row."""
    rep = json.loads((RESULTS / "kernels_report_fused_sm90_b32_fp16.json").read_text())
    assert (rep["arch"], rep["batch"], rep["assumptions"]["sms"]) == ("sm_90", 32, 132)
    assert len(rep["layers"]) == 17 * 3
    for r in rep["layers"]:
        assert r["allowed_ctas"] >= 132 and 132 <= r["ctas"] == math.prod(r["grid"]), r["layer"]
        assert r["stack_frame_bytes"] == 0 and r["spills"] == 0 and r["local_instrs"] == 0
    head = format_report(rep).splitlines()[1].split()
    assert {"CTAs", "waves", "stack"} <= set(head)


def test_the_committed_reports_cover_the_same_layers():
    """Side by side: the baseline and today's report are over the same pruned layers (geometry and kept taps)."""
    old, new = (json.loads((RESULTS / f"kernels_report_{n}sm90_b32_fp16.json").read_text()) for n in ("baseline_", ""))
    def key(rep):
        return [(r["layer"], r["kernel"], r["kept_taps"], json.dumps(r["geometry"])) for r in rep["layers"]]
    assert key(old) == key(new) and old["pruning"] == new["pruning"]
