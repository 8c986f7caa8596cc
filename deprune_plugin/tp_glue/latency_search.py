"""Latency-aware allocation of DEPrune's axes for one deployment target (torch-pruning glue).

Three axes, each per block where the model allows it:

- **expanded channels**: a block's hidden width (PW-conv1 outputs = DW channels; ConvNeXt's MLP width), a
  channel group that lives inside one block (*local*);
- **streams**: groups that span blocks (residual streams, a stem feeding the first DW conv) are *shared*:
  one fraction for all of them per candidate (a stream's width sets the cost of every block it touches);
- **DW taps** (DCP / BWT / HSR at ``dw_pruning_ratio``), only where the target says pruned taps save time.

Latency table: for every hidden level ``k`` and stream fraction ``l`` (and tap choice) a copy of the model is
pruned uniformly and each block module is timed on the target at the shapes it sees; a block's latency
depends only on its own widths, so the table predicts any mix of levels. What lies outside the blocks
(stem, head, classifier, per-call overhead) is the whole model's latency minus its blocks', per ``l``. The
whole copy is timed too: the fraction of the blocks' summed saving that shows in the whole model (a block
timed alone pays its own layout conversions and cold caches) scales each block's saving at that cell.

Importance proxy (sensitivity): for each unit and level, the relative change of the model's output
``||f'(x) - f(x)|| / ||f(x)||`` on the sensitivity batch when that unit alone loses its least important
channels (torch-pruning group l2 order, :class:`DEPruneImportance`): their consumers' input columns are
zeroed, which is exactly the pruned function. Losses add over units.

Allocation: per stream fraction, a multiple-choice knapsack over blocks (:func:`core.allocation.allocate`),
the fraction with the least total loss wins. The chosen configuration is then pruned on a copy and the whole
model timed; if it misses the budget by more than the tolerance, the knapsack's budget is corrected by the
ratio and solved again (a few rounds).
"""
from __future__ import annotations

import copy
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from ..core.allocation import Option, allocate, total
from ..core.latency import Alternative, BlockLatency, LatencyReport, LatencyTarget, runner_of
from ..core.masks import attach_tap_mask, is_depthwise, remove_tap_masks, tap_mask
from ..core.method import bwt_keep_mask
from ..core.timing import interleaved_medians
from .limits import bounded_groups
from .structure import DEPruneStructure, channel_group, is_pointwise

__all__ = ["LatencyConfig", "Unit", "SearchResult", "find_units", "prune_copy", "search"]

PROXY = ("sensitivity: relative output change ||f'(x) - f(x)|| / ||f(x)|| on the sensitivity batch when one "
         "unit alone loses its least important channels (l2 group order), summed over units")


@dataclass(frozen=True)
class LatencyConfig:
    """Search knobs of a latency-aware prune.

    Args:
        hidden_levels: fractions of a block's expanded channels the search may remove (0 first).
        stream_levels: fractions of every shared group (residual streams) the search may remove (0 first).
        tolerance: how far from the budget a measured whole-model latency may land before the knapsack's
            budget is corrected and solved again (results within ``[1 - 2 tolerance, 1 + tolerance]`` of the
            budget are preferred).
        rounds: most correction rounds.
        resolution: latency grid of the knapsack.
        seconds: timing per latency-table cell on a measuring target (more rounds, less noise); the whole-model
            checks take twice that.
        alternatives: also draw this many random configurations that the table predicts at the same budget
            (blocks pruned one level at a time in random order until the budget is met) and report them with
            their proxy losses, to check that the proxy ranks configurations the way accuracy does.
    """

    hidden_levels: tuple[float, ...] = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
    stream_levels: tuple[float, ...] = (0.0, 0.25)
    tolerance: float = 0.03
    rounds: int = 4
    resolution: int = 2000
    alternatives: int = 0
    seconds: float = 0.6

    def __post_init__(self) -> None:
        for name in ("hidden_levels", "stream_levels"):
            levels = getattr(self, name)
            if not levels or levels[0] != 0.0 or any(not 0.0 <= f < 1.0 for f in levels) or \
                    list(levels) != sorted(levels):
                raise ValueError(f"{name} must be increasing fractions in [0, 1) starting at 0.0, got {levels!r}")
        if not 0.0 < self.tolerance < 0.5:
            raise ValueError(f"tolerance must be in (0, 0.5), got {self.tolerance!r}")
        if self.rounds < 1 or self.resolution < 10 or self.alternatives < 0 or not self.seconds > 0:
            raise ValueError("rounds must be >= 1, resolution >= 10, alternatives >= 0 and seconds > 0")


@dataclass
class Unit:
    """One prunable channel group: ``root`` (its name) loses output channels ``order[:width - kept]``.

    ``block``: index of the block module that holds every member (``None``: shared across blocks);
    ``consumers``: ``(module name, member channel, root channel)`` of every point-wise layer that reads the
    group, so zeroing a channel's columns there removes it from the function."""

    name: str
    width: int
    order: list[int]
    block: int | None
    consumers: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    floor: int = 1

    def kept(self, fraction: float, align: int) -> int:
        """Channels kept when ``fraction`` is removed: a multiple of ``align`` (the target's fast width),
        never below ``floor`` (the cap) or 1 channel, never above the width."""
        if fraction <= 0:
            return self.width
        k = int(round(self.width * (1 - fraction) / align)) * align
        return max(min(k, self.width), self.floor, min(align, self.width))


@dataclass
class _Block:
    name: str            # the block module
    dw: list[str]        # its DW convs


@dataclass
class SearchResult:
    """What to prune: ``plan`` (``(root name, channels to remove)`` per unit), ``taps`` (DW conv name -> tap
    ratio) and the report."""

    plan: list[tuple[str, list[int]]]
    taps: dict[str, float]
    report: LatencyReport
    loss: float


def _members(DG, group, out: bool) -> list[tuple[nn.Module, Any, list[int], list[int]]]:
    test = DG.is_out_channel_pruning_fn if out else DG.is_in_channel_pruning_fn
    return [(item.dep.target.module, item.dep.handler, list(item.idxs), list(item.root_idxs))
            for item in group if test(item.dep.handler)]


def _call_record(model: nn.Module, inputs: tuple) -> dict[nn.Module, list[tuple]]:
    """Inputs of every call of every module in one forward (modules called with tensors only)."""
    calls: dict[nn.Module, list[tuple]] = {}

    def pre(mod, args):
        calls.setdefault(mod, []).append(args)
    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _block_modules(model: nn.Module, structure: DEPruneStructure, inputs: tuple) -> list[_Block]:
    """The smallest module around each DW conv and its PW-conv2 that is called once with one tensor."""
    calls = _call_record(model, inputs)
    found: dict[str, _Block] = {}
    for b in structure.blocks:
        parts = b.dw_name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            mod = model.get_submodule(prefix)
            args = calls.get(mod, [])
            if len(args) == 1 and len(args[0]) == 1 and isinstance(args[0][0], torch.Tensor) and \
                    all(n.startswith(prefix + ".") for n in b.pw2_names):
                found.setdefault(prefix, _Block(prefix, [])).dw.append(b.dw_name)
                break
    return list(found.values())


def find_units(DG, model: nn.Module, structure: DEPruneStructure, blocks: Sequence[_Block],
               importance: Callable, ignored: set[nn.Module], max_ratio: float) -> list[Unit]:
    """Every hidden (expanded-channel) group of a DW conv and every PW-conv2 group, as :class:`Unit`."""
    names = {m: n for n, m in model.named_modules()}
    roots: list[nn.Module] = []
    with bounded_groups():
        for b in structure.blocks:
            roots.append(b.dw)
        roots.extend(structure.pw_group_roots)
        units: list[Unit] = []
        seen: set[frozenset] = set()
        for root in roots:
            group = channel_group(DG, root)
            outs = _members(DG, group, out=True)
            key = frozenset(id(m) for m, *_ in outs)
            if key in seen or any(m in ignored for m, *_ in outs):
                continue
            seen.add(key)
            width = DG.get_out_channels(root)
            if not width or width < 2:
                continue
            scores = importance(group)
            if scores is None or len(scores) != width:
                continue
            order = torch.argsort(scores.detach().float().cpu(), stable=True).tolist()
            ins = _members(DG, group, out=False)
            consumers = [(names[m], idx, ridx) for m, _, idx, ridx in ins
                         if is_pointwise(m) and not is_depthwise(m) and m in names]
            member_names = [names[m] for m, *_ in outs + ins if m in names and
                            isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm))]
            local = [i for i, blk in enumerate(blocks) if member_names and
                     all(n.startswith(blk.name + ".") for n in member_names)]
            units.append(Unit(names[root], width, order, local[0] if local else None, consumers,
                              floor=max(1, math.ceil(width * (1 - max_ratio) - 1e-9))))
    return units


def prune_copy(model: nn.Module, inputs: tuple, removals: dict[str, list[int]],
               taps: dict[str, float], group_size: int) -> nn.Module:
    """A pruned deep copy: each unit root loses the given output channels (torch-pruning), then each named
    DW conv gets BWT tap masks at its ratio."""
    work = copy.deepcopy(model).eval()
    if any(removals.values()):
        DG = tp.DependencyGraph().build_dependency(work, example_inputs=inputs, verbose=False)
        for name, idxs in removals.items():
            if not idxs:
                continue
            mod = work.get_submodule(name)
            pruner = DG.get_pruner_of_module(mod)
            group = DG.get_pruning_group(mod, pruner.prune_out_channels, list(idxs))
            group.prune()
    for name, ratio in taps.items():
        if ratio > 0:
            conv = work.get_submodule(name)
            prev = tap_mask(conv)
            attach_tap_mask(conv, bwt_keep_mask(conv.weight.detach().abs(), ratio, group_size, prev))
    return work


@torch.no_grad()
def _sensitivities(model: nn.Module, units: Sequence[Unit], kept: Callable[[Unit, float], int],
                   levels: dict[int, list[float]], sens_inputs: tuple, progress: Any) -> dict[int, list[float]]:
    """Per unit, per level: relative output change when that unit alone keeps ``kept(unit, level)``."""
    work = copy.deepcopy(model).eval()
    remove_tap_masks(work)  # masked weights are already zero; hooks would only slow the probes
    base = work(*sens_inputs)
    scale = float(base.float().norm()) or 1.0
    out: dict[int, list[float]] = {}
    for ui, u in enumerate(units):
        losses = []
        for f in levels[ui]:
            rem = set(u.order[:u.width - kept(u, f)])
            saved = []
            for name, idx, ridx in u.consumers:
                w = work.get_submodule(name).weight
                cols = [i for i, r in zip(idx, ridx) if r in rem]
                if not cols:
                    continue
                conv = work.get_submodule(name)
                saved.append((w, w.detach().clone()))
                _zero_input_columns(conv, cols)
            try:
                y = work(*sens_inputs)
                losses.append(float((y.float() - base.float()).norm()) / scale)
            finally:
                for w, orig in saved:
                    w.copy_(orig)
            progress.update(1)
        out[ui] = losses
    return out


def _zero_input_columns(layer: nn.Module, cols: list[int]) -> None:
    w = layer.weight
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:
        per_group_in = layer.in_channels // layer.groups
        per_group_out = layer.out_channels // layer.groups
        for c in cols:
            g = c // per_group_in
            w[g * per_group_out:(g + 1) * per_group_out, c % per_group_in] = 0
    else:
        w[:, cols] = 0


@torch.no_grad()
def _tap_sensitivities(model: nn.Module, dw_names: Sequence[str], ratio: float, group_size: int,
                       sens_inputs: tuple) -> dict[str, float]:
    """Per DW conv: relative output change when only its taps are pruned (BWT) at ``ratio``."""
    work = copy.deepcopy(model).eval()
    remove_tap_masks(work)
    base = work(*sens_inputs)
    scale = float(base.float().norm()) or 1.0
    out = {}
    for name in dw_names:
        conv = work.get_submodule(name)
        orig = conv.weight.detach().clone()
        keep = bwt_keep_mask(orig.abs(), ratio, group_size, orig != 0)
        conv.weight.mul_(keep)
        out[name] = float((work(*sens_inputs).float() - base.float()).norm()) / scale
        conv.weight.copy_(orig)
    return out


def _block_calls(work: nn.Module, blocks: Sequence[_Block], inputs: tuple) -> dict[str, tuple[nn.Module, tuple]]:
    """``name -> (module, inputs it sees)`` of every block of ``work`` for the example inputs."""
    calls = _call_record(work, inputs)
    return {b.name: (work.get_submodule(b.name), calls[work.get_submodule(b.name)][0]) for b in blocks}


def _runners(target: LatencyTarget, jobs: dict[str, tuple[nn.Module, tuple]]) -> dict[str, Callable[[], Any]]:
    """Zero-argument calls of each job on a measuring target. Blocks are built together when the target can
    (one conversion); the whole model always alone, the way the runtime runs a deployed model, so the
    reference and every candidate go through the same conversion."""
    run = runner_of(target)
    out = {k: run(m, x) for k, (m, x) in jobs.items() if k == "<model>"}
    blocks = {k: v for k, v in jobs.items() if k != "<model>"}
    many = getattr(target, "runners", None)
    if callable(many) and len(blocks) > 1:
        out.update(zip(blocks, many(list(blocks.values()))))
    else:
        out.update({k: run(m, x) for k, (m, x) in blocks.items()})
    return out


class _Frame:
    """Measurements relative to a reference copy's: every candidate is timed interleaved with the same
    module of the reference and reported as ``its median / reference median * reference seconds``, so the
    table holds one frame of time even when the machine's load drifts during the search. A modelled target
    answers directly."""

    def __init__(self, target: LatencyTarget, reference: nn.Module, blocks: Sequence[_Block], inputs: tuple,
                 seconds: float, min_reps: int = 8) -> None:
        self.target, self.inputs, self.seconds, self.min_reps = target, inputs, seconds, min_reps
        self.measures = runner_of(target) is not None
        jobs = _block_calls(reference, blocks, inputs)
        jobs["<model>"] = (reference, inputs)
        if self.measures:
            self.ref_run = _runners(target, jobs)
            self.ref_s = interleaved_medians(self.ref_run, reps=min_reps, warmup=2)
            self.ref_s = interleaved_medians(self.ref_run, reps=self._reps(self.ref_s.values(), 2.0), warmup=0)
        else:
            self.ref_s = {k: target.seconds(m, x) for k, (m, x) in jobs.items()}

    def _reps(self, per_round: Any, factor: float = 1.0, gap_s: float = 0.0) -> int:
        """Rounds that fill ``seconds * factor`` of timing (``per_round``: seconds of each call in a round, each
        preceded by ``gap_s``), at least ``min_reps``: a millisecond-scale model
        needs a few hundred rounds for a ratio within about 2% on a shared machine."""
        round_s = sum(s + gap_s for s in per_round) or 1e-6
        return max(self.min_reps, min(400, int(self.seconds * factor / round_s)))

    def times(self, work: nn.Module, blocks: Sequence[_Block], whole: bool, factor: float = 1.0,
              gap_s: float = 0.0) -> dict[str, float]:
        jobs = _block_calls(work, blocks, self.inputs) if blocks else {}
        if whole:
            jobs["<model>"] = (work, self.inputs)
        if not self.measures:
            return {k: self.target.seconds(m, x) for k, (m, x) in jobs.items()}
        new = _runners(self.target, jobs)
        calls = {**{f"ref|{k}": self.ref_run[k] for k in jobs}, **{f"new|{k}": fn for k, fn in new.items()}}
        reps = self._reps([self.ref_s[k] for k in jobs for _ in (0, 1)], factor, gap_s)  # ref and new calls
        med = interleaved_medians(calls, reps=reps, warmup=2, gap_s=gap_s)
        return {k: med[f"new|{k}"] / med[f"ref|{k}"] * self.ref_s[k] for k in jobs}


def _in_context(base_blocks: Sequence[float], blocks: Sequence[float], base_whole: float, whole: float) -> float:
    """The fraction of the blocks' summed saving (each block timed alone) that the whole model shows, for one
    uniformly pruned copy against its unpruned reference. Alone, a block pays its own input/output layout
    conversions and cold caches, so its saving is not the saving it brings inside the model; the factor
    is measured per table cell and applied to every block's saving at that level. 1 when the copy saves
    too little to measure a ratio."""
    saved = sum(base_blocks) - sum(blocks)
    if saved <= 0.02 * sum(base_blocks):
        return 1.0
    return min(2.0, max(0.25, (base_whole - whole) / saved))


def _corrected_budget(current: float, budget_s: float, predicted: float, measured: float, budget_eff: float) -> float:
    """The knapsack budget for the next round. The table's error is mostly in the savings it predicts (each
    block timed alone), so the predicted saving is scaled by wanted / measured saving; a ratio of totals is
    the fallback when nothing was saved."""
    if measured < current and predicted < current:
        return current - (current - predicted) * (current - budget_s) / (current - measured)
    return budget_eff * budget_s / measured


def search(model: nn.Module, DG, structure: DEPruneStructure, inputs: tuple, sens_inputs: tuple,
           target: LatencyTarget, budget: float, importance: Callable, ignored: set[nn.Module], max_ratio: float,
           tap_ratio: float, group_size: int, config: LatencyConfig, dense_s: float | None = None,
           progress_factory: Callable[..., Any] | None = None) -> SearchResult:
    """Choose per block expanded width, stream fraction and DW tap ratio for ``budget`` (fraction of
    ``dense_s``, the model's latency on ``target`` at ``inputs``' shape; measured here when ``None``).

    Raises:
        ValueError: no configuration on the table meets the budget (the message gives the fastest one).
    """
    from tqdm.auto import tqdm
    bar = progress_factory or (lambda **kw: tqdm(disable=None, leave=False, **kw))
    align = max(1, int(target.alignment))
    model.eval()
    blocks = _block_modules(model, structure, inputs)
    units = find_units(DG, model, structure, blocks, importance, ignored, max_ratio)
    local = [u for u in units if u.block is not None]
    shared = [u for u in units if u.block is None]
    index = {id(u): i for i, u in enumerate(units)}
    by_block: dict[int, list[int]] = {}
    for u in local:
        by_block.setdefault(u.block, []).append(index[id(u)])
    hidden = list(config.hidden_levels)
    streams = list(config.stream_levels) if shared else [0.0]
    taps_on = not target.taps_reason and tap_ratio > 0
    tap_levels = [0.0, tap_ratio] if taps_on else [0.0]

    def kept(u: Unit, f: float) -> int:
        return u.kept(f, align)

    # ---- importance proxy: per unit and level
    levels = {i: (hidden if u.block is not None else streams) for i, u in enumerate(units)}
    with bar(total=sum(len(v) for v in levels.values()), desc="sensitivity") as progress:
        sens = _sensitivities(model, units, kept, levels, sens_inputs, progress)
    tap_sens = _tap_sensitivities(model, [n for b in blocks for n in b.dw], tap_ratio, group_size,
                                  sens_inputs) if taps_on else {}

    # ---- latency table: blocks x hidden level x stream level x taps, plus the rest per stream level
    table: dict[tuple[int, int, int], list[float]] = {}
    cell_whole: dict[tuple[int, int, int], float] = {}
    rest: dict[int, float] = {}
    whole: dict[int, float] = {}
    n_cells = len(hidden) * len(streams) * len(tap_levels)
    with bar(total=n_cells + 1, desc=f"latency table ({target.name})") as progress:
        reference = prune_copy(model, inputs, {}, {}, group_size)
        frame = _Frame(target, reference, blocks, inputs, seconds=config.seconds)
        progress.update(1)
        for li, lf in enumerate(streams):
            for ki, kf in enumerate(hidden):
                for ti, tf in enumerate(tap_levels):
                    if ki == li == ti == 0:
                        got = dict(frame.ref_s)
                    else:
                        removals = {u.name: u.order[:u.width - kept(u, kf if u.block is not None else lf)]
                                    for u in units}
                        work = prune_copy(model, inputs, removals, {n: tf for b in blocks for n in b.dw},
                                          group_size)
                        got = frame.times(work, blocks, whole=True)
                    table[(ki, li, ti)] = [got[b.name] for b in blocks]
                    cell_whole[(ki, li, ti)] = got["<model>"]
                    if ki == 0 and ti == 0:
                        whole[li] = got["<model>"]
                        rest[li] = whole[li] - sum(table[(0, li, 0)])
                    progress.update(1)
    dense = dense_s if dense_s is not None else whole[0]  # later iterative steps: the first step's frame
    budget_s = budget * dense
    scale = {c: _in_context(table[(0, c[1], 0)], table[c], cell_whole[(0, c[1], 0)], cell_whole[c]) for c in table}

    def lat(ki: int, li: int, ti: int, bi: int) -> float:
        """Block ``bi``'s latency in the model: its saving timed alone, scaled by the cell's in-context factor."""
        base = table[(0, li, 0)][bi]
        return base - scale[(ki, li, ti)] * (base - table[(ki, li, ti)][bi])

    def options(bi: int, li: int) -> list[Option]:
        opts = []
        for ki in range(len(hidden) if bi in by_block else 1):
            for ti, tf in enumerate(tap_levels):
                loss = sum(sens[j][ki] for j in by_block.get(bi, []))
                loss += sum(tap_sens.get(n, 0.0) for n in blocks[bi].dw) if tf > 0 else 0.0
                opts.append(Option(lat(ki, li, ti, bi), loss, value=(ki, ti)))
        return opts

    def solve(budget_eff: float) -> tuple[float, int, list[tuple[int, int]]] | None:
        best = None
        for li in range(len(streams)):
            opts = [options(bi, li) for bi in range(len(blocks))]
            choice = allocate(opts, budget_eff - rest[li], config.resolution)
            if choice is None:
                continue
            loss = sum(o[c].loss for o, c in zip(opts, choice)) + \
                sum(sens[index[id(u)]][li] for u in shared)
            if best is None or loss < best[0]:
                best = (loss, li, [o[c].value for o, c in zip(opts, choice)])
        return best

    def config_of(li: int, picks: list[tuple[int, int]]) -> tuple[dict[str, list[int]], dict[str, float]]:
        removals = {}
        for u in units:
            f = hidden[picks[u.block][0]] if u.block is not None else streams[li]
            removals[u.name] = u.order[:u.width - kept(u, f)]
        taps = {n: tap_levels[picks[bi][1]] for bi, b in enumerate(blocks) for n in b.dw}
        return removals, taps

    budget_eff, tries = budget_s, []
    for _ in range(config.rounds):
        sol = solve(budget_eff)
        if sol is None:
            break
        loss, li, picks = sol
        removals, taps = config_of(li, picks)
        work = prune_copy(model, inputs, removals, taps, group_size)
        measured = frame.times(work, [], whole=True, factor=2.0, gap_s=0.002)["<model>"]
        predicted = rest[li] + sum(lat(k, li, t, bi) for bi, (k, t) in enumerate(picks))
        tries.append((loss, li, picks, measured, predicted, work))
        if abs(measured / budget_s - 1) <= config.tolerance:
            break
        budget_eff = _corrected_budget(whole[0], budget_s, predicted, measured, budget_eff)
    if not tries:
        fastest = min(cell_whole[(len(hidden) - 1, li, len(tap_levels) - 1)] for li in rest)
        raise ValueError(f"latency_budget={budget:g} is below what the search reaches on {target.name}: its "
                         f"fastest configuration (every unit at its last level) takes {fastest / dense:.0%} of the "
                         "dense latency")
    # prefer tries that land near the budget (not far under it: that is accuracy given away), then least loss
    band = [t for t in tries if budget_s * (1 - 2 * config.tolerance) <= t[3] <= budget_s * (1 + config.tolerance)]
    within = band or [t for t in tries if t[3] <= budget_s * (1 + config.tolerance)]
    loss, li, picks, measured, predicted, work = min(within, key=lambda t: t[0]) if within else \
        min(tries, key=lambda t: t[3])
    removals, taps = config_of(li, picks)
    if measured > budget_s * (1 + config.tolerance):
        warnings.warn(f"latency_budget={budget:g}: the closest configuration found measured {measured / dense:.1%} "
                      f"of the dense latency on {target.name} after {len(tries)} round(s) (its table predicted "
                      f"{predicted / dense:.1%}); summary().latency has the per-block figures", stacklevel=4)
    got = frame.times(work, blocks, whole=False)
    block_meas = [got[b.name] for b in blocks]
    rows = []
    for bi, b in enumerate(blocks):
        mine = [units[j] for j in by_block.get(bi, [])]
        hid = (mine[0].width, kept(mine[0], hidden[picks[bi][0]])) if mine else None
        outs = [u for u in shared if u.name.startswith(b.name + ".")]
        st = (outs[0].width, kept(outs[0], streams[li])) if outs else None
        rows.append(BlockLatency(b.name, hid, st, tap_levels[picks[bi][1]], table[(0, 0, 0)][bi],
                                 table[(picks[bi][0], li, picks[bi][1])][bi], block_meas[bi]))
    alternatives = []
    rng = random.Random(0)
    for _ in range(3 * config.alternatives):
        if len(alternatives) == config.alternatives:
            break
        ali = rng.randrange(len(streams))
        opts = [options(bi, ali) for bi in range(len(blocks))]
        at = [0] * len(blocks)  # option index per block; options go from least to most pruned
        steps = [bi for bi in range(len(blocks)) for _ in range(len(opts[bi]) - 1)]
        rng.shuffle(steps)
        # the effective budget the chosen configuration was solved for, so both carry the same table error
        while rest[ali] + total(opts, at)[0] > budget_eff and steps:
            bi = steps.pop()
            at[bi] += 1
        alat, aloss = total(opts, at)
        if rest[ali] + alat > budget_eff:
            continue
        arem, ataps = config_of(ali, [opts[bi][c].value for bi, c in enumerate(at)])
        aloss += sum(sens[index[id(u)]][ali] for u in shared)
        alternatives.append(Alternative([(n, i) for n, i in arem.items() if i], ataps, aloss, rest[ali] + alat))
    report = LatencyReport(target=target.name, modelled=target.modelled, budget=budget, dense_s=dense,
                           predicted_s=predicted, measured_s=measured, blocks=rows, stream_ratio=streams[li],
                           taps_reason=target.taps_reason if tap_ratio > 0 else "", proxy=PROXY, proxy_loss=loss,
                           rounds=len(tries), alternatives=alternatives)
    plan = [(name, idxs) for name, idxs in removals.items() if idxs]
    return SearchResult(plan, taps, report, loss)
