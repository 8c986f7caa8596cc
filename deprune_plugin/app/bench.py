"""``deprune bench``: the pruned model against what a user would otherwise deploy, timed side by side.

Each model is pruned DEPrune-BH at the paper's Table 4 ratios, from the same random weights as its unpruned
twin. For every batch size all runners are timed **interleaved in one process** (A, B, C, A, B, C, ...)
and medians compared, so drift and other load hit every runner alike; on a CPU each timed call follows a
10 ms idle gap, so no runner pays for the threads of the one timed before it.

- CPU: unpruned eager NCHW; the unpruned and the pruned model under each installed CPU runtime (OpenVINO;
  ONNX Runtime with thread spinning off), each built by ``accelerate(model, backend=runtime)`` (BN folded,
  masks permanent, outputs checked); the pruned model under inductor (``torch.compile``, freezing on);
  the pruned eager model; and ``accelerate(pruned)`` (``backend="auto"``). Ratios: against unpruned eager,
  and each pruned runner against its unpruned twin under the same runtime.
- GPU (``--dtype``, float16 by default; inputs channels_last; cuDNN benchmark mode on), three baselines:
  **B0** the unpruned model eager channels_last; **B1** the pruned
  model with BN folded (``accelerate(pruned, backend="torch")`` with its DW layers calling their dense conv
  directly), eager channels_last; **B2** B1 under ``torch.compile(mode="max-autotune")``; and
  ``accelerate(pruned)`` with and without DW+PW pair fusion and CUDA graphs (:data:`ACCEL_VARIANTS`). Every
  runner's ratio against B0, B1 and B2 (wall clock: what a caller waits, launch overhead included), its
  logits' max-abs error, then per DW layer and per fused DW+PW pair of ``accel+fused`` its device time,
  logical bandwidth (input + output + kept weights) and that as a % of a device-to-device copy's; each pair
  is timed interleaved with its own B1 (the DW layer's dense conv, then the 1x1 conv, eager) and B2 (that
  compiled). Last, the speed targets (:func:`goals`), each met / missed with the measured ratio, or not
  measured.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import warnings
from typing import Callable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..accel import RUNTIMES, FastDWConv, accelerate
from ..accel.api import AccelerateConfig
from ..accel.fused import FusedDSConv
from ..accel.runtimes import runtime_available
from ..core.timing import interleaved_medians
from ..core.zoo import build_model, classifier_of
from ..tp_glue.pruner import DEPruner
from .training import resolve_device

PAPER_RATIOS = {"mobilenetv2_100": (0.779, 0.527), "efficientnet_b0": (0.847, 0.620),
                "mobilenetv3_small_100": (0.821, 0.700), "mobilenetv3_large_100": (0.770, 0.430)}

UNPRUNED_EAGER = "unpruned eager NCHW"
# Idle time before each timed CPU call: without it the runner timed right after a torch runner paid for
# torch's still-spinning OpenMP threads (~2 ms at batch 1, measured: OpenVINO 5.2 ms there vs 3.4 ms after
# another OpenVINO runner).
CPU_GAP_S = 0.01

#: ``--dtype`` choices (GPU only: the CPU runners stay float32).
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: The GPU baselines: unpruned eager, pruned eager with BN folded, that under torch.compile.
B0, B1, B2 = "B0", "B1", "B2"
#: ``accelerate(pruned)`` runners on the GPU: name -> (fuse_pairs, cuda_graphs).
ACCEL_VARIANTS = {"accel": (False, False), "accel+fused": (True, False), "accel+graphs": (False, True),
                  "accel+fused+graphs": (True, True)}
#: The runner whose DW layers and DW+PW pairs get per-layer rows.
LAYERS_OF = "accel+fused"
# Speed targets. Per pair: the fused pair against its B1 and B2 at batch 32
# on these models. End to end: accelerate(pruned) against B0 on EfficientNet-B0 (the paper's DEPrune-BH
# speedups on a 2080 Ti: 3.74x at batch 32, 1.90x at batch 1; there of the DSConv layers, here end to end).
PAIR_GOALS = ((B1, 2.0), (B2, 1.5))
PAIR_GOAL_BATCH = 32
PAIR_GOAL_MODELS = ("mobilenetv2_100", "efficientnet_b0")
E2E_GOALS = (("efficientnet_b0", 32, 3.74), ("efficientnet_b0", 1, 1.90))


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import _int_at_least, _ratio  # the same argument checks as `deprune prune`

    p.add_argument("--models", nargs="+", default=["mobilenetv2_100", "efficientnet_b0"],
                   help="timm model names (paper ratios for the known ones, else --dw/--pw)")
    p.add_argument("--batch", nargs="+", type=_int_at_least(1), default=[1, 32])
    p.add_argument("--image-size", type=_int_at_least(8), default=224)
    p.add_argument("--dw", type=_ratio, default=0.78, help="DW ratio for models without paper ratios")
    p.add_argument("--pw", type=_ratio, default=0.5, help="PW ratio for models without paper ratios")
    p.add_argument("--reps", type=_int_at_least(1), default=20)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="GPU: the dtype of every model and input (default float16); CPU: ignored (float32)")
    p.add_argument("--threads", type=_int_at_least(0), default=0, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--no-inductor", action="store_true",
                   help="skip the torch.compile runners (slow to build): CPU inductor; GPU B2 and the pairs' B2")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (checked first)")
    p.add_argument("--quiet", action="store_true")


def resolve_dtype(name: str | None, cuda: bool) -> torch.dtype:
    """The dtype the runners use: ``--dtype`` on a GPU (float16 when not given), float32 on a CPU."""
    if not cuda:
        return torch.float32
    if name is None:
        return torch.float16
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _copy_bandwidth(device: torch.device, mbytes: int = 256) -> float:
    x = torch.empty(mbytes * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = interleaved_medians({"copy": lambda: y.copy_(x)}, reps=50, warmup=5, device=device, clock="device")["copy"]
    return 2 * x.numel() / t


# ---- GPU baselines and runners ---------------------------------------------------------------------------

class DenseDW(nn.Module):
    """A :class:`FastDWConv`'s reference path alone: the conv on its masked, BN-folded weight, then the
    activation. B1's DW layers: what eager PyTorch runs, without the module's kernel dispatch.

    Shapes: ``[N, C, H, W]`` -> ``[N, C, Ho, Wo]``.
    """

    def __init__(self, dw: FastDWConv) -> None:
        super().__init__()
        self.dw = dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw.dense(x)


class PairB1(nn.Module):
    """A fused pair's B1: its DW layer's dense conv (+ activation), then the 1x1 conv, eager.

    Shapes: ``[N, C, H, W]`` -> ``[N, C_out, Ho, Wo]``.
    """

    def __init__(self, pair: FusedDSConv) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pair.dw.dense(x)
        return F.conv2d(y, self.pair.pw_weight.to(y.dtype), self.pair.pw_bias.to(y.dtype))


def _max_autotune(module: nn.Module) -> nn.Module:
    # dynamic=False: one graph per input shape, as max-autotune tunes its templates for a static shape
    return torch.compile(module, mode="max-autotune", dynamic=False)


def pair_baselines(pair: FusedDSConv) -> tuple[nn.Module, Callable[[], nn.Module]]:
    """``(B1 module, factory of the B2 module)`` of a fused DW+PW pair (B2: B1 under max-autotune; a factory,
    so a run without B2 never compiles)."""
    b1 = PairB1(pair).eval()
    return b1, lambda: _max_autotune(b1)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def b1_model(pruned: nn.Module, ex: torch.Tensor) -> nn.Module:
    """B1 of ``pruned`` (on ``ex``'s device and dtype): ``accelerate(backend="torch")`` (BN folded into every
    conv, channels_last model and inputs, outputs checked) with each :class:`FastDWConv` swapped for its
    dense conv (:class:`DenseDW`), so B1 pays no kernel-dispatch overhead per layer."""
    b1 = _quiet_accelerate(pruned, ex, "torch")
    for name in [n for n, m in b1.named_modules() if isinstance(m, FastDWConv)]:
        _set_submodule(b1, name, DenseDW(b1.get_submodule(name)))
    return b1


def gpu_runners(dense: nn.Module, pruned: nn.Module, ex: torch.Tensor, dtype: torch.dtype, compile_b2: bool = True,
                backend: str = "auto") -> dict[str, nn.Module]:
    """name -> module of every GPU runner, each in ``dtype`` (B0 with channels_last weights; the others
    channels_last through ``accelerate``): B0, B1, B2 (with ``compile_b2``) and :data:`ACCEL_VARIANTS`.

    Args:
        dense, pruned: the unpruned and the pruned model (float32, eval; not modified).
        ex: an example input ``[N, 3, H, W]`` on the models' device (any float dtype).
        backend: ``accelerate``'s backend for the accel runners (``"auto"``: the CUDA kernels on a GPU).
    """
    ex = ex.to(dtype)
    pruned = copy.deepcopy(pruned).to(dtype)  # accelerate in dtype: kernels chosen and checked as they will run
    runners: dict[str, nn.Module] = {B0: copy.deepcopy(dense).to(dtype=dtype, memory_format=torch.channels_last)}
    runners[B1] = b1_model(pruned, ex)
    if compile_b2:
        runners[B2] = _max_autotune(runners[B1])
    for name, (fuse, graphs) in ACCEL_VARIANTS.items():
        config = AccelerateConfig(fuse_pairs=fuse, cuda_graphs=graphs)
        runners[name] = _quiet_accelerate(pruned, ex, backend, config)
    return runners


def speedups(times: Mapping[str, float], baselines: tuple[str, ...] = (B0, B1, B2)) -> dict[str, dict[str, float]]:
    """``{baseline: {runner: times[baseline] / times[runner]}}`` for each baseline that was timed (> 1: the
    runner is faster)."""
    return {b: {k: times[b] / v for k, v in times.items()} for b in baselines if b in times}


@torch.inference_mode()
def max_abs_errors(runners: Mapping[str, nn.Module], x: torch.Tensor, dense_ref: torch.Tensor,
                   pruned_ref: torch.Tensor) -> dict[str, float]:
    """Per runner, the max-abs difference of its logits on ``x`` from the float32 reference: the unpruned
    model's (``dense_ref``) for B0, the pruned model's (``pruned_ref``) for the others. Runs under inference
    mode like the timing, so a compiled runner is not recompiled for another grad mode."""
    return {k: (m(x).float() - (dense_ref if k == B0 else pruned_ref).float()).abs().max().item()
            for k, m in runners.items()}


# ---- per layer -------------------------------------------------------------------------------------------

def logical_bytes(mod: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Bytes a layer must move at least: input + output + kept DW taps (fp32 values, as the kernels read
    them), + the PW weight and bias for a :class:`FusedDSConv`."""
    n = inp.numel() * inp.element_size() + out.numel() * out.element_size()
    dw = mod.dw if isinstance(mod, FusedDSConv) else mod
    n += int(dw.keep.sum()) * 4
    if isinstance(mod, FusedDSConv):
        n += mod.pw_weight.numel() * mod.pw_weight.element_size() + mod.pw_bias.numel() * mod.pw_bias.element_size()
    return n


def _layer_inputs(fast: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Name -> input of every FastDWConv / FusedDSConv that ``fast(x)`` calls, in call order."""
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str, args: tuple) -> None:  # returns None: a forward hook's return replaces the output
        inputs.setdefault(name, args[0])

    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: keep_input(n, a))
             for n, m in fast.named_modules() if isinstance(m, (FastDWConv, FusedDSConv))]
    try:
        fast(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs


@torch.inference_mode()
def layer_rows(fast: nn.Module, x: torch.Tensor, copy_bw: float, reps: int, compile_b2: bool = True) -> list[dict]:
    """One row per DW layer and per fused DW+PW pair that ``fast(x)`` calls: device time (``us``), logical
    bandwidth and its % of ``copy_bw`` (bytes/s). A pair is timed interleaved with its B1 and (with
    ``compile_b2``) B2 (:func:`pair_baselines`); its row adds their times and the pair's speedups over them,
    and the candidate the pair chose (``"fused"`` / ``"unfused"``; None when it never dispatched)."""
    from ..kernels.dispatch import dispatch_key

    rows = []
    for name, inp in _layer_inputs(fast, x).items():
        mod = fast.get_submodule(name)
        out = mod(inp)
        calls: dict[str, Callable[[], object]] = {"layer": lambda mod=mod, inp=inp: mod(inp)}
        pair = isinstance(mod, FusedDSConv)
        if pair:
            b1, b2_factory = pair_baselines(mod)
            calls[B1] = lambda b1=b1, inp=inp: b1(inp)
            if compile_b2:
                b2 = b2_factory()
                calls[B2] = lambda b2=b2, inp=inp: b2(inp)
        t = interleaved_medians(calls, reps=reps, warmup=3, device=x.device, clock="device")
        nbytes = logical_bytes(mod, inp, out)
        row = {"layer": name, "kind": "pair" if pair else "dw", "us": t["layer"] * 1e6,
               "GBps": nbytes / t["layer"] / 1e9, "pct_copy_bw": 100 * nbytes / t["layer"] / copy_bw}
        if pair:
            row["choice"] = mod.choices.get(dispatch_key(inp))
            for b in (B1, B2):
                if b in t:
                    row[f"us_{b}"] = t[b] * 1e6
                    row[f"speedup_vs_{b}"] = t[b] / t["layer"]
        rows.append(row)
    return rows


# ---- goals -----------------------------------------------------------------------------------------------

def verdict(measured: float | None, threshold: float, missing: str = "") -> str:
    """``"met (measured 2.10x >= 2.00x)"``, ``"missed (measured 1.20x < 2.00x)"`` or ``"not measured (why)"``."""
    if measured is None:
        return f"not measured ({missing})" if missing else "not measured"
    if measured >= threshold:
        return f"met (measured {measured:.2f}x >= {threshold:.2f}x)"
    return f"missed (measured {measured:.2f}x < {threshold:.2f}x)"


def _goal(goal: str, threshold: float, measured: float | None, detail: str = "", missing: str = "") -> dict:
    return {"goal": goal, "threshold": threshold, "measured": measured,
            "status": "not measured" if measured is None else "met" if measured >= threshold else "missed",
            "verdict": verdict(measured, threshold, missing), "detail": detail}


def _entry(entries: list[dict], model: str, batch: int) -> dict | None:
    return next((e for e in entries if e["model"] == model and e["batch"] == batch), None)


def _pair_goal(entry: dict | None, model: str, baseline: str, threshold: float) -> dict:
    goal = f"{model} batch {PAIR_GOAL_BATCH}: every fused DW+PW pair >= {threshold:g}x its {baseline}"
    if entry is None:
        return _goal(goal, threshold, None, missing=f"{model} at batch {PAIR_GOAL_BATCH} not in this run")
    pairs = [r for r in entry.get("layers", []) if r.get("kind") == "pair"]
    if not pairs:
        return _goal(goal, threshold, None, missing="no fused pairs in accel+fused")
    ratios = [(r[f"speedup_vs_{baseline}"], r["layer"]) for r in pairs if f"speedup_vs_{baseline}" in r]
    if not ratios:
        return _goal(goal, threshold, None, missing=f"{baseline} not timed")
    worst, worst_name = min(ratios)
    ok = sum(r >= threshold for r, _ in ratios)
    detail = f"{ok}/{len(ratios)} pairs meet it; worst {worst_name}"
    if any("choice" in r for r in pairs):  # a pair that chose "unfused" was timed as DW layer + 1x1 conv
        detail += f"; {sum(r.get('choice') == 'fused' for r in pairs)}/{len(pairs)} ran the fused kernel"
    return _goal(goal, threshold, worst, detail=detail)


def _e2e_goal(entry: dict | None, model: str, batch: int, threshold: float) -> dict:
    goal = f"{model} batch {batch}: accelerate(pruned) end to end >= {threshold:g}x B0"
    if entry is None:
        return _goal(goal, threshold, None, missing=f"{model} at batch {batch} not in this run")
    vs_b0 = entry.get("speedup_vs", {}).get(B0, {})
    timed = {k: vs_b0[k] for k in ACCEL_VARIANTS if k in vs_b0}
    if not timed:
        return _goal(goal, threshold, None, missing="no accelerate(pruned) runner timed")
    best = max(timed, key=timed.get)
    return _goal(goal, threshold, timed[best], detail=f"best variant {best}; "
                 + ", ".join(f"{k} {v:.2f}x" for k, v in timed.items()))


def goals(entries: list[dict]) -> list[dict]:
    """The speed targets checked against the GPU entries of a run: per pair (:data:`PAIR_GOALS` on
    :data:`PAIR_GOAL_MODELS` at batch :data:`PAIR_GOAL_BATCH`: the worst pair's ratio is the measured one)
    and end to end (:data:`E2E_GOALS`: the best ``accelerate(pruned)`` variant against B0). Each: goal,
    threshold, measured (None when not measured), status (met / missed / not measured), verdict, detail."""
    out = [_pair_goal(_entry(entries, m, PAIR_GOAL_BATCH), m, b, thr) for m in PAIR_GOAL_MODELS
           for b, thr in PAIR_GOALS]
    out += [_e2e_goal(_entry(entries, m, bs), m, bs, thr) for m, bs, thr in E2E_GOALS]
    return out


# ---- shared helpers --------------------------------------------------------------------------------------

def _quiet_accelerate(model: nn.Module, ex: torch.Tensor, backend: str,
                      config: AccelerateConfig | None = None) -> nn.Module:
    with warnings.catch_warnings():
        # fallbacks, reverted edits and ignored options are all in deprune_report (printed / stored below)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return accelerate(model, backend=backend, example_inputs=ex, config=config)


def _inductor(model: nn.Module) -> nn.Module:
    from torch._inductor import config as inductor_config

    inductor_config.freezing = True  # constant-fold the (frozen, eval) weights: BN folding and layout
    return torch.compile(model, dynamic=False)


def _cpu_runners(dense: nn.Module, pruned: nn.Module, ex: torch.Tensor, inductor: bool
                 ) -> tuple[dict[str, nn.Module], dict[str, str], nn.Module]:
    """name -> module for every CPU runner, pairs ``pruned name -> unpruned twin``, and accelerate(pruned)."""
    runners: dict[str, nn.Module] = {UNPRUNED_EAGER: dense, "pruned eager": pruned}
    twins: dict[str, str] = {"pruned eager": UNPRUNED_EAGER}
    for rt in RUNTIMES:
        if not runtime_available(rt)[0]:
            continue
        runners[f"unpruned {rt}"] = _quiet_accelerate(dense, ex, rt)
        runners[f"pruned {rt}"] = _quiet_accelerate(pruned, ex, rt)
        twins[f"pruned {rt}"] = f"unpruned {rt}"
    if inductor:
        runners["pruned inductor"] = _inductor(pruned)
    fast = _quiet_accelerate(pruned, ex, "auto")
    runners["accelerate(pruned)"] = fast
    return runners, twins, fast


def _machine(cuda: bool) -> str:
    if cuda:
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str | None]:
    """GPU name, torch, CUDA, cuDNN, CUDA driver, CuPy and NVRTC versions (None where unavailable)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info: dict[str, str | None] = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": None if cudnn is None else str(cudnn),
        "driver": None, "cupy": None, "nvrtc": None}
    try:
        import cupy

        info["cupy"] = cupy.__version__
        info["driver"] = str(cupy.cuda.runtime.driverGetVersion())
        info["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception:  # noqa: BLE001 - CuPy missing or no driver: those versions stay None
        pass
    return info


@contextlib.contextmanager
def _gpu_settings() -> Iterator[None]:
    """cuDNN benchmark mode on (B0's definition; every runner gets it) and room for one compiled graph per
    model, batch size and pair (dynamo otherwise falls back to eager after 8 recompiles of one code object,
    and every pair's B2 shares PairB1.forward; past the limit: an error, never a silently eager B2). All
    restored after."""
    import torch._dynamo.config as dynamo_config

    wanted = {"recompile_limit": max(dynamo_config.recompile_limit, 512),
              "accumulated_recompile_limit": max(dynamo_config.accumulated_recompile_limit, 4096),
              "fail_on_recompile_limit_hit": True}
    wanted = {k: v for k, v in wanted.items() if hasattr(dynamo_config, k)}  # (names of this torch version)
    old_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with dynamo_config.patch(wanted):
            yield
    finally:
        torch.backends.cudnn.benchmark = old_benchmark


def _pruned_pair(name: str, args: argparse.Namespace, device: torch.device
                 ) -> tuple[nn.Module, nn.Module, torch.Tensor, float, float]:
    """``(unpruned, pruned DEPrune-BH, example input [2, 3, S, S], dw ratio, pw ratio)``, both eval, float32,
    from the same random weights."""
    dw, pw = PAPER_RATIOS.get(name, (args.dw, args.pw))
    dense = build_model("timm", name).eval().to(device)
    pruned = build_model("timm", name).to(device)
    pruned.load_state_dict(dense.state_dict())
    ex = torch.randn(2, 3, args.image_size, args.image_size, device=device)
    DEPruner(pruned, ex, dw_pruning_ratio=dw, pw_pruning_ratio=pw, variant="BH",
             ignored_layers=[classifier_of(pruned)]).step()
    pruned.eval().requires_grad_(False)
    dense.requires_grad_(False)
    return dense, pruned, ex, dw, pw


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; returns the results (also printed)."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    dtype = resolve_dtype(getattr(args, "dtype", None), cuda)
    results = {"device": _machine(cuda), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "image_size": args.image_size, "reps": args.reps, "models": []}
    if cuda:
        results["machine"] = machine_info()
        results["dtype"] = str(dtype).removeprefix("torch.")
    else:
        results["runtimes"] = {rt: _version(rt) for rt in RUNTIMES if runtime_available(rt)[0]}
        if getattr(args, "dtype", None) not in (None, "float32"):
            print(f"note: --dtype {args.dtype} is for --device cuda; the CPU runners run float32")
    with _gpu_settings() if cuda else contextlib.nullcontext():
        copy_bw = _copy_bandwidth(device) if cuda else None
        for name in args.models:
            dense, pruned, ex, dw, pw = _pruned_pair(name, args, device)
            bench = _bench_gpu if cuda else _bench_cpu
            results["models"] += bench(name, dense, pruned, ex, (dw, pw), args, device, dtype, copy_bw)
    if copy_bw:
        results["copy_GBps"] = copy_bw / 1e9
    if cuda:
        results["goals"] = goals(results["models"])
        _print_goals(results["goals"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def _bench_cpu(name: str, dense: nn.Module, pruned: nn.Module, ex: torch.Tensor, ratios: tuple[float, float],
               args: argparse.Namespace, device: torch.device, dtype: torch.dtype, copy_bw: float | None
               ) -> list[dict]:
    runners, twins, fast = _cpu_runners(dense, pruned, ex[:1], not args.no_inductor)
    entries = []
    for bs in args.batch:
        x = torch.randn(bs, 3, args.image_size, args.image_size, device=device)
        calls: dict[str, Callable[[], object]] = {k: (lambda m=m, x=x: m(x)) for k, m in runners.items()}
        t = interleaved_medians(calls, reps=args.reps, warmup=3, device=device, quiet=args.quiet,
                                desc=f"{name} bs{bs}", gap_s=CPU_GAP_S)
        base = t[UNPRUNED_EAGER]
        entry = {"model": name, "dw": ratios[0], "pw": ratios[1], "batch": bs, "ms": {k: v * 1e3 for k, v in t.items()},
                 "speedup": {k: base / v for k, v in t.items()},
                 "speedup_same_runtime": {k: t[twin] / t[k] for k, twin in twins.items()},
                 "backend": fast.deprune_report.backend}
        entries.append(entry)
        _print_entry(entry, device, args.reps, t)
    return entries


def _report_counts(model: nn.Module) -> dict[str, int]:
    entries = model.deprune_report.entries
    return {a: sum(e.action == a for e in entries) for a in ("replaced", "folded", "fused", "unfused", "left")}


def _bench_gpu(name: str, dense: nn.Module, pruned: nn.Module, ex: torch.Tensor, ratios: tuple[float, float],
               args: argparse.Namespace, device: torch.device, dtype: torch.dtype, copy_bw: float | None
               ) -> list[dict]:
    compile_b2 = not args.no_inductor
    runners = gpu_runners(dense, pruned, ex[:1], dtype, compile_b2=compile_b2)
    fast = runners[LAYERS_OF]
    entries = []
    for bs in args.batch:
        x32 = torch.randn(bs, 3, args.image_size, args.image_size, device=device)
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            dense_ref, pruned_ref = dense(x32), pruned(x32)  # float32 references, TF32 off
        x = x32.to(dtype).contiguous(memory_format=torch.channels_last)
        errors = max_abs_errors(runners, x, dense_ref, pruned_ref)  # also the first call: compiles, captures
        calls: dict[str, Callable[[], object]] = {k: (lambda m=m, x=x: m(x)) for k, m in runners.items()}
        t = interleaved_medians(calls, reps=args.reps, warmup=3, device=device, quiet=args.quiet,
                                desc=f"{name} bs{bs}", clock="wall")
        vs = speedups(t)
        entry = {"model": name, "dw": ratios[0], "pw": ratios[1], "batch": bs,
                 "dtype": str(dtype).removeprefix("torch."), "clock": "wall",
                 "ms": {k: v * 1e3 for k, v in t.items()}, "speedup": vs[B0], "speedup_vs": vs,
                 "speedup_same_runtime": {}, "max_abs_err": errors, "backend": fast.deprune_report.backend,
                 "accelerate": {k: _report_counts(runners[k]) for k in ACCEL_VARIANTS},
                 "layers_of": LAYERS_OF, "layers_clock": "device",
                 "layers": layer_rows(fast, x, copy_bw, args.reps, compile_b2)}
        entries.append(entry)
        _print_gpu_entry(entry, device, args.reps)
    return entries


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _print_entry(entry: dict, device: torch.device, reps: int, t: dict[str, float]) -> None:
    print(f"{entry['model']} (DW {entry['dw']:.1%} / PW {entry['pw']:.1%}) batch {entry['batch']} on {device.type}, "
          f"medians of {reps} interleaved; accelerate chose {entry['backend']}:")
    print(f"  {'runner':<24} {'ms':>9}  {'vs unpruned eager':>17}  {'vs unpruned, same runtime':>25}")
    for k, v in t.items():
        same = entry["speedup_same_runtime"].get(k)
        print(f"  {k:<24} {v * 1e3:9.2f}  {entry['speedup'][k]:16.2f}x  "
              + (f"{same:24.2f}x" if same is not None else f"{'':>25}"))


def _print_gpu_entry(entry: dict, device: torch.device, reps: int) -> None:
    vs = entry["speedup_vs"]
    print(f"{entry['model']} (DW {entry['dw']:.1%} / PW {entry['pw']:.1%}) batch {entry['batch']} on {device.type} "
          f"{entry['dtype']}, medians of {reps} interleaved (wall clock); accelerate chose {entry['backend']}:")
    print(f"  {'runner':<20} {'ms':>9} " + "".join(f"{'vs ' + b:>9}" for b in vs) + f"  {'max|err|':>9}")
    for k, ms in entry["ms"].items():
        print(f"  {k:<20} {ms:9.3f} " + "".join(f"{vs[b][k]:8.2f}x" for b in vs)
              + f"  {entry['max_abs_err'][k]:9.2e}")
    print(f"  per layer of {entry['layers_of']} (device clock):")
    for row in entry["layers"]:
        line = (f"    {row['kind']:<4} {row['layer']:<30} {row['us']:8.1f} us {row['GBps']:7.1f} GB/s "
                f"{row['pct_copy_bw']:5.1f}% of copy")
        for b in (B1, B2):
            if f"speedup_vs_{b}" in row:
                line += f"  {b} {row[f'us_{b}']:8.1f} us ({row[f'speedup_vs_{b}']:.2f}x)"
        if row["kind"] == "pair":
            line += f"  [{row['choice']}]"
        print(line)


def _print_goals(found: list[dict]) -> None:
    print("Speed targets:")
    for g in found:
        print(f"  {g['goal']}: {g['verdict']}" + (f"; {g['detail']}" if g["detail"] else ""))


def main(args: argparse.Namespace) -> int:
    run(args)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
