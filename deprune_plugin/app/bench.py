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
- GPU: unpruned eager NCHW, the pruned model and ``accelerate(pruned)``, plus per accelerated DW layer its
  time, logical bandwidth (input + output + kept weights) and that as a % of a device-to-device copy's.
"""
from __future__ import annotations

import argparse
import json
import platform
import warnings
from typing import Callable

import torch
import torch.nn as nn

from ..accel import RUNTIMES, FastDWConv, accelerate
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
    p.add_argument("--threads", type=_int_at_least(0), default=0, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--no-inductor", action="store_true", help="CPU: skip the torch.compile runner (slow to build)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (checked first)")
    p.add_argument("--quiet", action="store_true")


def _copy_bandwidth(device: torch.device, mbytes: int = 256) -> float:
    x = torch.empty(mbytes * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = interleaved_medians({"copy": lambda: y.copy_(x)}, reps=50, warmup=5, device=device, clock="device")["copy"]
    return 2 * x.numel() / t


def _per_layer(fast: nn.Module, x: torch.Tensor, copy_bw: float, reps: int) -> list[dict]:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.setdefault(n, a[0]))
             for n, m in fast.named_modules() if isinstance(m, FastDWConv)]
    fast(x)
    for h in hooks:
        h.remove()
    rows = []
    for name, inp in inputs.items():
        mod = fast.get_submodule(name)
        out = mod(inp)
        t = interleaved_medians({"layer": lambda mod=mod, inp=inp: mod(inp)}, reps=reps, warmup=3, device=x.device,
                                clock="device")["layer"]
        nbytes = inp.numel() * inp.element_size() + out.numel() * out.element_size() + int(mod.keep.sum()) * 4
        rows.append({"layer": name, "us": t * 1e6, "GBps": nbytes / t / 1e9, "pct_copy_bw": 100 * nbytes / t / copy_bw})
    return rows


def _quiet_accelerate(model: nn.Module, ex: torch.Tensor, backend: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fallbacks are in deprune_report, printed below
        return accelerate(model, backend=backend, example_inputs=ex)


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


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; returns the results (also printed)."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    results = {"device": _machine(cuda), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "image_size": args.image_size, "reps": args.reps, "models": []}
    if not cuda:
        results["runtimes"] = {rt: _version(rt) for rt in RUNTIMES if runtime_available(rt)[0]}
    copy_bw = _copy_bandwidth(device) if cuda else None
    for name in args.models:
        dw, pw = PAPER_RATIOS.get(name, (args.dw, args.pw))
        dense = build_model("timm", name).eval().to(device)
        pruned = build_model("timm", name).to(device)
        pruned.load_state_dict(dense.state_dict())
        ex = torch.randn(2, 3, args.image_size, args.image_size, device=device)
        DEPruner(pruned, ex, dw_pruning_ratio=dw, pw_pruning_ratio=pw, variant="BH",
                 ignored_layers=[classifier_of(pruned)]).step()
        pruned.eval().requires_grad_(False)
        dense.requires_grad_(False)
        if cuda:
            fast = _quiet_accelerate(pruned, ex[:1], "auto")
            runners, twins = {UNPRUNED_EAGER: dense, "pruned": pruned, "accelerate(pruned)": fast}, {}
        else:
            runners, twins, fast = _cpu_runners(dense, pruned, ex[:1], not args.no_inductor)
        for bs in args.batch:
            x = torch.randn(bs, 3, args.image_size, args.image_size, device=device)
            calls: dict[str, Callable[[], object]] = {k: (lambda m=m, x=x: m(x)) for k, m in runners.items()}
            t = interleaved_medians(calls, reps=args.reps, warmup=3, device=device, quiet=args.quiet,
                                    desc=f"{name} bs{bs}", gap_s=0.0 if cuda else CPU_GAP_S)
            base = t[UNPRUNED_EAGER]
            entry = {"model": name, "dw": dw, "pw": pw, "batch": bs, "ms": {k: v * 1e3 for k, v in t.items()},
                     "speedup": {k: base / v for k, v in t.items()},
                     "speedup_same_runtime": {k: t[twin] / t[k] for k, twin in twins.items()},
                     "backend": fast.deprune_report.backend}
            if cuda:
                entry["layers"] = _per_layer(fast, x, copy_bw, args.reps)
            results["models"].append(entry)
            _print_entry(entry, device, args.reps, t)
    if copy_bw:
        results["copy_GBps"] = copy_bw / 1e9
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


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
    for row in entry.get("layers", []):
        print(f"    {row['layer']:<30} {row['us']:8.1f} us {row['GBps']:7.1f} GB/s {row['pct_copy_bw']:5.1f}% of copy")


def main(args: argparse.Namespace) -> int:
    run(args)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
