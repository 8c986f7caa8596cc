"""Choosing one option per unit under a latency budget: a multiple-choice knapsack.

Torch only (plain Python here). Each unit (a block's expanded width, its DW tap ratio, ...) offers options,
each with a latency in seconds and a loss (the sensitivity proxy: how much the model's output moves when
that unit alone takes that option). :func:`allocate` picks one option per unit minimising the summed loss
with the summed latency within the budget, exactly up to the latency grid: latencies are rounded **up** to
``budget / resolution`` steps, so every answer is feasible in real seconds, and among feasible answers on
the grid it is optimal (the tests check it against brute force).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Option", "allocate", "total"]


@dataclass(frozen=True)
class Option:
    """One choice of a unit: ``latency`` in seconds (>= 0), ``loss`` (>= 0, lower is better), a free-form
    ``label`` (e.g. the kept width) and ``value`` (what the caller applies when the option is chosen)."""

    latency: float
    loss: float
    label: str = ""
    value: object = None


def total(units: Sequence[Sequence[Option]], choice: Sequence[int]) -> tuple[float, float]:
    """``(latency, loss)`` summed over units for ``choice`` (one option index per unit)."""
    return (sum(u[i].latency for u, i in zip(units, choice)), sum(u[i].loss for u, i in zip(units, choice)))


def allocate(units: Sequence[Sequence[Option]], budget: float, resolution: int = 2000) -> list[int] | None:
    """One option index per unit: least summed loss with summed latency <= ``budget``.

    Args:
        units: per unit, its options (at least one each).
        budget: seconds available to all units together.
        resolution: latency grid steps over ``[0, budget]`` (latencies are rounded up to the grid).

    Returns:
        the chosen indices, or ``None`` when even the fastest option of every unit exceeds the budget.
    """
    if any(len(u) == 0 for u in units):
        raise ValueError("every unit needs at least one option")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if budget < 0:
        return None
    if not units:
        return []
    step = budget / resolution if budget > 0 else 1.0
    cells = resolution if budget > 0 else 0
    inf = math.inf
    # best[c]: least loss of the units so far within c grid cells (so non-increasing in c)
    best = [0.0] * (cells + 1)
    back: list[list[int]] = []
    for unit in units:
        cost = [math.ceil(o.latency / step - 1e-9) if budget > 0 else (0 if o.latency <= 0 else cells + 1)
                for o in unit]
        new = [inf] * (cells + 1)
        pick = [-1] * (cells + 1)
        for i, (o, c) in enumerate(zip(unit, cost)):
            if c > cells:
                continue
            for cap in range(c, cells + 1):
                v = best[cap - c] + o.loss
                if v < new[cap]:
                    new[cap], pick[cap] = v, i
        best = new
        back.append(pick)
    if best[cells] == inf:
        return None
    choice = []
    cap = cells
    for unit, pick in zip(reversed(units), reversed(back)):
        i = pick[cap]
        choice.append(i)
        cap -= math.ceil(unit[i].latency / step - 1e-9) if budget > 0 else 0
    return choice[::-1]
