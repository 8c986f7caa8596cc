"""HSR: Hardware-aware Sparsity Recalibration (paper section 6, Fig. 7-(c)).

After BWT every full range of a layer keeps ``K' = tile * q + r`` columns. With ``r != 0`` the last GEMM
K-tile is partly empty. Per unaligned layer: ``epsilon = r``, ``alpha`` = speedup from aligning the layer,
``beta = alpha / epsilon``. Layers ranked by ``beta``: the top half is over-aligned ("o", prune the ``r``
smallest survivors of each range, ``K' = tile * q``), the bottom half under-aligned ("u", restore the
``tile - r`` largest pruned weights of each range, ``K' = tile * (q + 1)``). With an odd count the extra
layer goes to "u" (every pattern of the paper's Table 3 has one more u than o). Aligned layers are left
alone ("-"). Only full ranges are recalibrated; a last partial range keeps its BWT count.
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
             alpha_fn: Callable[[int, int, int], float] | None = None) -> list[HSRDecision]:
    """Rank unaligned layers by beta and mark the top half "o", the rest "u".

    Args:
        kept: K' of each layer's full ranges (``None`` = nothing to align).
        tile: GEMM tile (32 in the paper).
        limits: largest K' each layer can reach (the range size ``n_g``); "u" is capped there.
        alpha_fn: ``alpha_fn(layer_index, kept, tile) -> alpha``; default :func:`tile_cost_alpha`.

    Returns:
        One :class:`HSRDecision` per layer, in input order. Ties in beta keep layer order.
    """
    if tile <= 0:
        raise ValueError(f"tile must be > 0, got {tile}")
    limits = list(limits) if limits is not None else [None] * len(kept)
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
    # q == 0 layers cannot go down without emptying a range: they always go up.
    can_go_down = [i for i in unaligned if kept[i] // tile > 0]
    ranked = sorted(can_go_down, key=lambda i: -info[i][2])  # stable: ties keep layer order
    over = set(ranked[:n_over])
    out = []
    for i, k in enumerate(kept):
        eps, alpha, beta = info[i]
        if i not in unaligned:
            out.append(HSRDecision(k, 0, 0.0, 0.0, "-", k))
            continue
        q = k // tile
        if i in over:
            out.append(HSRDecision(k, eps, alpha, beta, "o", tile * q))
        else:
            up = tile * (q + 1)
            if limits[i] is not None:
                up = min(up, limits[i])
            out.append(HSRDecision(k, eps, alpha, beta, "u", up))
    return out


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
