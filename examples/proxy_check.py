"""Does the latency-aware pruner's importance proxy rank configurations the way fine-tuned accuracy does?

Per seed: the `deprune compare` recipe's dense model (digits, ``mobilenetv2_050``, 32x32), one latency-aware
prune at ``--budget`` on ``--target`` (224x224 batch 1), and ``--alternatives`` random configurations the
same latency table predicts at the same budget (blocks pruned one level at a time in random order). Every
configuration is pruned from the same dense model, its latency measured interleaved with the dense model,
then BN-recalibrated and fine-tuned with the compare recipe (same batches, distillation). Prints per seed the
proxy loss, measured latency and top-1 of each configuration and the Spearman correlation between proxy loss
and fine-tuned top-1 (negative: the proxy tracks accuracy); writes JSON.

    python examples/proxy_check.py --json examples/results/proxy_check_digits_mnv2_050_amd_epyc.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from scipy.stats import spearmanr

from deprune_plugin import DEPruner, DEPruneImportance
from deprune_plugin.app.data import make_loaders
from deprune_plugin.app.training import evaluate, reinit_classifier_, train
from deprune_plugin.core.latency import get_target, runner_of
from deprune_plugin.core.recalibration import recalibrate_bn
from deprune_plugin.core.timing import interleaved_medians
from deprune_plugin.core.zoo import build_model
from deprune_plugin.tp_glue.latency_search import LatencyConfig, prune_copy

from latency_model_check import cpu_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_050")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--budget", type=float, default=0.8)
    p.add_argument("--alternatives", type=int, default=5)
    p.add_argument("--target", default="openvino")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dense-epochs", type=int, default=12)
    p.add_argument("--finetune-epochs", type=int, default=6)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    target = get_target(args.target)
    run = runner_of(target)
    x = torch.randn(1, 3, args.size, args.size)
    seeds = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        train_loader, test_loader, classes = make_loaders("digits", 32, 64, None, seed)
        torch.manual_seed(seed)
        dense = reinit_classifier_(build_model("timm", args.model, num_classes=classes))
        train(dense, train_loader, args.dense_epochs, 0.05, "cpu", True, desc="dense")
        dense.eval()
        model = copy.deepcopy(dense)
        pruner = DEPruner(model, x, latency_budget=args.budget, target=target,
                          sensitivity_inputs=next(iter(train_loader))[0][:64],
                          importance=DEPruneImportance(taps="geometry"),
                          latency_config=LatencyConfig(alternatives=args.alternatives),
                          ignored_layers=[model.get_classifier()])
        pruner.step()
        rep = pruner.latency_report
        configs = [("knapsack", model, rep.proxy_loss, rep.predicted_s)]
        for i, alt in enumerate(rep.alternatives):
            configs.append((f"random {i}", prune_copy(dense, (x,), dict(alt.plan), alt.taps, 32),
                            alt.proxy_loss, alt.predicted_s))
        rows = []
        for name, pruned, loss, predicted in configs:
            pruned.eval()
            med = interleaved_medians({"dense": run(dense, (x,)), "pruned": run(pruned, (x,))}, reps=30, warmup=3,
                                      gap_s=0.002)
            recalibrate_bn(pruned, train_loader, 20)
            recal = evaluate(pruned, test_loader, "cpu", True)
            torch.manual_seed(seed)
            train_loader.generator.manual_seed(seed + 1)
            train(pruned, train_loader, args.finetune_epochs, 0.01, "cpu", True, desc=f"fine-tune {name}",
                  teacher=copy.deepcopy(dense))
            row = {"config": name, "proxy_loss": loss, "predicted_over_dense": predicted / rep.dense_s,
                   "measured_over_dense": med["pruned"] / med["dense"], "top1_recalibrated": recal,
                   "top1_finetuned": evaluate(pruned, test_loader, "cpu", True)}
            rows.append(row)
            print(f"seed {seed} {name:>9}: proxy {loss:.3f}, latency {row['measured_over_dense']:.2f} of dense "
                  f"(table {row['predicted_over_dense']:.2f}), top-1 recalibrated {recal:.1f}, fine-tuned "
                  f"{row['top1_finetuned']:.1f}", flush=True)
        rho = spearmanr([r["proxy_loss"] for r in rows], [r["top1_finetuned"] for r in rows]).statistic
        rho_recal = spearmanr([r["proxy_loss"] for r in rows], [r["top1_recalibrated"] for r in rows]).statistic
        best = max(rows, key=lambda r: r["top1_finetuned"])
        seeds.append({"seed": seed, "dense_top1": evaluate(dense, test_loader, "cpu", True), "rows": rows,
                      "spearman_proxy_finetuned": float(rho), "spearman_proxy_recalibrated": float(rho_recal),
                      "knapsack_minus_best_random": rows[0]["top1_finetuned"] - max(
                          r["top1_finetuned"] for r in rows[1:]) if len(rows) > 1 else None,
                      "best": best["config"], "seconds": time.perf_counter() - t0})
        print(f"seed {seed}: Spearman(proxy, fine-tuned top-1) {rho:+.2f}, (proxy, recalibrated top-1) "
              f"{rho_recal:+.2f}", flush=True)
    rhos = [s["spearman_proxy_finetuned"] for s in seeds]
    gaps = [s["knapsack_minus_best_random"] for s in seeds if s["knapsack_minus_best_random"] is not None]
    print(f"Spearman over seeds: {statistics.fmean(rhos):+.2f}; knapsack minus best random config: "
          f"{statistics.fmean(gaps):+.2f} points" if gaps else "")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python examples/proxy_check.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items() if k != "json"), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                "target": args.target, "size": args.size, "seeds": seeds}, f, indent=1)


if __name__ == "__main__":
    main()
