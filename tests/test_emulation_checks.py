"""The host emulation catches what a GPU would refuse or leave undefined, shown on planted bugs.

Each check of cuda/cuda_host_emulation.h and deprune_plugin/kernels/emulation.py is demonstrated on a tiny
planted kernel (PLANTED, built by the same emulation build as cuda/*.cu) or a planted launcher bug around
the real kernels: shared memory poisoned per block, the launch limits (threads, __launch_bounds__, grid,
shared memory), and the ASan/UBSan build, which runs in a subprocess (see the emulation module's docstring
for why). The real kernels also run clean under the sanitizers on a fixed sample of the fuzz shapes.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kernel_cases import FUZZ_KERNELS

from deprune_plugin.kernels import CompactTaps, DRColumns, dw_direct, dw_dr, emulation, emulation_available
from deprune_plugin.kernels.sources import KernelSource, arg_i32, arg_ptr, cuda_dir, specialize

_OK, _WHY = emulation_available()
_SAN_OK, _SAN_WHY = emulation.sanitizer_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"host emulation unavailable: {_WHY}")
needs_sanitizer = pytest.mark.skipif(not (_OK and _SAN_OK), reason=f"sanitizers unavailable: {_SAN_WHY}")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
KB = 1024

PLANTED = r"""
// Tiny kernels with planted bugs (and correct twins), for tests/test_emulation_checks.py.
#define DEPRUNE_SCALAR float
#include "deprune_common.cuh"

// Correct: every thread writes the element of shared memory it (or its mirror) reads.
extern "C" __global__ void planted_ok(float* y) {
    __shared__ float s[64];
    s[threadIdx.x] = static_cast<float>(blockIdx.x);
    __syncthreads();
    y[blockIdx.x * blockDim.x + threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

// Bug: only block 0 fills shared memory; later blocks read what an earlier block left there.
extern "C" __global__ void planted_stale_static(float* y) {
    __shared__ float s[64];
    if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;
    __syncthreads();
    y[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
}

// The same bug in dynamic shared memory.
extern "C" __global__ void planted_stale_dynamic(float* y) {
    DEPRUNE_DYNAMIC_SMEM(float, s);
    if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;
    __syncthreads();
    y[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
}

// Bug: half the block fills the tile, every thread reads it.
extern "C" __global__ void planted_half_filled(float* y) {
    __shared__ float s[64];
    if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;
    __syncthreads();
    y[threadIdx.x] = s[threadIdx.x];
}

// Declares a maximum of 128 threads per block.
extern "C" __global__ void __launch_bounds__(128) planted_bounded(float* y) { y[threadIdx.x] = 1.0f; }

// 40 KB of static shared memory (leaves 8 KB of dynamic shared memory without opt-in).
extern "C" __global__ void planted_big_static(float* y) {
    __shared__ float s[10 * 1024];
    s[threadIdx.x] = 2.0f;
    __syncthreads();
    y[threadIdx.x] = s[threadIdx.x];
}

// 50 KB of static shared memory: more than any kernel may declare.
extern "C" __global__ void planted_huge_static(float* y) {
    __shared__ float s[12800];
    s[threadIdx.x] = 2.0f;
    __syncthreads();
    y[threadIdx.x] = s[threadIdx.x];
}

// Correct use of n floats of dynamic shared memory.
extern "C" __global__ void planted_dynamic(float* y, int n) {
    DEPRUNE_DYNAMIC_SMEM(float, s);
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = 3.0f;
    __syncthreads();
    y[threadIdx.x] = s[n - 1 - threadIdx.x];
}

// Bug: `i <= n` writes one element past the end of y.
extern "C" __global__ void planted_oob_write(float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = 1.0f;
}

// Bug: reads one float past the n floats of dynamic shared memory it was given.
extern "C" __global__ void planted_dynamic_overflow(float* y, int n) {
    DEPRUNE_DYNAMIC_SMEM(float, s);
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = 3.0f;
    __syncthreads();
    y[threadIdx.x] = s[n - threadIdx.x];
}

// Bug: 32-bit index arithmetic that overflows (undefined behaviour) for n >= 32768.
extern "C" __global__ void planted_int_overflow(float* y, int n) {
    const int big = n * 65536;
    y[threadIdx.x] = static_cast<float>(big != 0);
}
"""


def planted_source(root: Path) -> KernelSource:
    """``PLANTED`` as a specialised kernel source in a copy of cuda/ (so it includes the real headers)."""
    directory = root / "cuda"
    if not directory.exists():
        shutil.copytree(cuda_dir(), directory)
        (directory / "planted.cu").write_text(PLANTED)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEPRUNE_CUDA_DIR", str(directory))
        return specialize("planted.cu", {})


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> KernelSource:
    return planted_source(tmp_path_factory.mktemp("planted"))


def launch(src, entry, grid, block, y, *ints, smem=0, **kw) -> torch.Tensor:
    emulation.launch(src, entry, grid, block, smem, [arg_ptr(y), *(arg_i32(v) for v in ints)], **kw)
    return y


# ---- shared memory is poisoned before every block ------------------------------------------------

def test_correct_kernel_sees_no_poison(planted):
    y = launch(planted, "planted_ok", (3, 1, 1), (64, 1, 1), torch.full((192,), -1.0))
    assert torch.equal(y, torch.arange(3.0).repeat_interleave(64))


@pytest.mark.parametrize("entry,smem", [("planted_stale_static", 0), ("planted_stale_dynamic", 64 * 4)])
def test_shared_memory_left_by_a_previous_block_reads_nan(planted, entry, smem):
    """Zero-filling once per launch let block 1 read block 0's values; poisoned per block it reads NaN."""
    y = launch(planted, entry, (2, 1, 1), (64, 1, 1), torch.zeros(128), smem=smem)
    assert torch.equal(y[:64], torch.ones(64))
    assert y[64:].isnan().all()


def test_shared_memory_no_thread_wrote_reads_nan(planted):
    y = launch(planted, "planted_half_filled", (1, 1, 1), (64, 1, 1), torch.zeros(64))
    assert torch.equal(y[:32], torch.ones(32)) and y[32:].isnan().all()


# ---- launches a GPU would refuse ------------------------------------------------------------------

def test_launch_bounds_are_enforced_per_kernel(planted):
    y = torch.zeros(256)
    launch(planted, "planted_bounded", (1, 1, 1), (128, 1, 1), y)
    assert torch.equal(y[:128], torch.ones(128))
    with pytest.raises(RuntimeError, match=r"129 threads, more than the kernel's __launch_bounds__\(128\)"):
        launch(planted, "planted_bounded", (1, 1, 1), (129, 1, 1), y)
    # the bound belongs to planted_bounded only: the other kernels of the file take more threads
    launch(planted, "planted_oob_write", (1, 1, 1), (256, 1, 1), y, 255)


def _grow_block(monkeypatch):
    """A planted launcher bug: every emulated launch gets twice the threads along y."""
    real = emulation.launch
    monkeypatch.setattr(emulation, "launch", lambda src, entry, grid, block, *a, **kw: real(
        src, entry, grid, (block[0], 2 * block[1], block[2]), *a, **kw))


@pytest.mark.parametrize("kernel", ["direct", "dr"])
def test_real_kernels_launch_bounds_are_recorded(monkeypatch, kernel):
    """The macro records the bound of the real kernels (dw_dr's is the expression DR_THREADS)."""
    x, weight = torch.randn(1, 8, 64, 64), torch.randn(8, 1, 3, 3)
    # the plan for a GPU of one SM: 256-thread blocks (filling 132 SMs, this small map gets 66-thread blocks)
    direct_module = importlib.import_module("deprune_plugin.kernels.dw_direct")
    real = direct_module.dw_direct_plan
    monkeypatch.setattr(direct_module, "dw_direct_plan", lambda *a, **k: real(*a, **{**k, "sms": 1}))
    run = (lambda: dw_direct(x, CompactTaps.from_dense(weight), None, padding=1, backend="emu")) \
        if kernel == "direct" else (lambda: dw_dr(x, DRColumns.from_dense(weight), None, padding=1, backend="emu"))
    run()
    _grow_block(monkeypatch)
    with pytest.raises(RuntimeError, match=r"512 threads, more than the kernel's __launch_bounds__\(256\)"):
        run()


@pytest.mark.parametrize("grid,block,match", [
    ((1, 65536, 1), (1, 1, 1), r"grid\.y = 65536 exceeds the CUDA limit of 65535"),
    ((1, 1, 65536), (1, 1, 1), r"grid\.z = 65536 exceeds the CUDA limit of 65535"),
    ((2**31, 1, 1), (1, 1, 1), r"grid\.x = 2147483648 exceeds the CUDA limit of 2147483647"),
    ((1, 1, 1), (1025, 1, 1), r"block\.x = 1025 exceeds the CUDA limit of 1024"),
    ((1, 1, 1), (1, 1, 65), r"block\.z = 65 exceeds the CUDA limit of 64"),
    ((1, 1, 1), (32, 33, 1), r"1056 threads; CUDA allows at most 1024 threads per block"),
    ((0, 1, 1), (1, 1, 1), r"invalid configuration"),
    ((1, 1, 1), (64, 0, 1), r"invalid configuration"),
], ids=["grid-y", "grid-z", "grid-x", "block-x", "block-z", "threads", "empty-grid", "empty-block"])
def test_grid_and_block_limits(planted, grid, block, match):
    y = torch.zeros(4)
    with pytest.raises(RuntimeError, match=match):
        launch(planted, "planted_oob_write", grid, block, y, 0)  # refused before anything runs
    assert torch.equal(y, torch.zeros(4))


def test_static_shared_memory_is_what_the_kernel_declares(planted):
    assert emulation.static_shared_arrays(planted, "planted_big_static", ("ptr",)) == \
        {"planted_big_static::s": 40 * KB}
    assert emulation.static_shared_arrays(planted, "planted_oob_write", ("ptr", "i32")) == {}
    with emulation.record_launches() as launches:
        launch(planted, "planted_ok", (1, 1, 1), (64, 1, 1), torch.zeros(64))
    assert [(r.entry, r.static_smem, r.dynamic_smem) for r in launches] == [("planted_ok", 256, 0)]


def test_shared_memory_limit_without_opt_in(planted):
    y = torch.zeros(64)
    launch(planted, "planted_big_static", (1, 1, 1), (64, 1, 1), y, smem=8 * KB)  # 40 + 8 KB fit
    assert torch.equal(y, torch.full((64,), 2.0))
    with pytest.raises(RuntimeError, match=r"static 40960 \+ dynamic 8196 = 49156 bytes exceeds the 49152 bytes "
                                           r"a kernel gets without opt-in"):
        launch(planted, "planted_big_static", (1, 1, 1), (64, 1, 1), y, smem=8 * KB + 4)
    with pytest.raises(RuntimeError, match=r"static shared memory of 51200 bytes exceeds the 49152"):
        launch(planted, "planted_huge_static", (1, 1, 1), (64, 1, 1), y)


def test_shared_memory_opt_in_is_configurable(planted, monkeypatch):
    y, n = torch.zeros(64), 16 * KB  # 64 KB of dynamic shared memory
    with pytest.raises(RuntimeError, match=r"dynamic 65536 = 65536 bytes exceeds the 49152 bytes a kernel gets "
                                           r"without opt-in \(the emulated target allows no opt-in\)"):
        launch(planted, "planted_dynamic", (1, 1, 1), (64, 1, 1), y, n, smem=4 * n)
    sm86 = emulation.Target(smem_per_block_optin=99 * KB)
    launch(planted, "planted_dynamic", (1, 1, 1), (64, 1, 1), y, n, smem=4 * n, target=sm86)
    assert torch.equal(y, torch.full((64,), 3.0))
    with pytest.raises(RuntimeError, match=r"static 40960 \+ dynamic 65536 = 106496 bytes exceeds the opt-in "
                                           r"maximum of 101376"):
        launch(planted, "planted_big_static", (1, 1, 1), (64, 1, 1), y, smem=64 * KB, target=sm86)
    monkeypatch.setenv("DEPRUNE_EMU_SMEM_OPTIN", str(99 * KB))  # the environment sets the default target
    launch(planted, "planted_dynamic", (1, 1, 1), (64, 1, 1), torch.zeros(64), n, smem=4 * n)
    monkeypatch.setenv("DEPRUNE_EMU_SMEM_LIMIT", str(32 * KB))
    with pytest.raises(RuntimeError, match=r"static shared memory of 40960 bytes exceeds the 32768"):
        launch(planted, "planted_big_static", (1, 1, 1), (64, 1, 1), y)


def test_real_launcher_asking_for_too_much_shared_memory_is_refused(monkeypatch):
    """A planted planner bug: dw_direct's dynamic shared memory grown past 48 KB."""
    real = emulation.launch
    monkeypatch.setattr(emulation, "launch", lambda src, entry, grid, block, smem, *a, **kw: real(
        src, entry, grid, block, smem + 48 * KB, *a, **kw))
    with pytest.raises(RuntimeError, match=r"deprune_dw_direct failed: .*exceeds the 49152 bytes a kernel gets "
                                           r"without opt-in"):
        dw_direct(torch.randn(1, 8, 16, 16), CompactTaps.from_dense(torch.randn(8, 1, 3, 3)), None,
                  backend="emu")


# ---- sanitizers (in a subprocess: the ASan runtime must be preloaded) --------------------------------

def test_sanitized_build_needs_the_asan_runtime(planted):
    if emulation.asan_runtime_loaded():
        pytest.skip("this process runs under ASan")
    with pytest.raises(RuntimeError, match="LD_PRELOAD"):
        launch(planted, "planted_ok", (1, 1, 1), (64, 1, 1), torch.zeros(64), sanitize=True)


def run_sanitized(script: str, tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` in a python started under :func:`emulation.sanitizer_env` (ASan + UBSan builds)."""
    path = tmp_path / "sanitized_script.py"
    path.write_text(textwrap.dedent(script))
    env = emulation.sanitizer_env()
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["DEPRUNE_PLANTED_ROOT"] = str(tmp_path)
    return subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO_ROOT))


_PRELUDE = """
    import os
    from pathlib import Path
    import torch
    from test_emulation_checks import launch, planted_source
    from deprune_plugin.kernels import emulation
    assert emulation.asan_runtime_loaded() and emulation.sanitize_requested()
    src = planted_source(Path(os.environ["DEPRUNE_PLANTED_ROOT"]))
"""


@needs_sanitizer
@pytest.mark.parametrize("entry,threads,n_clean,n_bug,smem,report", [
    # 65 threads with n = 64: thread 64 writes y[64], one past the 64 floats of y
    ("planted_oob_write", 65, 63, 64, 0, "AddressSanitizer: heap-buffer-overflow"),
    # n = 64 floats in 256 bytes: thread 0 reads s[64]
    ("planted_dynamic_overflow", 64, 63, 64, 256, "AddressSanitizer: heap-buffer-overflow"),
    ("planted_int_overflow", 64, 32767, 32768, 0, "runtime error: signed integer overflow"),
], ids=["global-write", "dynamic-shared-read", "ubsan-int-overflow"])
def test_sanitizers_report_planted_bugs(tmp_path, entry, threads, n_clean, n_bug, smem, report):
    """A correct launch passes, then the planted bug aborts the process with the sanitizer's report."""
    result = run_sanitized(_PRELUDE + f"""
    y = torch.zeros(64)
    launch(src, "{entry}", (1, 1, 1), (64, 1, 1), y, {n_clean}, smem={smem})
    print("clean launch passed", flush=True)
    launch(src, "{entry}", (1, 1, 1), ({threads}, 1, 1), y, {n_bug}, smem={smem})
    print("planted bug went unnoticed", flush=True)
    """, tmp_path)
    assert "clean launch passed" in result.stdout, result.stderr[-3000:]
    assert "went unnoticed" not in result.stdout and result.returncode != 0
    assert report in result.stderr and entry in result.stderr, result.stderr[-3000:]


# A fixed sample of the fuzz shapes, restricted to three specialisations per kernel (each sanitized build
# takes seconds): every dtype and both layouts appear.
SANITIZED_SPECIALISATIONS = {("fp32", "nchw", 32, 32), ("fp16", "nhwc", 32, 32), ("bf16", "nchw", 32, 32)}
SANITIZED_SHAPES = 80  # of the fuzz stream, of which those in SANITIZED_SPECIALISATIONS run
# dw_direct's and dw_dr's geometry is compile-time: each of their shapes is a sanitized build of its own, so
# they run the first few shapes of each specialisation.
SANITIZED_PER_SPECIALISATION = {"dw_direct": 4, "dw_dr": 4}


@needs_sanitizer
def test_real_kernels_run_clean_under_sanitizers(tmp_path):
    result = run_sanitized(f"""
    from kernel_cases import fuzz_shapes, run_fuzz
    from deprune_plugin.kernels import emulation
    assert emulation.asan_runtime_loaded() and emulation.sanitize_requested()
    for kernel in {FUZZ_KERNELS!r}:
        shapes = [s for s in fuzz_shapes(kernel, {SANITIZED_SHAPES})
                  if s.specialisation in {sorted(SANITIZED_SPECIALISATIONS)!r}]
        cap = {SANITIZED_PER_SPECIALISATION!r}.get(kernel)
        if cap is not None:
            shapes = [s for spec in sorted({{s.specialisation for s in shapes}})
                      for s in [t for t in shapes if t.specialisation == spec][:cap]]
        assert len(shapes) >= 10, len(shapes)
        failures = run_fuzz(kernel, shapes)
        print(kernel, len(shapes), "shapes,", len(failures), "failures", flush=True)
        for line in failures[:10]:
            print(line)
    print("done")
    """, tmp_path)
    assert result.returncode == 0 and "done" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count(" 0 failures") == len(FUZZ_KERNELS), result.stdout


@needs_sanitizer
def test_asan_catches_a_planner_bug_in_the_real_kernel(tmp_path):
    """A planted launcher bug: dw_direct given 4 bytes less dynamic shared memory than its tile needs."""
    result = run_sanitized("""
    import torch
    from deprune_plugin.kernels import CompactTaps, dw_direct, emulation
    x, taps = torch.randn(1, 8, 16, 16), CompactTaps.from_dense(torch.randn(8, 1, 3, 3))
    dw_direct(x, taps, None, padding=1, backend="emu")
    print("clean launch passed", flush=True)
    real = emulation.launch
    emulation.launch = lambda src, entry, grid, block, smem, *a, **kw: real(src, entry, grid, block, smem - 4,
                                                                            *a, **kw)
    dw_direct(x, taps, None, padding=1, backend="emu")
    print("planted bug went unnoticed", flush=True)
    """, tmp_path)
    assert "clean launch passed" in result.stdout, result.stderr[-3000:]
    assert "went unnoticed" not in result.stdout and result.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in result.stderr and "deprune_dw_direct" in result.stderr, \
        result.stderr[-3000:]


@needs_sanitizer
def test_the_fused_kernel_runs_clean_under_sanitizers(tmp_path):
    """cuda/dw_pw_fused.cu under ASan + UBSan: channel and output tails, a residual, stride 2, 5x5, fp32's
    CUDA-core path and a walk over tiles (each its own sanitized build), all matching the unfused pair."""
    result = run_sanitized("""
    import importlib
    from dataclasses import replace
    import torch
    from test_dw_pw_fused_emulation import check, make
    from deprune_plugin.kernels import emulation
    assert emulation.asan_runtime_loaded() and emulation.sanitize_requested()
    check(make(2, 72, 40, 7, 7, 3, residual=True))                   # partial chunk, 40 outputs
    check(make(1, 96, 20, 9, 8, 3, stride=2, act="silu"))            # stride 2, odd output count
    check(make(1, 48, 24, 8, 8, 5, residual=True, dtype=torch.float32))  # CUDA cores, 5x5
    fused = importlib.import_module("deprune_plugin.kernels.dw_pw_fused")
    real = fused.dw_pw_fused_plan
    def walk4(g, co, dtype, **kw):
        p = real(g, co, dtype, **kw)
        th, tw = p.extra["tile"]
        smem = fused.fused_smem_bytes(g, 2, th, tw, p.extra["chunk"], p.extra["out_block"], 4)
        return replace(p, defines={**p.defines, "DEPRUNE_WALK": 4}, smem_bytes=smem,
                       grid=(-(-g.oh // (th * 4)) * -(-g.ow // tw), p.grid[1], p.grid[2]))
    fused.dw_pw_fused_plan = walk4
    import os
    os.environ["DEPRUNE_EMU_SMEM_OPTIN"] = str(100 * 1024)
    check(make(1, 32, 16, 37, 9, 3, residual=True))                  # a walk, the last one cut short
    print("done")
    """, tmp_path)
    assert result.returncode == 0 and "done" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
