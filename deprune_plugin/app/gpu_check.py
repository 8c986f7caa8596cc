"""``deprune gpu-check``: everything a first session on a GPU should measure and check, in one command that
writes one JSON (``gpu_check.json``) and the logs.

Steps (:data:`STEPS`), in this order, each in a subprocess of its own with a time budget (a hang or a crash
costs that step, not the rest; the whole run stays within :attr:`GPUCheckConfig.total_budget_s`):

- ``environment``: GPU, driver, CUDA, cuDNN, torch, CuPy, NVRTC, nvcc and compute-sanitizer versions, and the
  device-to-device copy bandwidth (a 1 GiB copy) that the other steps' "% of copy bandwidth" divide by.
- ``tests``: the ``cuda``-marked tests (``python -m pytest -m cuda``), a per-test timeout (pytest-timeout's
  ``--timeout`` when installed; otherwise pytest's ``faulthandler_timeout`` dumps the stacks of a hung test
  and the step's budget ends it), the counts of the summary line and the failed tests.
- ``sanitizer``: ``compute-sanitizer --tool memcheck|racecheck|synccheck --error-exitcode 1`` on one small
  case of each kernel (direct, DR, fused) in fp16 and fp32 (:mod:`.gpu_check_cases`), only the project's
  kernels instrumented, PyTorch's caching allocator off (so memcheck sees each tensor's own bounds).
- ``kernels``: each kernel against cuDNN (eager PyTorch: the dense conv on the masked weight, the
  activation; for a pair also the 1x1 conv and the residual add) on every DW layer and DW + 1x1 pair of a
  DEPrune-BH (78% / 50%) MobileNetV2, fp16 channels_last, batch 32 and 1: device time, % of copy bandwidth
  (the layer's logical bytes / time / copy bandwidth) and max error against the float32 reference.
- ``weight_sets``: the fused pair against cuDNN on three weight sets of the same architecture: dense,
  DEPrune-BH 78/50 and plain channel pruning of 30% (channel counts rounded to multiples of 8).
- ``bench``: ``deprune bench --device cuda`` end to end, one subprocess per model.

The JSON is rewritten when each step starts and ends (a step's own partial results are kept when it runs
out of time), so a run cut short still leaves everything it measured. ``--dry-run`` runs the same steps on
the CPU with the host emulation standing in for CuPy (small shapes; the emulation's ASan/UBSan build
instead of compute-sanitizer; the bench step's GPU runners with the torch backend); without ``--dry-run``
on a machine without a GPU the command says so in one line and does nothing.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["DEFAULT_BUDGETS_S", "DRY_RUN_BUDGETS_S", "STEPS", "GPUCheckConfig", "add_arguments", "config_from_args",
           "main", "parse_pytest_summary", "run_gpu_check"]

#: The steps, in the order they run.
STEPS = ("environment", "tests", "sanitizer", "kernels", "weight_sets", "bench")
#: Seconds each step may take on a GPU (their sum is the default total budget: 7.5 minutes).
DEFAULT_BUDGETS_S = {"environment": 25.0, "tests": 110.0, "sanitizer": 70.0, "kernels": 90.0, "weight_sets": 45.0,
                     "bench": 110.0}
#: Seconds each step may take in a dry run (the first run compiles the emulation; later ones hit its cache).
DRY_RUN_BUDGETS_S = {"environment": 60.0, "tests": 120.0, "sanitizer": 240.0, "kernels": 180.0,
                     "weight_sets": 180.0, "bench": 180.0}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
JSON_NAME = "gpu_check.json"
_KILL_GRACE_S = 10.0  # after a budget runs out: SIGINT (pytest prints its summary), then SIGKILL
_MODULE = "deprune_plugin.app.gpu_check"


@dataclass
class GPUCheckConfig:
    """What ``deprune gpu-check`` runs and how long each step may take.

    Attributes:
        out: folder for ``gpu_check.json``, ``logs/`` and the bench JSONs (made when missing).
        dry_run: run on the CPU with the host emulation (see the module doc); :meth:`dry` gives small settings.
        steps: which of :data:`STEPS` to run (the others are recorded as skipped).
        total_budget_s: the whole run's limit; a step gets the smaller of its budget and what is left.
        budgets_s: per-step budgets overriding :data:`DEFAULT_BUDGETS_S` (or :data:`DRY_RUN_BUDGETS_S`).
        layer_model: the timm model whose DW layers and pairs the ``kernels`` / ``weight_sets`` steps time.
        dw_ratio, pw_ratio: DEPrune-BH ratios of those steps' pruned weights.
        channel_ratio: the channel-pruning weight set's ratio.
        batches: batch sizes of the ``kernels`` step (and of the bench).
        weight_set_batch: batch size of the ``weight_sets`` step.
        image_size: input size of the layer steps and the bench.
        dtype: dtype of the layer steps (``float16``; a dry run uses ``float32``: the CPU's fp16 convs, the
            cuDNN stand-in there, take seconds per call).
        max_layers: time only the first this many DW layers per model (None: all).
        reps: timed rounds per layer (medians, interleaved with cuDNN).
        copy_mib: size of the copy the bandwidth is measured with.
        test_timeout_s: per-test timeout of the ``tests`` step.
        tests_dir: the test folder (default: ``./tests`` or the one next to the package).
        sanitizer_tools: compute-sanitizer tools to run.
        sanitizer_dtypes: dtypes of the sanitizer cases.
        bench_models, bench_batches, bench_reps: the ``bench`` step's ``--models``, ``--batch``, ``--reps``.
        bench_inductor: also build the bench's ``torch.compile(mode="max-autotune")`` runners (B2; minutes of
            compilation, more than the default budget); off: ``--no-inductor``.
    """

    out: str = "gpu_check_out"
    dry_run: bool = False
    steps: tuple[str, ...] = STEPS
    total_budget_s: float = sum(DEFAULT_BUDGETS_S.values())
    budgets_s: dict[str, float] = field(default_factory=dict)
    layer_model: str = "mobilenetv2_100"
    dw_ratio: float = 0.78
    pw_ratio: float = 0.5
    channel_ratio: float = 0.3
    batches: tuple[int, ...] = (32, 1)
    weight_set_batch: int = 32
    image_size: int = 224
    dtype: str = "float16"
    max_layers: int | None = None
    reps: int = 20
    copy_mib: int = 1024
    test_timeout_s: int = 120
    tests_dir: str | None = None
    sanitizer_tools: tuple[str, ...] = SANITIZER_TOOLS
    sanitizer_dtypes: tuple[str, ...] = ("float16", "float32")
    bench_models: tuple[str, ...] = ("mobilenetv2_100", "efficientnet_b0")
    bench_batches: tuple[int, ...] = (1, 32)
    bench_reps: int = 20
    bench_inductor: bool = False

    @classmethod
    def dry(cls, out: str = "gpu_check_dry", **overrides: Any) -> "GPUCheckConfig":
        """Settings of a dry run: CPU and host emulation, 32x32 float32 inputs, two layers, a few repetitions,
        the bench on ``mobilenetv2_050``, the emulation sanitizer on the fp16 cases."""
        base = cls(out=out, dry_run=True, total_budget_s=sum(DRY_RUN_BUDGETS_S.values()), batches=(2, 1),
                   weight_set_batch=2, image_size=32, dtype="float32", max_layers=2, reps=3, copy_mib=64,
                   test_timeout_s=60, sanitizer_dtypes=("float16",), bench_models=("mobilenetv2_050",),
                   bench_batches=(1,), bench_reps=2)
        return replace(base, **overrides)

    def budget(self, step: str) -> float:
        """Seconds ``step`` may take (before the total budget's limit)."""
        defaults = DRY_RUN_BUDGETS_S if self.dry_run else DEFAULT_BUDGETS_S
        return float(self.budgets_s.get(step, defaults[step]))

    @property
    def backend(self) -> str:
        """The kernels' backend: ``"emu"`` in a dry run, ``"cupy"`` on a GPU."""
        return "emu" if self.dry_run else "cupy"

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def validate(self) -> None:
        """Raise ValueError on an unknown step, a budget of an unknown step, or a non-positive size."""
        unknown = [s for s in (*self.steps, *self.budgets_s) if s not in STEPS]
        if unknown:
            raise ValueError(f"unknown step(s) {unknown}; the steps are {list(STEPS)}")
        if self.total_budget_s <= 0 or any(v <= 0 for v in self.budgets_s.values()):
            raise ValueError("budgets must be > 0 seconds")
        bad = [t for t in self.sanitizer_tools if t not in (*SANITIZER_TOOLS, "initcheck")]
        if bad:
            raise ValueError(f"unknown compute-sanitizer tool(s) {bad}")


# ---- helpers ---------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _one_line(text: object, limit: int = 400) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_logged(cmd: Sequence[str], log: Path, timeout: float, env: dict | None = None,
               cwd: str | Path | None = None) -> tuple[int | None, bool, float]:
    """Run ``cmd`` with stdout and stderr appended to ``log``, in a process group of its own; past ``timeout``
    seconds the group gets SIGINT, then SIGKILL :data:`_KILL_GRACE_S` later. ``(returncode, timed_out,
    seconds)``."""
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        fh.write(f"$ {' '.join(map(str, cmd))}\n".encode())
        fh.flush()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGINT, _KILL_GRACE_S), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            proc.wait()
    return proc.returncode, timed_out, time.monotonic() - t0


class StepContext:
    """What a step function gets: the config, the step's deadline, the copy bandwidth measured by the
    ``environment`` step (bytes/s, or None) and :meth:`emit`, which writes the step's partial result."""

    def __init__(self, config: GPUCheckConfig, result_path: Path, deadline: float, copy_bps: float | None) -> None:
        self.config = config
        self.result_path = result_path
        self.deadline = deadline
        self.copy_bps = copy_bps
        self.out = Path(config.out)

    def time_left(self) -> float:
        return self.deadline - time.time()

    def emit(self, result: dict) -> None:
        _write_json(self.result_path, result)


# ---- step: environment -----------------------------------------------------------------------------------

def _command_output(cmd: Sequence[str], timeout: float = 30) -> str | None:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout + r.stderr).strip() or None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def copy_bandwidth(device: str, mib: int, reps: int = 20) -> float:
    """Bytes per second of a ``mib`` MiB device-to-device copy (read + write counted), median of ``reps``."""
    import torch

    from ..core.timing import interleaved_medians

    x = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = interleaved_medians({"copy": lambda: y.copy_(x)}, reps=reps, warmup=3, device=device, clock="device")
    return 2 * x.numel() / t["copy"]


def step_environment(ctx: StepContext) -> dict:
    import torch

    from ..kernels import cupy_available, emulation_available
    from ..kernels.report import find_tool
    from .bench import machine_info

    cfg = ctx.config
    info: dict[str, Any] = dict(machine_info())
    info.update(python=platform.python_version(), platform=platform.platform(),
                torch_cuda_available=torch.cuda.is_available(), cupy_available=list(cupy_available()),
                emulation_available=list(emulation_available()), timm=_version("timm"),
                torch_pruning=_version("torch-pruning"), deprune_plugin=_version("deprune-plugin"),
                pytest_timeout=importlib.util.find_spec("pytest_timeout") is not None)
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_GiB=prop.total_memory / 2**30, sm_count=prop.multi_processor_count,
                    compute_capability=f"{prop.major}.{prop.minor}")
    smi = shutil.which("nvidia-smi")
    if smi:
        info["nvidia_smi"] = _command_output([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                              "power.limit", "--format=csv,noheader"])
    for tool in ("nvcc", "compute-sanitizer"):
        path = find_tool(tool)
        out = _command_output([path, "--version"]) if path else None
        info[tool] = None if out is None else out.splitlines()[-1]
    git = _command_output(["git", "rev-parse", "HEAD"], timeout=10)
    info["git_commit"] = git if git and re.fullmatch(r"[0-9a-f]{40}", git) else None
    if info["git_commit"]:
        dirty = _command_output(["git", "status", "--porcelain", "--untracked-files=no"], timeout=10)
        info["git_dirty"] = bool(dirty)
    ctx.emit({"status": "running", **info})
    bps = copy_bandwidth(cfg.device, cfg.copy_mib)
    info.update(copy_MiB=cfg.copy_mib, copy_GBps=bps / 1e9, copy_device=cfg.device)
    where = info["gpu"] or "CPU (dry run)"
    return {"status": "ok", "summary": f"{where}, copy {bps / 1e9:.0f} GB/s", **info}


# ---- step: tests -----------------------------------------------------------------------------------------

_COUNT_WORDS = {"passed": "passed", "failed": "failed", "skipped": "skipped", "error": "errors",
                "errors": "errors", "deselected": "deselected", "xfailed": "xfailed", "xpassed": "xpassed",
                "warning": "warnings", "warnings": "warnings"}


def parse_pytest_summary(text: str) -> dict[str, Any]:
    """Counts of pytest's summary line (``passed``, ``failed``, ``skipped``, ``errors``, ``deselected``, ...),
    the line itself, the ``FAILED`` / ``ERROR`` test ids of the short summary; without a summary line (a run
    killed early) the counts of the progress characters (``.``: passed, ``F``, ``E``, ``s``) so far."""
    lines = text.splitlines()
    summary = next((ln.strip().strip("=").strip() for ln in reversed(lines)
                    if re.search(r"\b(passed|failed|skipped|errors?|no tests ran|deselected)\b", ln)
                    and re.search(r"\bin [\d.]+s\b", ln)), None)
    counts = {v: 0 for v in dict.fromkeys(_COUNT_WORDS.values())}
    if summary is not None:
        for num, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)\b",
                                    summary):
            counts[_COUNT_WORDS[word]] += int(num)
    else:
        for ln in lines:
            m = re.fullmatch(r"([.FEsxX]+)\s*(\[\s*\d+%\])?", ln.strip())
            if m:
                for ch, key in ((".", "passed"), ("F", "failed"), ("E", "errors"), ("s", "skipped"),
                                ("x", "xfailed"), ("X", "xpassed")):
                    counts[key] += m.group(1).count(ch)
    failed = [ln.split(" ", 1)[1].strip() for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return {"summary_line": summary, **counts, "failed_tests": failed[:100]}


def _tests_dir(cfg: GPUCheckConfig) -> Path | None:
    candidates = [Path(cfg.tests_dir)] if cfg.tests_dir else [Path.cwd() / "tests",
                                                              Path(__file__).resolve().parents[2] / "tests"]
    return next((d for d in candidates if (d / "cuda_env.py").is_file()), None)


def cuda_test_files(tests: Path) -> list[Path]:
    """The test modules in ``tests`` that carry the ``cuda`` mark (``CUDA_MARKS`` or ``pytest.mark.cuda``)."""
    return sorted(p for p in tests.glob("test_*.py")
                  if re.search(r"\bCUDA_MARKS\b|pytest\.mark\.cuda\b", p.read_text(errors="replace")))


def step_tests(ctx: StepContext) -> dict:
    cfg = ctx.config
    tests = _tests_dir(cfg)
    if tests is None:
        return {"status": "skipped", "summary": "no tests folder (run from the repository root or pass --tests-dir)"}
    files = cuda_test_files(tests)
    if not files:
        return {"status": "skipped", "summary": f"no cuda-marked test module in {tests}"}
    per_test = ["--timeout", str(cfg.test_timeout_s)] if importlib.util.find_spec("pytest_timeout") else []
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-o",
           f"faulthandler_timeout={cfg.test_timeout_s}", *per_test, *[str(f.relative_to(tests.parent)) for f in files]]
    log = ctx.out / "logs" / "tests_pytest.log"
    log.write_text("")
    ctx.emit({"status": "running", "command": cmd, "log": str(log.relative_to(ctx.out))})
    rc, timed_out, secs = run_logged(cmd, log, ctx.time_left() - 2 * _KILL_GRACE_S, cwd=tests.parent)
    parsed = parse_pytest_summary(log.read_text(errors="replace"))
    ok = rc in (0, 5) and not timed_out and parsed["failed"] == 0 and parsed["errors"] == 0
    status = "timeout" if timed_out else "ok" if ok else "failed"
    summary = parsed["summary_line"] or f"no summary line (exit status {rc})"
    return {"status": status, "summary": summary + (" (timed out)" if timed_out else ""), "returncode": rc,
            "pytest_seconds": round(secs, 1), "command": cmd, "files": [f.name for f in files],
            "per_test_timeout": "pytest-timeout" if per_test else "faulthandler_timeout (stacks dumped; no kill)",
            "log": str(log.relative_to(ctx.out)), **parsed}


# ---- step: sanitizer -------------------------------------------------------------------------------------

def _kernel_filter(sanitizer: str) -> list[str]:
    """The option restricting compute-sanitizer to the project's kernels (their names start ``deprune_``),
    in the spelling this version knows (``--kernel-name`` now, ``--kernel-regex`` / ``--filter`` before)."""
    text = _command_output([sanitizer, "--help"]) or ""
    for opt in ("--kernel-name", "--kernel-regex", "--filter"):
        if re.search(rf"(^|\s){re.escape(opt)}\b", text):
            return [opt, "kns=deprune_"]
    return []


_ENTRIES = ("deprune_dw_direct", "deprune_dw_dr", "deprune_dw_pw_fused")


def _sanitizer_result(text: str, rc: int | None, timed_out: bool, secs: float, log: Path, out: Path) -> dict:
    cases = dict(re.findall(r"^case (\S+ \S+): (ok|FAILED)", text, flags=re.M))
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    n_err = int(m[-1]) if m else len(re.findall(r"ERROR: AddressSanitizer|runtime error:", text))
    hit = [e for e in _ENTRIES if re.search(rf"(Invalid|Race|Barrier|Hazard|[Ee]rror)[^\n]*(\n[^\n]*){{0,6}}{e}", text)]
    ok = rc == 0 and not timed_out and n_err == 0 and cases and all(v == "ok" for v in cases.values())
    return {"status": "timeout" if timed_out else "ok" if ok else "failed", "returncode": rc, "errors": n_err,
            "cases": cases, "kernels_named_in_errors": hit, "seconds": round(secs, 1), "log": str(log.relative_to(out))}


def step_sanitizer(ctx: StepContext) -> dict:
    cfg = ctx.config
    base = [sys.executable, "-m", "deprune_plugin.app.gpu_check_cases", "--kernel", "all"]
    dtypes = cfg.sanitizer_dtypes
    dtype_args = ["--dtype", "all"] if set(dtypes) == {"float16", "float32"} else ["--dtype", dtypes[0]]
    if len(dtypes) not in (1, 2) or (len(dtypes) == 2 and dtype_args[1] != "all"):
        raise ValueError(f"sanitizer_dtypes: one dtype or float16 + float32, got {dtypes}")
    runs: list[tuple[str, list[str], dict]] = []
    if cfg.dry_run:
        from ..kernels.emulation import sanitizer_available, sanitizer_env

        ok, why = sanitizer_available()
        if not ok:
            return {"status": "skipped", "summary": f"emulation sanitizer unavailable: {why}"}
        runs.append(("asan+ubsan (emulation)", [*base, *dtype_args, "--backend", "emu"], sanitizer_env()))
    else:
        from ..kernels.report import find_tool

        cs = find_tool("compute-sanitizer")
        if cs is None:
            return {"status": "skipped", "summary": "compute-sanitizer not found (PATH, $CUDA_HOME/bin, next to nvcc)"}
        # memcheck checks each tensor's own bounds only without the caching allocator's shared blocks
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        filt = _kernel_filter(cs)
        for tool in cfg.sanitizer_tools:
            runs.append((tool, [cs, "--tool", tool, "--error-exitcode", "1", *filt, *base, *dtype_args], env))
    results: dict[str, dict] = {}
    for i, (name, cmd, env) in enumerate(runs):
        left = ctx.time_left() - 2 * _KILL_GRACE_S
        if left < 5:
            results[name] = {"status": "skipped", "summary": "out of time"}
            continue
        log = ctx.out / "logs" / f"sanitizer_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.log"
        log.write_text("")
        rc, timed_out, secs = run_logged(cmd, log, left / (len(runs) - i), env=env)
        text = log.read_text(errors="replace")
        if not cfg.dry_run and filt and rc and not timed_out and "case " not in text:
            # the driver never ran: this compute-sanitizer may spell the kernel filter otherwise; once without
            cmd = [c for c in cmd if c not in filt]
            rc, timed_out, secs2 = run_logged(cmd, log, max(5.0, left / (len(runs) - i) - secs), env=env)
            secs += secs2
            text = log.read_text(errors="replace")
        results[name] = _sanitizer_result(text, rc, timed_out, secs, log, ctx.out)
        results[name]["command"] = cmd
        ctx.emit({"status": "running", "tools": results})
    statuses = [r["status"] for r in results.values()]
    status = "ok" if all(s == "ok" for s in statuses) else "timeout" if "timeout" in statuses else "failed"
    summary = ", ".join(f"{k}: {r['status']}" + (f" ({r['errors']} errors)" if r.get("errors") else "")
                        for k, r in results.items())
    return {"status": status, "summary": summary, "dtypes": list(dtypes), "tools": results}


# ---- steps: kernels and weight sets ----------------------------------------------------------------------

def measure_problem(p: Any, ctx: StepContext, kernels: Sequence[str] | None = None) -> dict:
    """Run each project kernel on ``p`` (a :class:`.gpu_check_cases.DWProblem`) and its cuDNN form, check each
    output against the float32 reference, and time those that ran, interleaved (device clock): per
    implementation ``us`` (back to back, inputs warm in L2), ``us_cold_l2`` (on CUDA: L2 flushed before each
    call), ``pct_copy_bw`` (of ``us``), ``max_abs_err``, ``ok``, and ``errors`` for any that raised."""
    import torch

    from ..core.timing import interleaved_medians
    from .gpu_check_cases import check_output, cudnn_call, kernel_calls, logical_bytes, reference

    cfg = ctx.config
    calls: dict[str, Callable[[], Any]] = {"cudnn": cudnn_call(p)}
    row: dict[str, Any] = {"bytes": logical_bytes(p), "us": {}, "pct_copy_bw": {}, "max_abs_err": {}, "ok": {},
                           "errors": {}}
    try:
        calls.update(kernel_calls(p, cfg.backend, kernels))
    except Exception as e:  # noqa: BLE001 - a format that cannot be built is this layer's result
        row["errors"]["formats"] = _one_line(f"{type(e).__name__}: {e}")
    ref = reference(p)
    live: dict[str, Callable[[], Any]] = {}
    for name, fn in calls.items():
        try:
            y = fn()
            if cfg.device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - recorded, the other implementations still run
            row["errors"][name] = _one_line(f"{type(e).__name__}: {e}")
            continue
        row["max_abs_err"][name], row["ok"][name] = check_output(y, ref)
        live[name] = fn
    if live:
        with torch.inference_mode():
            t = interleaved_medians(live, reps=cfg.reps, warmup=2, device=cfg.device, clock="device")
            if cfg.device == "cuda":  # both: inside a network a layer's input is often still in L2, often not
                cold = interleaved_medians(live, reps=cfg.reps, warmup=0, device=cfg.device, clock="device",
                                           cold_l2=True)
                row["us_cold_l2"] = {name: s * 1e6 for name, s in cold.items()}
        for name, s in t.items():
            row["us"][name] = s * 1e6
            if ctx.copy_bps:
                row["pct_copy_bw"][name] = 100 * row["bytes"] / s / ctx.copy_bps
        if "cudnn" in t:
            row["speedup_vs_cudnn"] = {k: t["cudnn"] / v for k, v in t.items() if k != "cudnn"}
    return row


def _layer_fields(layer: Any) -> dict:
    g = layer.geometry
    return {"layer": layer.name, "c": g.c, "hw": [g.h, g.w], "out_hw": [g.oh, g.ow], "k": [g.kh, g.kw],
            "stride": [g.sh, g.sw], "act": layer.act, "kept_taps": round(float(layer.keep.float().mean()), 4)}


def _totals(rows: list[dict], copy_bps: float | None) -> dict:
    """Per implementation timed on every row: summed ``us``, and summed bytes / summed time as % of the copy
    bandwidth; the rows that miss an implementation are left out of the sums."""
    names = set.intersection(*(set(r["us"]) for r in rows)) if rows else set()
    timed = [r for r in rows if names <= set(r["us"])]
    out: dict[str, Any] = {"rows": len(timed), "us": {k: sum(r["us"][k] for r in timed) for k in sorted(names)}}
    if copy_bps and timed:
        nbytes = sum(r["bytes"] for r in timed)
        out["pct_copy_bw"] = {k: 100 * nbytes / (v * 1e-6) / copy_bps for k, v in out["us"].items() if v}
    if "cudnn" in out["us"]:
        out["speedup_vs_cudnn"] = {k: out["us"]["cudnn"] / v for k, v in out["us"].items() if k != "cudnn" and v}
    return out


def _row_bad(row: dict) -> bool:
    return bool(row["errors"]) or not all(row["ok"].values())


def _time_layers(ctx: StepContext, layers: list, batch: int, rows: list[dict], emit: Callable[[], None],
                 pairs_only: bool = False, extra: dict | None = None) -> bool:
    """Measure ``layers`` (DW kernels and, where the layer has a fusable 1x1 conv, the fused pair) at ``batch``,
    appending rows and emitting after each; False when the step ran out of time first."""
    import torch

    from .gpu_check_cases import make_problem

    cfg = ctx.config
    for i, layer in enumerate(layers):
        if ctx.time_left() < 15:
            return False
        kinds = ([] if pairs_only else ["dw"]) + (["pair"] if layer.pw_out else [])
        for kind in kinds:
            p = make_problem(layer.geometry, layer.keep, layer.act, layer.pw_out if kind == "pair" else 0,
                             layer.residual, dtype=getattr(torch, cfg.dtype), device=cfg.device, seed=i)
            row = {"batch": batch, "kind": kind, **_layer_fields(layer), **(extra or {})}
            if kind == "pair":
                row.update(pw_out=layer.pw_out, residual=layer.residual)
            row.update(measure_problem(p, ctx, ["fused"] if kind == "pair" else ["direct", "dr"]))
            rows.append(row)
            emit()
    return True


def _limit(layers: list, cfg: GPUCheckConfig) -> list:
    return layers if cfg.max_layers is None else layers[: cfg.max_layers]


def step_kernels(ctx: StepContext) -> dict:
    from .kernel_report import pruned_dw_layers

    cfg = ctx.config
    rows: list[dict] = []
    head = {"model": cfg.layer_model, "pruning": f"DEPrune-BH {cfg.dw_ratio:g} / {cfg.pw_ratio:g}", "dtype": cfg.dtype,
            "memory_format": "channels_last", "backend": cfg.backend, "image_size": cfg.image_size,
            "copy_GBps": None if ctx.copy_bps is None else ctx.copy_bps / 1e9, "rows": rows}
    complete = True
    # one model, pruned and probed once: the layers at another batch size differ only in the geometry's n
    found = _limit(pruned_dw_layers(cfg.layer_model, 1, cfg.image_size, cfg.dw_ratio, cfg.pw_ratio), cfg)
    for batch in cfg.batches:
        layers = [replace(layer, geometry=replace(layer.geometry, n=batch)) for layer in found]
        complete = _time_layers(ctx, layers, batch, rows, lambda: ctx.emit({"status": "running", **head})) and complete
        if not complete:
            break
    head["totals"] = {f"batch {b} {k}": _totals([r for r in rows if r["batch"] == b and r["kind"] == k], ctx.copy_bps)
                      for b in cfg.batches for k in ("dw", "pair")}
    bad = [f"{r['layer']} {r['kind']} b{r['batch']}" for r in rows if _row_bad(r)]
    status = "failed" if bad else "ok" if complete else "timeout"
    summary = f"{len(rows)} rows, {len(bad)} with a mismatch or an error" + ("" if complete else ", out of time")
    parts = [f"b{b} {k}: " + ", ".join(f"{n} {v:.0f} us" for n, v in head["totals"][f"batch {b} {k}"]["us"].items())
             for b in cfg.batches for k in ("dw", "pair") if head["totals"][f"batch {b} {k}"]["us"]]
    return {"status": status, "summary": summary + ("; " + "; ".join(parts) if parts else ""), "bad_rows": bad,
            **head}


def weight_set_models(cfg: GPUCheckConfig) -> dict[str, Callable[[], Any]]:
    """name -> builder of each weight set of ``cfg.layer_model`` (same random init): ``dense``,
    ``deprune_bh`` (DEPrune-BH at ``dw_ratio`` / ``pw_ratio``), ``channel`` (plain channel pruning at
    ``channel_ratio``, channel counts multiples of 8)."""
    import torch

    from ..core.zoo import build_model, classifier_of
    from ..tp_glue.baselines import channel_prune
    from ..tp_glue.pruner import DEPruner

    def base() -> tuple[Any, Any]:
        torch.manual_seed(0)
        return build_model("timm", cfg.layer_model), torch.randn(2, 3, cfg.image_size, cfg.image_size)

    def dense() -> Any:
        return base()[0]

    def deprune_bh() -> Any:
        m, ex = base()
        DEPruner(m, ex, dw_pruning_ratio=cfg.dw_ratio, pw_pruning_ratio=cfg.pw_ratio, variant="BH",
                 ignored_layers=[classifier_of(m)]).step()
        return m

    def channel() -> Any:
        m, ex = base()
        return channel_prune(m, ex, cfg.channel_ratio, [classifier_of(m)], round_to=8)

    return {"dense": dense, f"deprune_bh_{cfg.dw_ratio:g}_{cfg.pw_ratio:g}": deprune_bh,
            f"channel_{cfg.channel_ratio:g}": channel}


def step_weight_sets(ctx: StepContext) -> dict:
    from .kernel_report import dw_layers

    cfg = ctx.config
    rows: list[dict] = []
    head = {"model": cfg.layer_model, "batch": cfg.weight_set_batch, "dtype": cfg.dtype, "backend": cfg.backend,
            "image_size": cfg.image_size, "rows": rows}
    complete = True
    for name, build in weight_set_models(cfg).items():
        model = build().eval()
        layers = _limit(dw_layers(model, cfg.image_size, cfg.weight_set_batch), cfg)
        complete = _time_layers(ctx, layers, cfg.weight_set_batch, rows,
                                lambda: ctx.emit({"status": "running", **head}), pairs_only=True,
                                extra={"weight_set": name}) and complete
        if not complete:
            break
    sets = list(dict.fromkeys(r["weight_set"] for r in rows))
    head["totals"] = {s: _totals([r for r in rows if r["weight_set"] == s], ctx.copy_bps) for s in sets}
    bad = [f"{r['weight_set']} {r['layer']}" for r in rows if _row_bad(r)]
    status = "failed" if bad else "ok" if complete else "timeout"
    nan = float("nan")
    parts = [f"{s}: fused {t['us'].get('fused', nan):.0f} us vs cuDNN {t['us'].get('cudnn', nan):.0f} us"
             for s, t in head["totals"].items()]
    return {"status": status, "summary": "; ".join(parts) + (", out of time" if not complete else ""),
            "bad_rows": bad, **head}


# ---- step: bench -----------------------------------------------------------------------------------------

def _bench_summary(data: dict) -> dict:
    """The bench JSON's headline numbers: per model and batch the runners' ms, speedups vs B0/B1, max errors,
    and the goals' verdicts."""
    entries = []
    for e in data.get("models", []):
        entries.append({k: e.get(k) for k in ("model", "batch", "dtype", "backend", "ms", "speedup_vs",
                                              "max_abs_err", "accelerate")} | {"layer_rows": len(e.get("layers", []))})
    return {"entries": entries, "goals": [{k: g.get(k) for k in ("goal", "status", "verdict", "detail")}
                                          for g in data.get("goals", [])]}


def bench_stand_in(model: str, batches: Sequence[int], image_size: int, reps: int, json_path: str) -> int:
    """The dry run's ``deprune bench --device cuda``: the bench's GPU runners, per-layer rows and goals on
    the CPU in float32, with the torch backend standing in for the CUDA kernels; writes the bench's JSON."""
    import torch

    from . import bench

    args = argparse.Namespace(models=[model], batch=list(batches), image_size=image_size, dw=0.78, pw=0.5,
                              reps=reps, device="cpu", dtype=None, threads=0, no_inductor=True, json=json_path,
                              quiet=True)
    device = torch.device("cpu")
    copy_bps = copy_bandwidth("cpu", 64, reps=5)
    dense, pruned, ex, dw, pw = bench._pruned_pair(model, args, device)
    # this process only runs the stand-in: its accel runners take the torch backend (on a CPU "auto" would
    # export each to the CPU runtimes, minutes of work that the GPU run does not do)
    gpu_runners = bench.gpu_runners
    bench.gpu_runners = lambda *a, **kw: gpu_runners(*a, **{**kw, "backend": "torch"})
    entries = bench._bench_gpu(model, dense, pruned, ex, (dw, pw), args, device, torch.float32, copy_bps)
    results = {"device": "cpu (dry-run stand-in)", "torch": torch.__version__, "image_size": image_size,
               "reps": reps, "models": entries, "copy_GBps": copy_bps / 1e9, "goals": bench.goals(entries)}
    Path(json_path).write_text(json.dumps(results, indent=2))
    return 0


def step_bench(ctx: StepContext) -> dict:
    cfg = ctx.config
    runs: dict[str, dict] = {}
    models = list(cfg.bench_models)
    for i, model in enumerate(models):
        left = ctx.time_left() - 2 * _KILL_GRACE_S
        if left < 10:
            runs[model] = {"status": "skipped", "summary": "out of time"}
            continue
        out_json = ctx.out / f"bench_{model}.json"
        out_json.unlink(missing_ok=True)
        batches = [str(b) for b in cfg.bench_batches]
        if cfg.dry_run:
            cmd = [sys.executable, "-m", _MODULE, "--bench-stand-in", model, "--batch", *batches, "--image-size",
                   str(cfg.image_size), "--reps", str(cfg.bench_reps), "--json", str(out_json)]
        else:
            cmd = [sys.executable, "-m", "deprune_plugin", "bench", "--device", "cuda", "--models", model, "--batch",
                   *batches, "--image-size", str(cfg.image_size), "--reps", str(cfg.bench_reps), "--quiet", "--json",
                   str(out_json), *([] if cfg.bench_inductor else ["--no-inductor"])]
        log = ctx.out / "logs" / f"bench_{model}.log"
        log.write_text("")
        rc, timed_out, secs = run_logged(cmd, log, left / (len(models) - i))
        data = _read_json(out_json)
        ok = rc == 0 and not timed_out and data is not None
        run: dict[str, Any] = {"status": "timeout" if timed_out else "ok" if ok else "failed", "returncode": rc,
                               "seconds": round(secs, 1), "command": cmd, "log": str(log.relative_to(ctx.out)),
                               "json": out_json.name if data is not None else None}
        if data is not None:
            run.update(_bench_summary(data))
            run["result"] = data
        else:
            run["error"] = _tail(log, 5)
        runs[model] = run
        ctx.emit({"status": "running", "runs": runs})
    statuses = [r["status"] for r in runs.values()]
    status = "ok" if all(s == "ok" for s in statuses) else "timeout" if "timeout" in statuses else "failed"
    parts = []
    for model, r in runs.items():
        for e in r.get("entries", []):
            best = max((v for k, v in (e.get("speedup_vs") or {}).get("B0", {}).items() if k.startswith("accel")),
                       default=None)
            parts.append(f"{model} b{e['batch']}: best accel {best:.2f}x B0" if best else f"{model} b{e['batch']}")
        if not r.get("entries"):
            parts.append(f"{model}: {r['status']}")
    return {"status": status, "summary": "; ".join(parts), "inductor": cfg.bench_inductor, "runs": runs}


STEP_FUNCTIONS: dict[str, Callable[[StepContext], dict]] = {
    "environment": step_environment, "tests": step_tests, "sanitizer": step_sanitizer, "kernels": step_kernels,
    "weight_sets": step_weight_sets, "bench": step_bench}


# ---- the orchestrator ------------------------------------------------------------------------------------

def _config_dict(cfg: GPUCheckConfig) -> dict:
    return asdict(cfg)


def _config_from_dict(d: dict) -> GPUCheckConfig:
    kw = {}
    for f in fields(GPUCheckConfig):
        if f.name in d:
            v = d[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return GPUCheckConfig(**kw)


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the GPU check (None when torch sees a CUDA device)."""
    import torch

    return None if torch.cuda.is_available() else "torch sees no CUDA device"


def run_gpu_check(config: GPUCheckConfig, echo: Callable[[str], Any] = print) -> dict:
    """Run the check (see the module doc); returns what ``gpu_check.json`` holds. Without ``dry_run`` on a
    machine without a GPU: one line through ``echo`` and ``{"status": "no_gpu", ...}``, nothing written."""
    t0 = time.time()
    config.validate()
    if not config.dry_run:
        why = no_gpu_reason()
        if why is not None:
            echo(f"deprune gpu-check: no GPU here ({why}); nothing done (--dry-run rehearses it on the CPU)")
            return {"status": "no_gpu", "reason": why}
    out = Path(config.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "steps").mkdir(exist_ok=True)
    json_path = out / JSON_NAME
    # a step past its budget may take _KILL_GRACE_S more to stop: the last one must start its end before that
    deadline = t0 + config.total_budget_s - _KILL_GRACE_S - 5
    report: dict[str, Any] = {
        "tool": "deprune gpu-check", "format": 1, "dry_run": config.dry_run, "backend": config.backend,
        "started": _now(), "finished": None, "seconds": None, "status": "running", "config": _config_dict(config),
        "steps": {s: {"status": "pending" if s in config.steps else "skipped",
                      **({} if s in config.steps else {"summary": "not selected"})} for s in STEPS}}
    _write_json(json_path, report)
    copy_bps: float | None = None
    for step in STEPS:
        if step not in config.steps:
            continue
        left = deadline - time.time()
        budget = min(config.budget(step), left)
        if budget < 5:
            report["steps"][step] = {"status": "skipped", "summary": "out of the total time budget"}
            _write_json(json_path, report)
            echo(f"[gpu-check] {step}: skipped (out of the total time budget)")
            continue
        report["steps"][step] = {"status": "running", "started": _now(), "budget_s": round(budget, 1)}
        _write_json(json_path, report)
        entry = _run_step(step, config, out, budget, copy_bps)
        report["steps"][step] = entry
        if step == "environment" and entry.get("copy_GBps"):
            copy_bps = entry["copy_GBps"] * 1e9
        report["seconds"] = round(time.time() - t0, 1)
        _write_json(json_path, report)
        echo(f"[gpu-check] {step}: {entry['status']} in {entry['seconds']:.1f} s"
             + (f" - {entry['summary']}" if entry.get("summary") else ""))
    statuses = [report["steps"][s]["status"] for s in config.steps]
    report.update(finished=_now(), seconds=round(time.time() - t0, 1),
                  status="ok" if all(s in ("ok", "skipped") for s in statuses) else "problems",
                  counts={s: statuses.count(s) for s in dict.fromkeys(statuses)})
    _write_json(json_path, report)
    echo(f"[gpu-check] {report['status']} in {report['seconds']:.0f} s: {json_path}")
    return report


def _run_step(step: str, config: GPUCheckConfig, out: Path, budget: float, copy_bps: float | None) -> dict:
    """One step in a subprocess (``python -m deprune_plugin.app.gpu_check --step ...``) within ``budget``
    seconds; its result file (partial when it was cut short) merged with how it ended."""
    inp = out / "steps" / f"{step}.input.json"
    res = out / "steps" / f"{step}.json"
    res.unlink(missing_ok=True)
    deadline = time.time() + budget
    _write_json(inp, {"config": _config_dict(config), "copy_bps": copy_bps, "deadline": deadline})
    log = out / "logs" / f"{step}.log"
    log.write_text("")
    cmd = [sys.executable, "-m", _MODULE, "--step", step, "--input", str(inp), "--result", str(res)]
    env = None
    if config.dry_run:
        # one torch thread per process on a (possibly shared) CPU: with two, a descheduled OpenMP thread leaves
        # the other spinning at a barrier, and a loaded 2-core machine ran steps several times slower
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rc, timed_out, secs = run_logged(cmd, log, budget, env=env)
    result = _read_json(res) or {}
    entry: dict[str, Any] = {**result, "seconds": round(secs, 1), "step_returncode": rc, "step_log": f"logs/{step}.log"}
    if timed_out:
        entry["status"] = "timeout"
        entry["summary"] = f"ran past its {budget:.0f} s budget" + (
            f"; partial: {result['summary']}" if result.get("summary") else "")
    elif rc != 0 or result.get("status") in (None, "running"):
        entry["status"] = "error"
        entry["summary"] = f"exit status {rc}: " + _one_line(_tail(log, 3))
        entry["error_tail"] = _tail(log, 30)
    return entry


def _step_main(step: str, inp: Path, res: Path) -> int:
    data = json.loads(inp.read_text())
    config = _config_from_dict(data["config"])
    ctx = StepContext(config, res, data["deadline"], data.get("copy_bps"))
    if ctx.copy_bps is None and step in ("kernels", "weight_sets"):  # the environment step did not measure it
        ctx.copy_bps = copy_bandwidth(config.device, 64 if config.dry_run else 256)
    t0 = time.time()
    result = STEP_FUNCTIONS[step](ctx)
    result.setdefault("step_seconds", round(time.time() - t0, 1))
    ctx.emit(result)
    print(f"{step}: {result['status']} - {result.get('summary', '')}")
    return 0


# ---- command line ----------------------------------------------------------------------------------------

def _budget_pair(text: str) -> tuple[str, float]:
    name, sep, secs = text.partition("=")
    if not sep or name not in STEPS:
        raise argparse.ArgumentTypeError(f"expected STEP=SECONDS with STEP one of {', '.join(STEPS)}, got {text!r}")
    try:
        value = float(secs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds must be a number, got {secs!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"seconds must be > 0, got {secs!r}")
    return name, value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``deprune gpu-check`` arguments."""
    p.add_argument("--out", required=True, metavar="DIR", help="folder for gpu_check.json and the logs")
    p.add_argument("--dry-run", action="store_true",
                   help="run every step on the CPU with the host emulation standing in for CuPy (small shapes)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=None, help="run only these steps (default: all)")
    p.add_argument("--budget", nargs="+", type=_budget_pair, default=[], metavar="STEP=SECONDS",
                   help="a step's time budget (default: "
                   + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_BUDGETS_S.items()) + ")")
    p.add_argument("--total-budget", type=float, default=None, metavar="SECONDS",
                   help=f"limit of the whole run (default: {sum(DEFAULT_BUDGETS_S.values()):g})")
    p.add_argument("--bench-inductor", action="store_true",
                   help="also build the bench's torch.compile max-autotune runners (B2): several minutes more")
    p.add_argument("--tests-dir", default=None, help="the test folder (default: ./tests)")


def config_from_args(args: argparse.Namespace) -> GPUCheckConfig:
    """The :class:`GPUCheckConfig` of parsed ``deprune gpu-check`` arguments."""
    cfg = GPUCheckConfig.dry(args.out) if args.dry_run else GPUCheckConfig(out=args.out)
    budgets = dict(args.budget)
    overrides: dict[str, Any] = {"budgets_s": budgets, "bench_inductor": args.bench_inductor,
                                 "tests_dir": args.tests_dir}
    if args.steps:
        overrides["steps"] = tuple(s for s in STEPS if s in args.steps)
    if args.total_budget is not None:
        if args.total_budget <= 0:
            raise ValueError("--total-budget must be > 0 seconds")
        overrides["total_budget_s"] = args.total_budget
    return replace(cfg, **overrides)


def main(args: argparse.Namespace) -> int:
    """``deprune gpu-check``: 0 when it ran (whatever the steps found) or there is no GPU."""
    run_gpu_check(config_from_args(args))
    return 0


def _module_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {_MODULE}")
    ap.add_argument("--step", choices=STEPS)
    ap.add_argument("--input")
    ap.add_argument("--result")
    ap.add_argument("--bench-stand-in", metavar="MODEL")
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.bench_stand_in:
        return bench_stand_in(a.bench_stand_in, a.batch, a.image_size, a.reps, a.json)
    if not (a.step and a.input and a.result):
        ap.error("--step, --input and --result are needed (or --bench-stand-in)")
    return _step_main(a.step, Path(a.input), Path(a.result))


if __name__ == "__main__":
    sys.exit(_module_main())
