"""``deprune compare``: prune one trained model several ways and fine-tune each the same way.

Per seed: train the dense model once, then for every method prune a copy, measure accuracy right after
pruning (with and without BatchNorm recalibration), fine-tune with one recipe for all (optionally distilling
from the dense model) and measure again. Methods (:data:`METHODS`):

- ``dense``: no pruning (fine-tuned with the same recipe, so its extra epochs are no advantage);
- ``deprune``, ``deprune-b``, ``deprune-bh``: DEPrune plain / B / BH at ``dw`` / ``pw``;
- ``dw-only``, ``pw-only``: DEPrune-B's two halves alone (what each costs in accuracy);
- ``channels``: plain torch-pruning channel pruning (l2 groups, every group) at the ratio whose non-zero
  MACs match DEPrune-BH's (matched MACs, not latency: the count does not depend on the machine);
- ``2:4``: 2:4 semi-structured sparsity on every DW conv and every 1x1 conv;
- ``channels-R``: channel pruning at ratio ``R``; ``expanded-R``: only expanded channels (PW-conv1 outputs =
  DW channels) at ``R``, streams kept;
- ``latency-B``: latency-aware pruning (``DEPruner(latency_budget=B, target=...)``); ``latency:METHOD``: the
  same at the latency ``METHOD`` measured in this seed (``METHOD`` runs earlier in the list).

Every run's latency is measured on ``latency_target`` at ``latency_size`` (interleaved with the dense model,
as a ratio), so methods can be compared at equal **measured** latency, not only at equal MACs.

MACs are counted over non-zero weights (pruned taps and 2:4 zeros are work a sparse kernel skips).
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.cost import count_cost
from ..core.recalibration import recalibrate_bn
from ..core.semi_structured import apply_nm_sparsity
from ..core.zoo import build_model, classifier_of
from ..tp_glue.baselines import channel_prune, expanded_prune, ratio_for_macs
from ..tp_glue.importance import TAP_CRITERIA, DEPruneImportance
from ..tp_glue.pruner import DEPruner
from .data import make_loaders
from .training import evaluate, reinit_classifier_, resolve_device, train

__all__ = ["CompareConfig", "METHODS", "DEFAULT_METHODS", "compare", "format_table", "plot_compare", "plot_latency",
           "pareto_front", "paired_differences", "proxy_tracking"]


@dataclass
class CompareConfig:
    """One comparison: data, model, recipe (the same for every method), methods and seeds."""

    data: str = "digits"
    model: str = "mobilenetv2_050"
    source: str = "timm"
    image_size: int = 32
    batch_size: int = 64
    limit: int | None = None
    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[str] = ("dense", "deprune", "deprune-b", "deprune-bh", "channels", "2:4")
    dense_epochs: int = 12
    finetune_epochs: int = 6
    lr: float = 0.05
    finetune_lr: float = 0.01
    dw: float = 0.78
    pw: float = 0.5
    taps: str = "magnitude"
    channel_floor: bool = False
    recalibrate: bool = True
    recalibrate_batches: int = 20
    distill: bool = True
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5
    match_iterations: int = 10  # bisection steps of the channel ratio that matches DEPrune-BH's MACs
    latency_target: str | None = "openvino"  # None: no latency measured
    latency_size: int = 224
    latency_batch: int = 1
    latency_reps: int = 200  # a millisecond-scale model needs a few hundred rounds for a ratio within ~2%
    device: str = "auto"
    quiet: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if _method(m) is None]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty list of {sorted(METHODS)} or channels-R, expanded-R, "
                             f"latency-B, latency:METHOD; got {list(self.methods)!r}")
        for i, m in enumerate(self.methods):
            if m.startswith("latency") and self.latency_target is None:
                raise ValueError(f"method {m!r} needs a latency_target")
            if m.startswith("latency:") and m.split(":", 1)[1] not in self.methods[:i]:
                raise ValueError(f"method {m!r} needs {m.split(':', 1)[1]!r} earlier in methods")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.taps not in TAP_CRITERIA:
            raise ValueError(f"taps must be one of {TAP_CRITERIA}, got {self.taps!r}")
        for name in ("dense_epochs", "finetune_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("dw", "pw"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")


@dataclass
class _Context:
    cfg: CompareConfig
    example: torch.Tensor
    sensitivity: torch.Tensor | None = None
    latency_of: dict[str, float] | None = None   # method -> measured latency ratio, this seed
    proxy_loss: float | None = None               # set by a latency-aware method
    search_ratio: float | None = None             # the search's own measured latency / dense


def _ignored(model: nn.Module) -> list[nn.Module]:
    head = classifier_of(model)
    return [] if head is None else [head]


def _deprune(variant: str, dw: float | None = None, pw: float | None = None) -> Callable[[nn.Module, _Context], None]:
    def run(model: nn.Module, ctx: _Context) -> None:
        imp = DEPruneImportance(taps=ctx.cfg.taps, channel_floor=ctx.cfg.channel_floor)
        pruner = DEPruner(model, ctx.example, importance=imp, variant=variant,
                          dw_pruning_ratio=ctx.cfg.dw if dw is None else dw,
                          pw_pruning_ratio=ctx.cfg.pw if pw is None else pw, ignored_layers=_ignored(model))
        pruner.step()
    return run


def _macs(model: nn.Module, ctx: _Context) -> int:
    return count_cost(model, (ctx.example,), nonzero=True).macs


def _bh_macs(dense: nn.Module, ctx: _Context) -> int:
    """DEPrune-BH's non-zero MACs on a copy of ``dense`` (what channel pruning is matched to)."""
    probe = copy.deepcopy(dense)
    _deprune("BH")(probe, ctx)
    return _macs(probe, ctx)


def _channels(model: nn.Module, ctx: _Context) -> None:
    target = _bh_macs(model, ctx)

    def macs_at(r: float) -> int:
        trial = copy.deepcopy(model)
        return _macs(channel_prune(trial, ctx.example, r, _ignored(trial)), ctx)

    ratio = ratio_for_macs(macs_at, target, iterations=ctx.cfg.match_iterations)
    channel_prune(model, ctx.example, ratio, _ignored(model))


def _two_four(model: nn.Module, ctx: _Context) -> None:
    apply_nm_sparsity(model, 2, 4, skip=_ignored(model))


def _channels_at(ratio: float) -> Callable[[nn.Module, _Context], None]:
    def run(model: nn.Module, ctx: _Context) -> None:
        channel_prune(model, ctx.example, ratio, _ignored(model))
    return run


def _expanded_at(ratio: float) -> Callable[[nn.Module, _Context], None]:
    """Only expanded channels, every block at ``ratio``; streams and taps kept."""
    def run(model: nn.Module, ctx: _Context) -> None:
        expanded_prune(model, ctx.example, ratio, _ignored(model))
    return run


def _latency(budget: float | str) -> Callable[[nn.Module, _Context], None]:
    def run(model: nn.Module, ctx: _Context) -> None:
        b = ctx.latency_of[budget] if isinstance(budget, str) else budget
        example = torch.randn(ctx.cfg.latency_batch, 3, ctx.cfg.latency_size, ctx.cfg.latency_size)
        pruner = DEPruner(model, example, latency_budget=min(1.0, b), target=ctx.cfg.latency_target,
                          dw_pruning_ratio=ctx.cfg.dw, sensitivity_inputs=ctx.sensitivity,
                          importance=DEPruneImportance(taps=ctx.cfg.taps), ignored_layers=_ignored(model))
        pruner.step()
        rep = pruner.latency_report
        ctx.proxy_loss, ctx.search_ratio = rep.proxy_loss, rep.measured_s / rep.dense_s
    return run


def _method(name: str) -> Callable[[nn.Module, _Context], None] | None:
    """The prune function of a method name (see the module doc), ``None`` when unknown."""
    if name in METHODS:
        return METHODS[name]
    for prefix, make in (("channels-", _channels_at), ("expanded-", _expanded_at), ("latency-", _latency)):
        if name.startswith(prefix):
            try:
                r = float(name[len(prefix):])
            except ValueError:
                return None
            return make(r) if 0.0 < r < 1.0 or (prefix == "latency-" and r == 1.0) else None
    if name.startswith("latency:"):
        return _latency(name.split(":", 1)[1])
    return None


METHODS: dict[str, Callable[[nn.Module, _Context], None]] = {
    "dense": lambda model, ctx: None,
    "deprune": _deprune("plain"),
    "deprune-b": _deprune("B"),
    "deprune-bh": _deprune("BH"),
    "dw-only": _deprune("B", pw=0.0),
    "pw-only": _deprune("B", dw=0.0),
    "channels": _channels,
    "2:4": _two_four,
}
"""Method name -> ``prune(model, context)`` (in place)."""
DEFAULT_METHODS = CompareConfig.methods


@dataclass
class RunResult:
    """One (method, seed) run: non-zero MACs and params per sample, and top-1 (%) at each stage."""

    method: str
    seed: int
    macs: int
    params: int
    top1_pruned: float
    top1_recalibrated: float | None
    top1_finetuned: float
    latency_ratio: float | None = None   # measured latency / the dense model's, on the latency target
    proxy_loss: float | None = None      # latency-aware methods: the search's summed sensitivity
    search_latency_ratio: float | None = None  # latency-aware methods: what the search measured itself


def _one_seed(cfg: CompareConfig, seed: int, bar: tqdm, done: int = 0) -> list[RunResult]:
    """The runs of one seed; ``done``: runs finished before it (for the plain progress lines)."""
    dev = resolve_device(cfg.device)
    train_loader, test_loader, num_classes = make_loaders(cfg.data, cfg.image_size, cfg.batch_size, cfg.limit, seed)
    torch.manual_seed(seed)
    dense = build_model(cfg.source, cfg.model, num_classes=num_classes)
    reinit_classifier_(dense)
    bar.set_postfix_str(f"seed {seed}: dense training")
    train(dense, train_loader, cfg.dense_epochs, cfg.lr, dev, True, desc="dense")
    dense.cpu().eval()
    example = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    sensitivity = next(iter(train_loader))[0][:64]
    results = []
    measured: dict[str, float] = {}
    for method in cfg.methods:
        bar.set_postfix_str(f"seed {seed}: {method}")
        ctx = _Context(cfg, example, sensitivity, measured)
        model = copy.deepcopy(dense)
        _method(method)(model, ctx)
        model.cpu()
        if cfg.latency_target is not None:
            measured[method] = 1.0 if method == "dense" else _latency_ratio(dense, model, cfg)
        model.cpu()
        top1_pruned = evaluate(model, test_loader, dev, True)
        recal = None
        if cfg.recalibrate and method != "dense":
            recalibrate_bn(model, train_loader, cfg.recalibrate_batches, device=dev)
            recal = evaluate(model, test_loader, dev, True)
        model.cpu()
        cost = count_cost(model, (example,), nonzero=True)
        # The same batches in the same order for every method's fine-tuning.
        torch.manual_seed(seed)
        train_loader.generator.manual_seed(seed + 1)
        teacher = copy.deepcopy(dense) if cfg.distill and method != "dense" else None
        train(model, train_loader, cfg.finetune_epochs, cfg.finetune_lr, dev, True, desc=f"fine-tune {method}",
              teacher=teacher, kd_temperature=cfg.kd_temperature, kd_alpha=cfg.kd_alpha)
        results.append(RunResult(method, seed, cost.macs, cost.params, top1_pruned, recal,
                                 evaluate(model, test_loader, dev, True), measured.get(method), ctx.proxy_loss,
                                 ctx.search_ratio))
        bar.update(1)
        if bar.disable and not cfg.quiet:  # no bar in a log: one plain line per finished run instead
            print(f"compare: {done + len(results)}/{len(cfg.seeds) * len(cfg.methods)} seed {seed} {method}: top-1 "
                  f"{results[-1].top1_finetuned:.2f}%", file=sys.stderr, flush=True)
    return results


def _latency_ratio(dense: nn.Module, pruned: nn.Module, cfg: CompareConfig) -> float:
    """Median latency of ``pruned`` over ``dense`` on ``cfg.latency_target``, timed interleaved."""
    from ..core.latency import get_target, runner_of
    from ..core.timing import interleaved_medians

    target = get_target(cfg.latency_target)
    x = (torch.randn(cfg.latency_batch, 3, cfg.latency_size, cfg.latency_size),)
    run = runner_of(target)
    if run is None:
        return target.seconds(pruned.eval(), x) / target.seconds(dense.eval(), x)
    med = interleaved_medians({"dense": run(dense.eval(), x), "pruned": run(pruned.eval(), x)},
                              reps=cfg.latency_reps, warmup=3, gap_s=0.002)
    return med["pruned"] / med["dense"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: Sequence[RunResult], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per method: mean and sample standard deviation over seeds of every measured value."""
    rows = []
    for method in methods:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        row: dict[str, Any] = {"method": method, "seeds": [r.seed for r in mine]}
        for key in ("macs", "params", "top1_pruned", "top1_recalibrated", "top1_finetuned", "latency_ratio",
                    "search_latency_ratio", "proxy_loss"):
            vals = [getattr(r, key) for r in mine if getattr(r, key) is not None]
            row[key] = _mean_std([float(v) for v in vals]) if vals else None
        rows.append(row)
    return rows


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run the comparison; returns ``{"config", "runs": [...], "summary": [...]}`` (JSON-ready)."""
    runs: list[RunResult] = []
    # disable=None: no bar unless stderr is a terminal (in a log, its \r updates pile up into one line)
    with tqdm(total=len(cfg.seeds) * len(cfg.methods), desc="compare", disable=cfg.quiet or None) as bar:
        for seed in cfg.seeds:
            runs.extend(_one_seed(cfg, seed, bar, len(runs)))
    config = asdict(cfg)
    config["seeds"], config["methods"] = list(cfg.seeds), list(cfg.methods)
    return {"config": config, "runs": [asdict(r) for r in runs],
            "summary": summarize(runs, cfg.methods), "paired": paired_differences(runs, cfg.methods),
            "proxy_tracking": proxy_tracking(runs)}


def paired_differences(runs: Sequence[RunResult], methods: Sequence[str]) -> list[dict[str, Any]]:
    """For every ``latency:METHOD``: per seed, its fine-tuned top-1 minus METHOD's and its latency ratio minus
    METHOD's; mean and standard deviation over seeds."""
    out = []
    by = {(r.method, r.seed): r for r in runs}
    for m in methods:
        if not m.startswith("latency:"):
            continue
        ref = m.split(":", 1)[1]
        pairs = [(by[(m, s)], by[(ref, s)]) for (mm, s) in by if mm == m and (ref, s) in by]
        if not pairs:
            continue
        acc = [a.top1_finetuned - b.top1_finetuned for a, b in pairs]
        lat = [a.latency_ratio - b.latency_ratio for a, b in pairs
               if a.latency_ratio is not None and b.latency_ratio is not None]
        out.append({"method": m, "reference": ref, "seeds": [a.seed for a, _ in pairs],
                    "top1_difference": acc, "top1_difference_mean_std": _mean_std(acc),
                    "latency_ratio_difference_mean_std": _mean_std(lat) if lat else None})
    return out


def proxy_tracking(runs: Sequence[RunResult]) -> dict[str, Any] | None:
    """Spearman rank correlation between the latency-aware runs' proxy loss and their fine-tuned top-1 (a
    proxy that tracks accuracy correlates negatively), within each seed and pooled."""
    pts = [(r.proxy_loss, r.top1_finetuned, r.seed) for r in runs if r.proxy_loss is not None]
    if len(pts) < 3:
        return None

    def spearman(xs: list[float], ys: list[float]) -> float | None:
        if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
            return None
        from scipy.stats import spearmanr  # scikit-learn's dependency
        return float(spearmanr(xs, ys).statistic)
    seeds = sorted({s for _, _, s in pts})
    return {"points": [{"proxy_loss": p, "top1": t, "seed": s} for p, t, s in pts],
            "spearman_pooled": spearman([p for p, _, _ in pts], [t for _, t, _ in pts]),
            "spearman_per_seed": {s: spearman([p for p, _, ss in pts if ss == s], [t for _, t, ss in pts if ss == s])
                                  for s in seeds}}


def _cell(v: tuple[float, float] | None, fmt: str = "{:.1f}") -> str:
    if v is None:
        return "-"
    return f"{fmt.format(v[0])} ± {fmt.format(v[1])}"


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the summary (mean ± std over seeds)."""
    cfg = result["config"]
    lines = [f"{cfg['model']} on {cfg['data']} {cfg['image_size']}x{cfg['image_size']}, seeds {cfg['seeds']}, "
             f"{cfg['dense_epochs']} dense + {cfg['finetune_epochs']} fine-tune epochs (lr {cfg['finetune_lr']}), "
             f"taps={cfg['taps']}, distill={cfg['distill']}",
             "", "| method | MACs (non-zero) | latency / dense | right after pruning | + BN recalibration | "
             "after fine-tuning |", "|---|---|---|---|---|---|"]
    for row in result["summary"]:
        macs = row["macs"][0] / 1e6
        lat = _cell(row.get("latency_ratio"), "{:.2f}")
        lines.append(f"| {row['method']} | {macs:.2f} M | {lat} | {_cell(row['top1_pruned'])} | "
                     f"{_cell(row['top1_recalibrated'])} | {_cell(row['top1_finetuned'])} |")
    for p in result.get("paired", []):
        m, s = p["top1_difference_mean_std"]
        lines.append(f"paired, {p['method']} - {p['reference']}: top-1 {m:+.2f} ± {s:.2f} points over seeds "
                     f"{p['seeds']}")
    if cfg.get("latency_target"):
        lines.append(f"latency: {cfg['latency_target']}, {cfg['latency_size']}x{cfg['latency_size']} batch "
                     f"{cfg['latency_batch']}, interleaved medians, ratio to the dense model")
    return "\n".join(lines)


def _axes() -> tuple[Any, Any]:
    """A headless figure and its one axes (the plots' shared layout)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _finish(fig: Any, ax: Any, cfg: dict[str, Any], xlabel: str, path: str) -> None:
    """Labels, title from the run's config, grid and legend, then the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 after fine-tuning (%)")
    ax.set_title(f"{cfg['model']}, {cfg['data']} {cfg['image_size']}px, {len(cfg['seeds'])} seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_compare(result: dict[str, Any], path: str) -> None:
    """PNG: accuracy after fine-tuning (mean ± std) against non-zero MACs, one point per method."""
    fig, ax = _axes()
    for row in result["summary"]:
        x = row["macs"][0] / 1e6
        y, err = row["top1_finetuned"]
        ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=4, label=row["method"])
        ax.annotate(row["method"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    _finish(fig, ax, result["config"], "MACs per image, non-zero weights (M)", path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x = latency, higher y = accuracy)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_latency(result: dict[str, Any], path: str) -> None:
    """PNG: fine-tuned top-1 (mean ± std) against measured latency (ratio to dense, mean ± std), one point
    per method, the Pareto front joined."""
    rows = [r for r in result["summary"] if r.get("latency_ratio")]
    fig, ax = _axes()
    pts = [(r["latency_ratio"][0], r["top1_finetuned"][0]) for r in rows]
    for r, (x, y) in zip(rows, pts):
        ax.errorbar([x], [y], xerr=[r["latency_ratio"][1]], yerr=[r["top1_finetuned"][1]], fmt="o", capsize=3)
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="gray", label="Pareto front")
    cfg = result["config"]
    _finish(fig, ax, cfg, f"measured latency / dense ({cfg['latency_target']}, {cfg['latency_size']}px, "
                          f"batch {cfg['latency_batch']})", path)


def write_json(result: dict[str, Any], path: str) -> None:
    """The result as JSON (NaN-free: accuracies and MACs are finite numbers)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, allow_nan=False)
        f.write("\n")

