"""ThreadSanitizer builds of the emulation find missing barriers that the numeric checks miss.

The emulation runs a block's threads as OS threads and ``__syncthreads()`` as a ``std::barrier``, so a TSan
build (``sanitize="thread"``, see deprune_plugin/kernels/emulation.py) reports every pair of shared-memory
accesses the kernel's barriers leave unordered, even when the value read happens to be right: without the
end-of-chunk barrier of dw_pw_fused.cu the next chunk's staging may overwrite what slower threads still read
(a write-after-read race), and since both chunks hold valid data the output usually still matches.

- default run: the shipped kernels on one small case each report no race, and one barrier per kernel
  removed (:data:`REPRESENTATIVE`) is caught; all in one TSan process (startup under TSan costs ~10 s), six
  TSan builds (3-4 s each);
- ``pytest -m exhaustive tests/test_emulation_tsan.py``: also dw_direct's NHWC and dw_dr's tensor-core case
  shipped, and every ``__syncthreads()`` of every kernel removed in turn (12 more builds).

A mutant counts as caught by a TSan race report or a numeric mismatch. Removing a barrier from every thread
cannot deadlock, but a mutant that made some threads skip one would hang at the next barrier: the TSan
process runs under a timeout, so a hang fails the test instead of stalling CI.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from deprune_plugin.kernels import emulation, emulation_available
from deprune_plugin.kernels.sources import cuda_dir, specialize

_OK, _WHY = emulation_available()
_TSAN_OK, _TSAN_WHY = emulation.sanitizer_available("thread")
pytestmark = pytest.mark.skipif(not (_OK and _TSAN_OK),
                                reason=f"TSan emulation unavailable: {_WHY if not _OK else _TSAN_WHY}")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# Generous: each mutant is a TSan build of its own (seconds each on a loaded 2-core runner) plus a run
# ~10x slower than the plain emulation.
TIMEOUT_S = int(os.environ.get("DEPRUNE_TSAN_TIMEOUT", 1500))
_BARRIER = re.compile(r"^([ \t]*)__syncthreads\(\);", re.MULTILINE)
_RACE = "WARNING: ThreadSanitizer: data race"


@dataclass(frozen=True)
class Run:
    """One kernel run in the TSan process: ``case`` (a key of :data:`_CASES` in the script) on the source of
    cuda/ with barrier ``barrier`` (0-based, in source order) of ``cu_file`` removed; None: the shipped source."""

    label: str
    cu_file: str
    case: str
    barrier: int | None = None


# The case each kernel (and layout: dw_direct's NCHW and NHWC paths have barriers of their own) runs. Small,
# but each reaches every barrier with more than one thread per shared array: dw_dr's RICH case spans several
# K tiles, the fused case two channel chunks (72 = 64 + 8) and two blocks.
_KERNEL_CASES = {"dw_direct.cu": ("direct-nchw", "direct-nhwc"), "dw_dr.cu": ("dr-fp32", "dr-fp16"),
                 "dw_pw_fused.cu": ("fused-fp16",)}
# dw_direct.cu: the first barrier is the NCHW path's, the other two the NHWC path's.
_DIRECT_BARRIER_CASES = ("direct-nchw", "direct-nhwc", "direct-nhwc")
# One barrier per kernel in the default run: dw_direct's NCHW staging barrier, the dw_dr barrier between the
# last GEMM reads and the epilogue writing the aliased tile, and the fused kernel's end-of-chunk barrier
# (the write-after-read race that passes the numeric check).
REPRESENTATIVE = {"dw_direct.cu": 0, "dw_dr.cu": 2, "dw_pw_fused.cu": 2}

_SCRIPT = r"""
import os, shutil, sys
from pathlib import Path
import torch
from kernel_cases import RICH, check_case
from test_dw_pw_fused_emulation import check, make
from deprune_plugin.kernels import emulation
assert emulation.tsan_runtime_loaded() and emulation.requested_sanitizer() == "thread"
CASES = {
    "direct-nchw": lambda: check_case("dw_direct", RICH, torch.float32, False),
    "direct-nhwc": lambda: check_case("dw_direct", RICH, torch.float32, True),
    "dr-fp32": lambda: check_case("dw_dr", RICH, torch.float32, False),
    "dr-fp16": lambda: check_case("dw_dr", RICH, torch.float16, True),
    "fused-fp16": lambda: check(make(2, 72, 40, 7, 7, 3, residual=True)),
}
shipped = os.environ.get("DEPRUNE_CUDA_DIR")
for label, cu_file, case, barrier in RUNS:
    os.environ.pop("DEPRUNE_CUDA_DIR", None)
    if shipped:
        os.environ["DEPRUNE_CUDA_DIR"] = shipped
    if barrier is not None:
        root = Path(ROOT) / label / "cuda"
        shutil.copytree(SOURCE_DIR, root)
        text = (root / cu_file).read_text()
        spans = [m.span() for m in BARRIER.finditer(text)]
        start, end = spans[barrier]
        (root / cu_file).write_text(text[:start] + text[start:end].replace("__syncthreads();", ";") + text[end:])
        os.environ["DEPRUNE_CUDA_DIR"] = str(root)
    # TSan writes its reports straight to fd 2: the markers delimit each run's share of stderr.
    print(f"@@ begin {label}", file=sys.stderr, flush=True)
    try:
        CASES[case]()
        print(f"@@ match {label}", flush=True)
    except AssertionError as exc:
        print(f"@@ mismatch {label}: {str(exc)[:200]!r}", flush=True)
    print(f"@@ end {label}", file=sys.stderr, flush=True)
print("@@ done", flush=True)
"""


@dataclass(frozen=True)
class Outcome:
    race: bool
    mismatch: bool
    report: str  # this run's share of stderr (TSan reports)


def barrier_count(cu_file: str) -> int:
    return len(_BARRIER.findall((cuda_dir() / cu_file).read_text()))


def mutant_runs(cu_file: str, barriers: list[int] | None = None) -> list[Run]:
    """One run per removed barrier of ``cu_file`` (all when ``barriers`` is None)."""
    count = barrier_count(cu_file)
    if cu_file == "dw_direct.cu":
        assert count == len(_DIRECT_BARRIER_CASES), "dw_direct.cu's barriers changed: update _DIRECT_BARRIER_CASES"
    runs = []
    for i in (range(count) if barriers is None else barriers):
        case = _DIRECT_BARRIER_CASES[i] if cu_file == "dw_direct.cu" else _KERNEL_CASES[cu_file][0]
        runs.append(Run(f"{Path(cu_file).stem}-barrier{i}", cu_file, case, i))
    return runs


def run_under_tsan(runs: list[Run], tmp_path: Path) -> dict[str, Outcome]:
    """Run ``runs`` in one python started under ``sanitizer_env(kind="thread")``; the outcome of each."""
    script = tmp_path / "tsan_script.py"
    script.write_text(f"RUNS = {[(r.label, r.cu_file, r.case, r.barrier) for r in runs]!r}\n"
                      f"ROOT = {str(tmp_path)!r}\nSOURCE_DIR = {str(cuda_dir())!r}\n"
                      f"import re\nBARRIER = re.compile({_BARRIER.pattern!r}, re.MULTILINE)\n"
                      + textwrap.dedent(_SCRIPT))
    env = emulation.sanitizer_env(kind="thread")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S, cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"the TSan emulation did not finish in {TIMEOUT_S} s (a kernel hanging at a barrier?); "
                    f"last output:\n{out[-2000:]}")
    assert "@@ done" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    out: dict[str, Outcome] = {}
    for r in runs:
        section = proc.stderr.split(f"@@ begin {r.label}\n", 1)[1].split(f"@@ end {r.label}\n", 1)[0]
        assert f"@@ match {r.label}" in proc.stdout or f"@@ mismatch {r.label}" in proc.stdout, proc.stdout
        out[r.label] = Outcome(_RACE in section, f"@@ mismatch {r.label}" in proc.stdout, section)
    # exitcode=66: the runtime's own verdict agrees with the reports found in the sections
    assert (proc.returncode == 66) == any(o.race for o in out.values()), (proc.returncode, proc.stderr[-3000:])
    return out


def test_tsan_build_needs_the_tsan_runtime():
    """Refused before anything is built: a TSan library loaded without its runtime would abort python."""
    if emulation.tsan_runtime_loaded():
        pytest.skip("this process runs under TSan")
    src = specialize("dw_direct.cu", {})
    with pytest.raises(RuntimeError, match=r"libtsan\.so"):
        emulation.launch(src, "deprune_dw_direct", (1, 1, 1), (32, 1, 1), 0, [], sanitize="thread")
    with pytest.raises(ValueError, match="unknown sanitizer"):
        emulation.launch(src, "deprune_dw_direct", (1, 1, 1), (32, 1, 1), 0, [], sanitize="memory")


def _shipped_runs(first_only: bool) -> list[Run]:
    return [Run(f"shipped-{case}", cu, case) for cu, cases in _KERNEL_CASES.items()
            for case in (cases[:1] if first_only else cases)]


def _default_runs() -> list[Run]:
    """Six TSan builds: each kernel's first case shipped and with its representative barrier removed."""
    return _shipped_runs(True) + [r for cu, i in REPRESENTATIVE.items() for r in mutant_runs(cu, [i])]


@pytest.fixture(scope="module")
def default_outcomes(tmp_path_factory) -> dict[str, Outcome]:
    return run_under_tsan(_default_runs(), tmp_path_factory.mktemp("tsan"))


@pytest.mark.parametrize("case", [cases[0] for cases in _KERNEL_CASES.values()])
def test_shipped_kernels_have_no_race(default_outcomes, case):
    outcome = default_outcomes[f"shipped-{case}"]
    assert not outcome.race, outcome.report[-6000:]
    assert not outcome.mismatch


@pytest.mark.parametrize("cu_file", list(REPRESENTATIVE))
def test_removing_a_barrier_is_caught(default_outcomes, cu_file):
    (run,) = mutant_runs(cu_file, [REPRESENTATIVE[cu_file]])
    outcome = default_outcomes[run.label]
    print(f"{run.label}: race report {outcome.race}, numeric mismatch {outcome.mismatch}")
    assert outcome.race or outcome.mismatch, f"{run.label}: no race report and the output still matches"
    if outcome.race:  # the report names the kernel whose shared memory is raced on
        assert "deprune_" in outcome.report


@pytest.mark.exhaustive
def test_removing_any_barrier_is_caught(tmp_path):
    """Every case of every kernel shipped is race-free; every barrier removed is caught."""
    shipped = _shipped_runs(False)
    mutants = [r for cu in _KERNEL_CASES for r in mutant_runs(cu)]
    outcomes = run_under_tsan(shipped + mutants, tmp_path)
    assert not [r.label for r in shipped if outcomes[r.label].race or outcomes[r.label].mismatch]
    summary = {r.label: ("race" if outcomes[r.label].race else "") + ("+mismatch" if outcomes[r.label].mismatch
                                                                     else "") for r in mutants}
    print(summary)
    assert all(summary.values()), f"mutants not caught: {[k for k, v in summary.items() if not v]}"
