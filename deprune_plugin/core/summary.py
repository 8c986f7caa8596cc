"""The pruning report: one row per DSConv layer plus model totals."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from .cost import PARAMS_LABEL, Cost


@dataclass(frozen=True)
class LayerRow:
    """One depth-wise conv and its block's PW-conv2.

    ``real_ratio`` is the minimum pruning ratio over balanced ranges (the paper's "Real DW");
    ``kept_per_range`` lists K' of every range; ``hsr`` is "o", "u" or "-".
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

    def table(self) -> str:
        head = (f"{'layer':<34} {'k':>5} {'C':>5} {'target':>7} {'real':>7} {'HSR':>3}  "
                f"{'K per range':<18} {'PW before->after':>16}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            pw = f"{r.pw_before:>7} -> {r.pw_after:<6}" if r.pw_names else f"{'-':>17}"  # no PW-conv2 known
            lines.append(f"{r.name[-34:]:<34} {r.kernel[0]}x{r.kernel[1]:<3} {r.channels:>5} "
                         f"{r.target_ratio:>7.2%} {r.real_ratio:>7.2%} {r.hsr:>3}  {kept_str(r.kept_per_range):<18} "
                         f"{pw}")
        lines.append("-" * len(head))
        lines.append(f"variant {self.variant}: DW ratio {self.dw_ratio:.2%}, DW HSR {self.dw_hsr_pattern}, "
                     f"PW HSR {self.pw_hsr_pattern}")
        lines.append(f"{PARAMS_LABEL} {self.before.params / 1e6:.3f} M -> {self.after.params / 1e6:.3f} M "
                     f"({self.after.params / max(self.before.params, 1):.1%}); "
                     f"MACs {self.before.macs / 1e6:.1f} M -> {self.after.macs / 1e6:.1f} M "
                     f"({self.after.macs / max(self.before.macs, 1):.1%})")
        return "\n".join(lines)

    __str__ = table
