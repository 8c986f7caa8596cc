"""``deprune bench``: unpruned eager NCHW vs the pruned model vs ``accelerate(pruned)``.

For each model (pruned DEPrune-BH at the paper's Table 4 ratios) and batch size, the three are timed
interleaved in one process and medians compared. On a GPU it also prints each accelerated DW layer's
time, its logical bandwidth (input + output + kept weights) and that as a % of a device-to-device copy's.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch
import torch.nn as nn

from ..accel import FastDWConv, accelerate
from ..core.timing import interleaved_medians
from ..core.zoo import build_model, classifier_of
from ..tp_glue.pruner import DEPruner

PAPER_RATIOS = {"mobilenetv2_100": (0.779, 0.527), "efficientnet_b0": (0.847, 0.620),
                "mobilenetv3_small_100": (0.821, 0.700), "mobilenetv3_large_100": (0.770, 0.430)}


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
        t = interleaved_medians({"layer": lambda: mod(inp)}, reps=reps, warmup=3, device=x.device, clock="device")["layer"]
        nbytes = inp.numel() * inp.element_size() + out.numel() * out.element_size() + int(mod.keep.sum()) * 4
        rows.append({"layer": name, "us": t * 1e6, "GBps": nbytes / t / 1e9, "pct_copy_bw": 100 * nbytes / t / copy_bw})
    return rows


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; returns the results (also printed)."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    results = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "models": []}
    copy_bw = _copy_bandwidth(device) if cuda else None
    for name in args.models:
        dw, pw = PAPER_RATIOS.get(name, (args.dw, args.pw))
        dense = build_model("timm", name).eval().to(device)
        pruned = build_model("timm", name).to(device)
        pruned.load_state_dict(dense.state_dict())
        ex = torch.randn(2, 3, args.image_size, args.image_size, device=device)
        DEPruner(pruned, ex, dw_pruning_ratio=dw, pw_pruning_ratio=pw, variant="BH",
                 ignored_layers=[classifier_of(pruned)]).step()
        pruned.eval()
        fast = accelerate(pruned, backend="auto", example_inputs=ex[:1])
        for bs in args.batch:
            x = torch.randn(bs, 3, args.image_size, args.image_size, device=device)
            t = interleaved_medians({"unpruned eager NCHW": lambda: dense(x), "pruned": lambda: pruned(x),
                                     "accelerate(pruned)": lambda: fast(x)}, reps=args.reps, warmup=3, device=device,
                                    quiet=args.quiet, desc=f"{name} bs{bs}")
            base = t["unpruned eager NCHW"]
            entry = {"model": name, "dw": dw, "pw": pw, "batch": bs,
                     "ms": {k: v * 1e3 for k, v in t.items()}, "speedup": {k: base / v for k, v in t.items()},
                     "backend": fast.deprune_report.backend}
            if cuda:
                entry["layers"] = _per_layer(fast, x, copy_bw, args.reps)
            results["models"].append(entry)
            print(f"{name} (DW {dw:.1%} / PW {pw:.1%}) batch {bs} on {device.type}, medians of {args.reps}:")
            for k, v in t.items():
                print(f"  {k:<22} {v * 1e3:9.2f} ms   {base / v:5.2f}x")
            for row in entry.get("layers", []):
                print(f"    {row['layer']:<30} {row['us']:8.1f} us {row['GBps']:7.1f} GB/s {row['pct_copy_bw']:5.1f}% of copy")
    if copy_bw:
        results["copy_GBps"] = copy_bw / 1e9
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def main(args: argparse.Namespace) -> int:
    run(args)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
