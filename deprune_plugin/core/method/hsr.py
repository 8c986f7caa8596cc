"""HSR: Hardware-aware Sparsity Recalibration (paper section 6, Fig. 7-(c)).

After BWT every full range of a layer keeps ``K' = tile * q + r`` columns. With ``r != 0`` the last GEMM
K-tile is partly empty. Per unaligned layer: ``epsilon = r``, ``alpha`` = speedup from aligning the layer,
``beta = alpha / epsilon``. Layers ranked by ``beta``: the top half is over-aligned ("o", prune the ``r``
smallest survivors of each range, ``K' = tile * q``), the bottom half under-aligned ("u", restore the
``tile - r`` largest pruned weights of each range, ``K' = tile * (q + 1)``). With an odd count the extra
layer goes to "u" (every pattern of the paper's Table 3 has one more u than o). Aligned layers are left
alone ("-"). Only full ranges are recalibrated; a last partial range keeps its BWT count.

Two choices the paper leaves open:

- a cap (torch-pruning's ``max_pruning_ratio``) is never passed: a layer whose "o" would prune more than
  its cap allows (``floors``) cannot go down and goes "u";
- "o" removes ``r`` columns per range and "u" adds ``tile - r``, so which layers of equal beta go "o"
  moves the model-wide ratio (uniform targets give every layer of one kernel size the same K' and beta).
  Among layers of equal beta the "o"s go where the total kept count stays closest to the one before HSR
  (``weights``: full ranges per layer); with equal weights, layer order decides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .dcp import prune_lowest
from .ranges import range_bounds


@dataclass(frozen=True)
class HSRDecision:
    """HSR outcome for one layer (or one PW group).

    Attributes:
        kept: K' per full range before HSR (``None`` when the layer has no full range).
        epsilon: ``K' % tile`` (unpruned vectors in the unaligned tile).
        alpha: modelled or measured speedup from removing the misalignment.
        beta: ``alpha / epsilon`` (0 for aligned layers).
        mark: ``"o"`` over-aligned, ``"u"`` under-aligned, ``"-"`` untouched.
        new_kept: K' per full range after HSR.
    """

    kept: Optional[int]
    epsilon: int
    alpha: float
    beta: float
    mark: str
    new_kept: Optional[int]


def tile_cost_alpha(kept: int, tile: int) -> float:
    """alpha under the tile-step cost model (the default).

    A DR sub-GEMM's K loop runs ``ceil(K'/tile)`` tiles whatever the fill of the last one (the paper's
    step-shaped latency curve), so aligning ``K' = tile*q + r`` down to ``tile*q`` saves one of
    ``q + 1`` tile iterations: ``alpha = (q + 1) / q - 1 = 1 / q``. ``q == 0`` cannot be aligned down: inf.
    """
    q, r = divmod(kept, tile)
    if r == 0:
        return 0.0
    return math.inf if q == 0 else 1.0 / q


def hsr_plan(kept: Sequence[Optional[int]], tile: int, limits: Sequence[Optional[int]] | None = None,
             alpha_fn: Callable[[int, int, int], float] | None = None,
             floors: Sequence[Optional[int]] | None = None,
             weights: Sequence[float] | None = None) -> list[HSRDecision]:
    """Rank unaligned layers by beta and mark the top half "o", the rest "u".

    Args:
        kept: K' of each layer's full ranges (``None`` = nothing to align).
        tile: GEMM tile (32 in the paper).
        limits: largest K' each layer can reach (the range size ``n_g``); "u" is capped there.
        alpha_fn: ``alpha_fn(layer_index, kept, tile) -> alpha``; default :func:`tile_cost_alpha`.
        floors: smallest K' each layer may keep (its cap: ``ceil(n_g * (1 - max_ratio))``); a layer whose
            "o" would go below it goes "u".
        weights: how many ranges each layer's K' counts for (default 1 each); used among equal betas.

    Returns:
        One :class:`HSRDecision` per layer, in input order.
    """
    if tile <= 0:
        raise ValueError(f"tile must be > 0, got {tile}")
    limits = list(limits) if limits is not None else [None] * len(kept)
    floors = list(floors) if floors is not None else [None] * len(kept)
    weights = list(weights) if weights is not None else [1.0] * len(kept)
    alpha_fn = alpha_fn or (lambda _i, k, t: tile_cost_alpha(k, t))
    info = []
    for i, k in enumerate(kept):
        if k is None or k % tile == 0:
            info.append((0, 0.0, 0.0))
            continue
        eps = k % tile
        alpha = float(alpha_fn(i, k, tile))
        info.append((eps, alpha, alpha / eps))
    unaligned = [i for i, k in enumerate(kept) if k is not None and k % tile != 0]
    n_over = len(unaligned) // 2
    down = {i: tile * (kept[i] // tile) for i in unaligned}
    up = {i: tile * (kept[i] // tile + 1) if limits[i] is None else min(tile * (kept[i] // tile + 1), limits[i])
          for i in unaligned}
    # q == 0 layers cannot go down without emptying a range, capped layers not below their floor: they go up.
    can_go_down = [i for i in unaligned if down[i] > 0 and (floors[i] is None or down[i] >= floors[i])]
    ranked = sorted(can_go_down, key=lambda i: -info[i][2])  # stable: ties keep layer order
    over = set(ranked[:n_over])
    if 0 < n_over < len(ranked) and info[ranked[n_over - 1]][2] == info[ranked[n_over]][2]:
        over = _balance_tie(ranked, n_over, info, kept, down, up, weights, unaligned)
    out = []
    for i, k in enumerate(kept):
        eps, alpha, beta = info[i]
        if i not in unaligned:
            out.append(HSRDecision(k, 0, 0.0, 0.0, "-", k))
        elif i in over:
            out.append(HSRDecision(k, eps, alpha, beta, "o", down[i]))
        else:
            out.append(HSRDecision(k, eps, alpha, beta, "u", up[i]))
    return out


def _balance_tie(ranked: list[int], n_over: int, info: list, kept: Sequence[Optional[int]], down: dict,
                 up: dict, weights: Sequence[float], unaligned: list[int]) -> set[int]:
    """The "o" set when the half boundary falls inside a run of equal beta: layers above the run go "o",
    and of the run the ``k`` layers (a window in order of how much their "o" moves the total) that leave the
    total kept count closest to the count before HSR."""
    b = info[ranked[n_over - 1]][2]
    fixed = [i for i in ranked if info[i][2] > b]
    tie = [i for i in ranked if info[i][2] == b]
    k = n_over - len(fixed)
    # Total change in kept columns with every undecided layer "u", and what switching one to "o" changes.
    base = sum(weights[i] * ((down[i] if i in fixed else up[i]) - kept[i]) for i in unaligned)
    delta = {i: weights[i] * (down[i] - up[i]) for i in tie}
    order = sorted(tie, key=lambda i: delta[i])  # stable: equal moves keep layer order
    best = min(range(len(order) - k + 1), key=lambda s: abs(base + sum(delta[i] for i in order[s:s + k])))
    return set(fixed) | set(order[best:best + k])


def hsr_apply(scores: torch.Tensor, keep: torch.Tensor, restorable: torch.Tensor, new_kept: int,
              group_size: int) -> torch.Tensor:
    """Set every full range of one DW layer to ``new_kept`` kept columns.

    Args:
        scores: tap importance ``[C, 1, kh, kw]``.
        keep: BWT keep mask (bool, same shape).
        restorable: taps that may come back (pruned in this step; taps pruned by earlier steps stay
            pruned so masks only grow across iterative steps).
        new_kept: target K' of each full range.
        group_size: channels per range.

    Returns:
        New bool keep mask. A range lacking restorable taps ends below ``new_kept``.
    """
    out = keep.clone()
    taps = keep[0].numel()
    for s, e in range_bounds(keep.shape[0], group_size):
        if e - s != group_size:
            continue  # partial range: left at its BWT count
        k = int(keep[s:e].sum())
        if new_kept < k:
            out[s:e] = prune_lowest(scores[s:e], keep[s:e], (e - s) * taps - new_kept)
        elif new_kept > k:
            cand = (restorable[s:e] & ~keep[s:e]).reshape(-1)
            sc = torch.where(cand, scores[s:e].reshape(-1).to(torch.float64),
                             torch.full(cand.shape, -math.inf, dtype=torch.float64))
            n = min(new_kept - k, int(cand.sum()))
            order = torch.argsort(-sc, stable=True)[:n]
            flat = out[s:e].reshape(-1).clone()
            flat[order] = True
            out[s:e] = flat.reshape(out[s:e].shape)
    return out
