"""Latency targets: where a pruned model will run, and how long a module takes there.

Torch only. A target is registered by name (``@register_target("openvino")``) where it is implemented
(:mod:`deprune_plugin.accel.targets` registers the CPU runtimes and CUDA); the pruner looks targets up by
name through :func:`get_target`, so the glue never imports the runtimes.

A target answers ``seconds(module, inputs)``: the latency of ``module(*inputs)`` on it, measured on the real
runtime (``modelled = False``) or from a stated model (``modelled = True``). It also says what channel
multiple it runs fast (``alignment``) and, when pruned DW taps cannot make it faster, why
(``taps_reason``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = ["LatencyTarget", "runner_of", "register_target", "get_target", "target_names", "BlockLatency",
           "Alternative", "LatencyReport"]


@runtime_checkable
class LatencyTarget(Protocol):
    """What the latency-aware pruner needs from a deployment target."""

    name: str
    modelled: bool       # True: seconds come from a model of the device, not a measurement
    alignment: int       # channel counts that are a multiple of this run at full speed
    taps_reason: str     # "" when pruned DW taps can save time on this target, else why they cannot

    def seconds(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        """Latency of ``module(*inputs)`` (eval mode) on the target, in seconds."""
        ...


def runner_of(target: LatencyTarget) -> Callable[[nn.Module, tuple], Callable[[], object]] | None:
    """The target's ``runner(module, inputs)`` (a zero-argument call for interleaved timing), or ``None``
    for modelled targets and targets without one."""
    fn = getattr(target, "runner", None)
    return None if target.modelled or not callable(fn) else fn


_TARGETS: dict[str, Callable[..., LatencyTarget]] = {}


def register_target(name: str) -> Callable[[Callable[..., LatencyTarget]], Callable[..., LatencyTarget]]:
    """Class / factory decorator: ``get_target(name, **kwargs)`` builds it."""
    def deco(factory: Callable[..., LatencyTarget]) -> Callable[..., LatencyTarget]:
        _TARGETS[name] = factory
        return factory
    return deco


def target_names() -> list[str]:
    """Registered target names (the CPU runtimes and CUDA once :mod:`deprune_plugin` is imported)."""
    return sorted(_TARGETS)


def get_target(target: str | LatencyTarget, **kwargs: object) -> LatencyTarget:
    """The target named ``target`` (built with ``kwargs``), or ``target`` itself when it is already one."""
    if not isinstance(target, str):
        if isinstance(target, LatencyTarget):
            return target
        raise TypeError(f"target must be a target name {target_names()} or a LatencyTarget, "
                        f"got {type(target).__name__}")
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {target_names()}, got {target!r}")
    return _TARGETS[target](**kwargs)


@dataclass(frozen=True)
class BlockLatency:
    """One block of a latency-aware prune: the widths chosen and its latency before and after.

    ``hidden`` / ``stream_out``: ``(before, after)`` channel counts of the expanded channels and of the
    block's output stream (``None`` where the block has no such prunable width); ``tap_ratio`` the DW tap
    ratio chosen; seconds are on the report's target (``predicted_s`` from the latency table,
    ``measured_s`` timed on the pruned model; ``None`` when not timed)."""

    name: str
    hidden: tuple[int, int] | None
    stream_out: tuple[int, int] | None
    tap_ratio: float
    dense_s: float
    predicted_s: float
    measured_s: float | None = None


@dataclass
class Alternative:
    """Another configuration on the same latency table at the same budget (for checking the proxy): what to
    remove (``(unit root name, channels)``), DW tap ratios, its proxy loss and its predicted seconds."""

    plan: list[tuple[str, list[int]]]
    taps: dict[str, float]
    proxy_loss: float
    predicted_s: float


@dataclass
class LatencyReport:
    """What a latency-aware prune chose and what it measured (``Summary.latency``).

    Seconds are whole-model latencies at the example input's shape on ``target``; ``modelled`` says they
    come from a device model, not a measurement. ``budget`` is the fraction of ``dense_s`` asked for.
    ``model_error`` is ``predicted_s / measured_s - 1`` of the latency table on the pruned model;
    ``proxy_loss`` the summed sensitivity of the chosen configuration (lower: closer to the unpruned model)."""

    target: str
    modelled: bool
    budget: float
    dense_s: float
    predicted_s: float
    measured_s: float | None
    blocks: list[BlockLatency] = field(default_factory=list)
    stream_ratio: float = 0.0
    taps_reason: str = ""
    proxy: str = ""
    proxy_loss: float = 0.0
    rounds: int = 1
    alternatives: list[Alternative] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        return None if not self.measured_s else self.dense_s / self.measured_s

    @property
    def model_error(self) -> float | None:
        return None if not self.measured_s else self.predicted_s / self.measured_s - 1

    def lines(self) -> list[str]:
        """The report as table lines (``Summary.table`` appends them)."""
        kind = "modelled" if self.modelled else "measured"
        head = (f"{'block':<30} {'expanded':>13} {'stream out':>12} {'taps':>6} {'dense ms':>9} {'pred ms':>8} "
                f"{'meas ms':>8}")
        out = [f"latency-aware prune for {self.target} ({kind}), budget {self.budget:.0%} of dense", head,
               "-" * len(head)]

        def w(p: tuple[int, int] | None) -> str:
            return "-" if p is None else f"{p[0]}->{p[1]}"
        for b in self.blocks:
            meas = "-" if b.measured_s is None else f"{b.measured_s * 1e3:.3f}"
            out.append(f"{b.name[-30:]:<30} {w(b.hidden):>13} {w(b.stream_out):>12} {b.tap_ratio:>6.0%} "
                       f"{b.dense_s * 1e3:>9.3f} {b.predicted_s * 1e3:>8.3f} {meas:>8}")
        out.append("-" * len(head))
        total = f"whole model: dense {self.dense_s * 1e3:.3f} ms, predicted {self.predicted_s * 1e3:.3f} ms"
        if self.measured_s:
            total += (f", {kind} {self.measured_s * 1e3:.3f} ms ({self.measured_s / self.dense_s:.1%} of dense, "
                      f"speed-up {self.speedup:.2f}x; latency model error {self.model_error:+.1%})")
        out.append(total)
        if self.stream_ratio:
            out.append(f"residual streams pruned by {self.stream_ratio:.0%}")
        if self.taps_reason:
            out.append(f"DW taps not pruned: {self.taps_reason}")
        if self.proxy:
            out.append(f"importance proxy: {self.proxy}")
        return out
