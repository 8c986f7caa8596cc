"""One PNG report of a pruning run: per-layer ratios and widths, accuracy and latency.

Uses matplotlib's Agg backend (no display needed) through the object API, so it neither needs nor
changes pyplot's global backend.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from ..core.summary import Summary


def _short(name: str) -> str:
    """``blocks.3.1.conv_dw`` -> ``3.1``: layer labels that fit under a bar."""
    parts = [p for p in name.split(".") if p.isdigit()]
    return ".".join(parts) if parts else name.rsplit(".", 1)[-1]


def _bars(ax, values: Mapping[str, float] | None, title: str, ylabel: str, fmt: str) -> None:
    ax.set_title(title)
    if not values:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    names, heights = list(values), [float(v) for v in values.values()]
    colors = ["tab:grey", "tab:blue", "tab:green", "tab:orange", "tab:purple"]
    bars = ax.bar(names, heights, color=[colors[i % len(colors)] for i in range(len(names))])
    for b, h in zip(bars, heights):
        ax.annotate(format(h, fmt), (b.get_x() + b.get_width() / 2, h), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(heights) * 1.15 if max(heights) > 0 else 1)


def plot_report(summary: Summary, metrics: Mapping[str, Any] | None,
                path: str | os.PathLike) -> str:
    """Write a 2x2 figure and return its path.

    Args:
        summary: ``pruner.summary()``.
        metrics: ``{"top1": {"before": 91.0, "after": 90.2}, "latency_ms": {"before": 3.1, "after": 2.0,
            ...}, "latency_device": "cpu"}``; every entry of a panel becomes a bar (a missing panel reads
            "not measured"); other keys are ignored.
        path: output ``.png``.
    """
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    metrics = metrics or {}
    fig = Figure(figsize=(13, 8), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_dw, ax_pw), (ax_acc, ax_lat) = fig.subplots(2, 2)
    labels = [_short(r.name) for r in summary.rows]
    x = list(range(len(labels)))
    w = 0.4

    ax_dw.bar([i - w / 2 for i in x], [100 * r.target_ratio for r in summary.rows], w, label="target", color="tab:grey")
    ax_dw.bar([i + w / 2 for i in x], [100 * r.real_ratio for r in summary.rows], w, label="real (min over ranges)",
              color="tab:blue")
    for i, r in enumerate(summary.rows):
        if r.hsr != "-":  # HSR moved this layer's ratio up ("u") or down ("o"): mark which
            ax_dw.annotate(r.hsr, (i + w / 2, 100 * r.real_ratio), ha="center", va="bottom", fontsize=8)
    ax_dw.set_title(f"DW pruning ratio per layer (variant {summary.variant}, HSR {summary.dw_hsr_pattern})")
    ax_dw.set_ylabel("pruned taps [%]")
    ax_dw.set_ylim(0, 115)  # headroom so the legend sits above the bars
    ax_dw.legend(loc="upper right", ncols=2, fontsize=8)

    ax_pw.bar([i - w / 2 for i in x], [r.pw_before for r in summary.rows], w, label="before", color="tab:grey")
    ax_pw.bar([i + w / 2 for i in x], [r.pw_after for r in summary.rows], w, label="after", color="tab:green")
    ax_pw.set_title(f"PW-conv2 filters per layer (params {summary.after.params / max(summary.before.params, 1):.0%}, "
                    f"MACs {summary.after.macs / max(summary.before.macs, 1):.0%} of dense)")
    ax_pw.set_ylabel("filters")
    ax_pw.legend(loc="upper left", ncols=2, fontsize=8)
    for ax in (ax_dw, ax_pw):
        ax.set_xticks(x, labels, rotation=90, fontsize=7)
        ax.set_xlabel("DSConv layer")

    _bars(ax_acc, metrics.get("top1"), "top-1 accuracy", "%", ".1f")
    _bars(ax_lat, metrics.get("latency_ms"), f"latency ({metrics.get('latency_device', 'cpu')}, median)", "ms", ".2f")

    out = os.fspath(path)
    fig.savefig(out, dpi=110)
    return out
