"""``deprune gpu-check``: the whole orchestration rehearsed on the CPU (``--dry-run``: host emulation for
CuPy, the emulation's ASan/UBSan build for compute-sanitizer), the one-line exit without a GPU, and the
parsing of pytest's and compute-sanitizer's output."""
from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch

from deprune_plugin.app import gpu_check
from deprune_plugin.app.cli import main
from deprune_plugin.kernels import emulation_available


def test_pytest_summary_lines_are_parsed():
    text = ("ss..F.s                                                    [100%]\n"
            "=========================== short test summary info ============================\n"
            "FAILED tests/test_kernels_cuda.py::test_matches_conv2d[k3-fp16] - AssertionError: x\n"
            "1 failed, 3 passed, 3 skipped, 25 deselected, 2 warnings in 12.31s\n")
    r = gpu_check.parse_pytest_summary(text)
    assert (r["failed"], r["passed"], r["skipped"], r["deselected"], r["warnings"]) == (1, 3, 3, 25, 2)
    assert r["failed_tests"] == ["tests/test_kernels_cuda.py::test_matches_conv2d[k3-fp16] - AssertionError: x"]
    assert gpu_check.parse_pytest_summary("=== 2 passed, 1 error in 0.5s ===")["errors"] == 1
    # killed before the summary: the progress characters so far
    r = gpu_check.parse_pytest_summary("..F.sE [ 40%]\n...")
    assert r["summary_line"] is None and (r["passed"], r["failed"], r["skipped"], r["errors"]) == (6, 1, 1, 1)


def test_sanitizer_output_is_parsed(tmp_path):
    log = tmp_path / "logs" / "x.log"
    log.parent.mkdir()
    text = ("========= COMPUTE-SANITIZER\ncase direct float16: ok (max |err| 0.0001)\n"
            "========= Invalid __global__ read of size 16 bytes\n=========     at deprune_dw_pw_fused+0x1a0\n"
            "=========     by thread (3,0,0) in block (0,1,0)\ncase fused float16: ok (max |err| 0)\n"
            "========= ERROR SUMMARY: 1 error\n")
    r = gpu_check._sanitizer_result(text, 1, False, 2.0, log, tmp_path)
    assert r["status"] == "failed" and r["errors"] == 1
    assert r["kernels_named_in_errors"] == ["deprune_dw_pw_fused"]
    assert r["cases"] == {"direct float16": "ok", "fused float16": "ok"}
    clean = "case dr float32: ok (max |err| 0)\n========= ERROR SUMMARY: 0 errors\n"
    assert gpu_check._sanitizer_result(clean, 0, False, 1.0, log, tmp_path)["status"] == "ok"


def test_a_step_past_its_budget_is_stopped(tmp_path):
    log = tmp_path / "hang.log"
    t0 = time.monotonic()
    rc, timed_out, _ = gpu_check.run_logged([sys.executable, "-c", "import time; time.sleep(120)"], log, 0.5)
    assert timed_out and rc != 0 and time.monotonic() - t0 < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_one_line_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "gc"
    assert main(["gpu-check", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "no GPU" in printed[0]
    assert not out.exists()


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["gpu-check", "--out", str(tmp_path), "--budget", "nope=3"]) == 2
    assert main(["gpu-check", "--out", str(tmp_path), "--total-budget", "-1"]) == 2
    assert "error" in capsys.readouterr().err


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.skipif(not emulation_available()[0], reason="host emulation unavailable (no g++)")
def test_dry_run_runs_every_step_and_records_real_numbers(tmp_path):
    out = tmp_path / "gc"
    assert main(["gpu-check", "--dry-run", "--out", str(out)]) == 0
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["dry_run"] and rep["backend"] == "emu" and rep["finished"]
    steps = rep["steps"]
    assert list(steps) == list(gpu_check.STEPS)
    for name, step in steps.items():
        assert step["status"] in ("ok", "skipped"), (name, step.get("summary"), step.get("error_tail"))
        assert (out / step["step_log"]).is_file() if step["status"] == "ok" else True
    assert rep["status"] == "ok"

    env = steps["environment"]
    assert _finite_positive(env["copy_GBps"]) and env["torch"] == torch.__version__

    tests = steps["tests"]
    assert tests["summary_line"] and tests["failed"] == 0 and tests["errors"] == 0
    assert tests["skipped"] > 0  # the cuda tests, collected and skipped on a CPU

    san = steps["sanitizer"]
    if san["status"] == "ok":
        (tool,) = san["tools"].values()
        assert tool["cases"] == {f"{k} float16": "ok" for k in ("direct", "dr", "fused")} and tool["errors"] == 0

    kern = steps["kernels"]
    assert kern["rows"] and not kern["bad_rows"]
    assert {r["kind"] for r in kern["rows"]} == {"dw", "pair"} and {r["batch"] for r in kern["rows"]} == {1, 2}
    for row in kern["rows"]:
        expected = {"cudnn", "direct", "dr"} if row["kind"] == "dw" else {"cudnn", "fused"}
        assert set(row["us"]) == expected and all(_finite_positive(v) for v in row["us"].values()), row
        assert all(_finite_positive(v) for v in row["pct_copy_bw"].values())
        assert all(math.isfinite(v) for v in row["max_abs_err"].values()) and all(row["ok"].values())
    assert _finite_positive(kern["totals"]["batch 2 pair"]["speedup_vs_cudnn"]["fused"])

    sets = steps["weight_sets"]
    assert len(sets["totals"]) == 3 and not sets["bad_rows"]
    for t in sets["totals"].values():
        assert _finite_positive(t["us"]["fused"]) and _finite_positive(t["us"]["cudnn"])

    (run,) = steps["bench"]["runs"].values()
    assert run["status"] == "ok" and (out / run["json"]).is_file()
    (entry,) = run["entries"]
    assert all(_finite_positive(v) for v in entry["ms"].values()) and {"B0", "B1"} <= set(entry["ms"])
    assert run["goals"] and all(g["status"] for g in run["goals"])
