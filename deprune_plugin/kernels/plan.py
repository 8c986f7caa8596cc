"""Launch plans: everything a kernel launch needs that depends only on the call's signature (shapes, dtype,
layout, weight format), computed once per (layer, signature) so that a call costs one launch.

A :class:`KernelPlan` is also what the static performance report (``deprune kernels``) reads: the
``#define`` set the source is compiled with, and the bytes the launch moves, so the report can model a
kernel's time against the device's copy bandwidth without running it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

__all__ = ["DEFAULT_SMS", "GPU_SMS", "KernelPlan", "fill_target", "filling"]

#: Streaming multiprocessors per architecture (datasheets: A100 sm_80 108, H100 / H200 sm_90 132). A plan
#: sized for one CTA per SM at least keeps every SM of the GPU busy.
GPU_SMS: dict[str, int] = {"sm_80": 108, "sm_90": 132}
#: the SM count a planner fills when the caller does not name the GPU: the largest target's
DEFAULT_SMS = max(GPU_SMS.values())


def fill_target(allowed: int, sms: int = DEFAULT_SMS) -> int:
    """CTAs a launch must have: one per SM (``sms``), or, where the problem cannot be split that finely, all
    ``allowed`` (the most CTAs any plan the kernel supports launches for this call)."""
    return min(int(sms), int(allowed))


def filling(candidates: Sequence[tuple], ctas: Callable[[tuple], int], sms: int = DEFAULT_SMS
            ) -> tuple[list[tuple], int]:
    """``(the candidates that launch at least fill_target(allowed, sms) CTAs, allowed)``, ``allowed`` the most
    CTAs over all ``candidates`` (the planner's whole parameter space for the call)."""
    allowed = max(ctas(c) for c in candidates)
    need = fill_target(allowed, sms)
    return [c for c in candidates if ctas(c) >= need], allowed


@dataclass(frozen=True)
class KernelPlan:
    """One specialised launch of one kernel for one call signature.

    Attributes:
        kernel: ``"direct"``, ``"dr"`` or ``"fused"``.
        source: the ``cuda/`` file, e.g. ``"dw_direct.cu"``.
        entry: the ``extern "C"`` entry point.
        defines: the ``#define`` set :func:`.sources.specialize` prepends (geometry is compile-time).
        grid, block: launch dimensions.
        smem_bytes: dynamic shared memory per CTA.
        staged_bytes: global input bytes all CTAs together load (input tiles with their halos).
        unique_bytes: bytes of the input tensor (each element once).
        bytes_moved: global bytes the launch reads and writes in total (staged input, weights, output).
        tensor_cores: whether the launch runs its multiply-adds on tensor cores (mma.sync).
        extra: kernel-specific planner facts (e.g. ``bytes_moved_unfused`` of a fused pair).
    """

    kernel: str
    source: str
    entry: str
    defines: Mapping[str, object]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem_bytes: int
    staged_bytes: int
    unique_bytes: int
    bytes_moved: int
    tensor_cores: bool = False
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def staged_over_unique(self) -> float:
        """Input bytes staged per unique input byte (1.0: every element loaded once; halos make it larger)."""
        return self.staged_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def ctas(self) -> int:
        """CTAs the launch runs (the grid's product)."""
        return self.grid[0] * self.grid[1] * self.grid[2]
