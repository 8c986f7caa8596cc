"""How long DEPruner(...) + step() take on timm efficientnet_b0 on CPU (goal: under 2 s).

    python examples/bench_pruning_time.py [--reps 5] [--model efficientnet_b0]

Medians over fresh models; construction (tracing the dependency graph) and step() reported apart.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import timm
import torch

from deprune_plugin import DEPruner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="efficientnet_b0")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--image-size", type=int, default=224)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    init, step = [], []
    for _ in range(a.reps):
        model = timm.create_model(a.model, pretrained=False)
        x = torch.randn(1, 3, a.image_size, a.image_size)
        t0 = time.perf_counter()
        pruner = DEPruner(model, x, dw_pruning_ratio=0.847, pw_pruning_ratio=0.62, variant="BH",
                          ignored_layers=[model.get_classifier()])
        t1 = time.perf_counter()
        pruner.step()
        t2 = time.perf_counter()
        init.append(t1 - t0)
        step.append(t2 - t1)
    i, s = statistics.median(init), statistics.median(step)
    print(f"{a.model} DEPrune-BH 84.7%/62.0%, {a.image_size}px, {torch.get_num_threads()} threads, "
          f"median of {a.reps}: DEPruner(...) {i:.3f} s + step() {s:.3f} s = {i + s:.3f} s (goal < 2 s)")


if __name__ == "__main__":
    main()
