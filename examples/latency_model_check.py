"""How well does the latency-aware pruner's latency table predict the whole pruned model on a CPU runtime?

For each model and batch: a latency-aware prune at ``--budget`` on ``--target`` (random weights: the proxy
does not matter here, the widths it picks do), then the table's prediction of the pruned model against the
whole model measured interleaved with the unpruned one. Prints one line per case and writes JSON.

    python examples/latency_model_check.py --json examples/results/latency_model_check_amd_epyc.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import timm
import torch

from deprune_plugin import DEPruner


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - a name is only a label
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mobilenetv2_100", "efficientnet_b0", "mobilenetv3_large_100"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--budget", type=float, default=0.7)
    p.add_argument("--target", default="openvino")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None, help="torch and runtime threads (default: torch's)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for batch in args.batches:
            torch.manual_seed(0)
            model = timm.create_model(name, num_classes=10).eval()
            x = torch.randn(batch, 3, args.size, args.size)
            t0 = time.perf_counter()
            # the proxy does not matter here (random weights): a small sensitivity batch keeps the check quick
            pruner = DEPruner(model, x, latency_budget=args.budget, target=args.target,
                              sensitivity_inputs=torch.randn(2, 3, 64, 64), ignored_layers=[model.get_classifier()])
            pruner.step()
            rep = pruner.summary().latency
            row = {"model": name, "batch": batch, "budget": args.budget, "dense_ms": rep.dense_s * 1e3,
                   "predicted_ms": rep.predicted_s * 1e3, "measured_ms": rep.measured_s * 1e3,
                   "measured_over_dense": rep.measured_s / rep.dense_s, "model_error": rep.model_error,
                   "rounds": rep.rounds, "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"{name} b{batch}: dense {row['dense_ms']:.2f} ms, predicted {row['predicted_ms']:.2f} ms, "
                  f"measured {row['measured_ms']:.2f} ms ({row['measured_over_dense']:.1%} of dense, asked "
                  f"{args.budget:.0%}), table error {row['model_error']:+.1%}, {row['seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python examples/latency_model_check.py " + " ".join(
                f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
                if k != "json" and v is not None), "cpu": cpu_name(),
                "threads": torch.get_num_threads(), "target": args.target, "size": args.size, "rows": rows}, f,
                indent=1)


if __name__ == "__main__":
    main()
