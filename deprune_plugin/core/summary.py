"""The pruning report: one row per DSConv layer plus model totals."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from .cost import PARAMS_LABEL, Cost
from .latency import LatencyReport


@dataclass(frozen=True)
class LayerRow:
    """One depth-wise conv and its block's PW-conv2.

    ``real_ratio`` is the minimum pruning ratio over balanced ranges (the paper's "Real DW");
    ``kept_per_range`` lists K' of every range; ``hsr`` is "o", "u" or "-". ``asked_ratio`` is what the
    caller asked of the layer (``dw_pruning_ratio`` or its override; the model-wide ratio under global
    pruning), ``target_ratio`` what pruning aimed at (after the cap and the global threshold), and ``note``
    says why the layer's pruned fraction is more than 1 point off its target or below what was asked
    (``""`` when it is not).
    """

    name: str
    kernel: tuple[int, int]
    channels: int
    target_ratio: float
    real_ratio: float
    kept_per_range: list[int]
    hsr: str
    pw_before: int
    pw_after: int
    pw_names: list[str] = field(default_factory=list)
    asked_ratio: float | None = None
    note: str = ""
    blind_channels: int = 0
    """Channels none of whose kept taps reads an input pixel at the example input's resolution: their
    output is constant (``recalibrate_bn`` folds them into the next BatchNorm's bias)."""

    @property
    def taps(self) -> int:
        return self.channels * self.kernel[0] * self.kernel[1]

    @property
    def pruned_fraction(self) -> float:
        """Fraction of the layer's taps pruned (over all ranges, unlike ``real_ratio``)."""
        return 1 - sum(self.kept_per_range) / self.taps if self.taps else 0.0


def kept_str(kept: list[int]) -> str:
    """Run-length form of per-range kept counts: ``[64, 64, 64, 32]`` -> ``"64x3,32"`` (the prune table
    and ``deprune inspect`` both print it)."""
    parts, i = [], 0
    while i < len(kept):
        j = i
        while j < len(kept) and kept[j] == kept[i]:
            j += 1
        parts.append(f"{kept[i]}x{j - i}" if j - i > 1 else str(kept[i]))
        i = j
    return ",".join(parts)


DEVIATION_POINTS = 0.01
"""How far (as a fraction) the real DW ratio may be from the asked one before it is reported: a 3x3 range of
32 channels rounds to 1/288, a partial range of 8 channels to 1/72."""


def dw_deviation(rows: list[LayerRow]) -> tuple[float, float, str] | None:
    """``(asked, real, why)`` when the model-wide DW ratio (taps-weighted) is more than
    :data:`DEVIATION_POINTS` off the asked one, else ``None``. ``why`` names the causes from the layers'
    notes, each with the number of layers and the points it moves the ratio, largest first."""
    rows = [r for r in rows if r.asked_ratio is not None and r.taps]
    total = sum(r.taps for r in rows)
    if not total:
        return None
    asked = sum(r.asked_ratio * r.taps for r in rows) / total
    real = sum(r.pruned_fraction * r.taps for r in rows) / total
    if abs(asked - real) <= DEVIATION_POINTS:
        return None
    causes: dict[str, list[float]] = {}
    for r in rows:
        kinds = [part.split(":")[0] for part in r.note.split("; ") if part]
        start = r.asked_ratio
        if kinds and kinds[0] == "cap":  # the cap moves the layer to its target, the rest moves it from there
            causes.setdefault("cap", []).append((r.target_ratio - start) * r.taps / total)
            start, kinds = r.target_ratio, kinds[1:]
        kind = kinds[0] if kinds else "rounding and per-layer targets"
        causes.setdefault(kind, []).append((r.pruned_fraction - start) * r.taps / total)
    ranked = sorted(causes.items(), key=lambda kv: -abs(sum(kv[1])))
    why = "; ".join(f"{kind} in {len(moves)} layer{'s' * (len(moves) > 1)} ({100 * sum(moves):+.2f} points)"
                    for kind, moves in ranked if abs(sum(moves)) >= 0.0005)
    return asked, real, why


def hsr_pattern(marks: list[str]) -> str:
    """The paper's notation, e.g. ``"9u8o"``."""
    return f"{marks.count('u')}u{marks.count('o')}o"


@dataclass
class Summary:
    """Report of a DEPruner: ``rows`` (one per DSConv layer), MACs/params ``before`` and ``after``.

    Iterating yields the rows; ``str(summary)`` / :meth:`table` gives a printable table.
    """

    rows: list[LayerRow]
    before: Cost
    after: Cost
    pw_hsr: list[str] = field(default_factory=list)
    variant: str = "BH"
    latency: LatencyReport | None = None
    """What a latency-aware prune chose per block and measured (``None`` for fixed ratios)."""

    def __iter__(self) -> Iterator[LayerRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> LayerRow:
        return self.rows[i]

    @property
    def dw_hsr_pattern(self) -> str:
        return hsr_pattern([r.hsr for r in self.rows])

    @property
    def pw_hsr_pattern(self) -> str:
        return hsr_pattern(self.pw_hsr)

    @property
    def dw_ratio(self) -> float:
        """Model-level DW ratio, weighted by the number of taps."""
        total = sum(r.channels * r.kernel[0] * r.kernel[1] for r in self.rows)
        kept = sum(sum(r.kept_per_range) for r in self.rows)
        return 1 - kept / total if total else 0.0

    @property
    def blind_channels(self) -> int:
        """DW channels, over all layers, whose kept taps read no input at the example's resolution."""
        return sum(r.blind_channels for r in self.rows)

    @property
    def deviation(self) -> tuple[float, float, str] | None:
        """``(asked, real, why)`` when the model-wide DW ratio is off the asked one (:func:`dw_deviation`)."""
        return dw_deviation(self.rows)

    def table(self) -> str:
        head = (f"{'layer':<34} {'k':>5} {'C':>5} {'target':>7} {'real':>7} {'HSR':>3}  "
                f"{'K per range':<18} {'PW before->after':>16}  note")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            pw = f"{r.pw_before:>7} -> {r.pw_after:<6}" if r.pw_names else f"{'-':>17}"  # no PW-conv2 known
            lines.append(f"{r.name[-34:]:<34} {r.kernel[0]}x{r.kernel[1]:<3} {r.channels:>5} "
                         f"{r.target_ratio:>7.2%} {r.real_ratio:>7.2%} {r.hsr:>3}  {kept_str(r.kept_per_range):<18} "
                         f"{pw}  {r.note}".rstrip())
        lines.append("-" * len(head))
        dev = self.deviation
        asked = f" (asked {dev[0]:.2%}: {dev[2]})" if dev else ""
        lines.append(f"variant {self.variant}: DW ratio {self.dw_ratio:.2%}{asked}, DW HSR {self.dw_hsr_pattern}, "
                     f"PW HSR {self.pw_hsr_pattern}")
        blind = self.blind_channels
        if blind:
            layers = sum(r.blind_channels > 0 for r in self.rows)
            lines.append(f"{blind} DW channel(s) in {layers} layer(s) keep no tap that reads input at the example's "
                         "resolution: constant outputs (recalibrate_bn folds them into BatchNorm biases)")
        lines.append(f"{PARAMS_LABEL} {self.before.params / 1e6:.3f} M -> {self.after.params / 1e6:.3f} M "
                     f"({self.after.params / max(self.before.params, 1):.1%}); "
                     f"MACs {self.before.macs / 1e6:.1f} M -> {self.after.macs / 1e6:.1f} M "
                     f"({self.after.macs / max(self.before.macs, 1):.1%})")
        if self.latency is not None:
            lines += [""] + self.latency.lines()
        return "\n".join(lines)

    __str__ = table
