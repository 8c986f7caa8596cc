"""Launch plans: everything a kernel launch needs that depends only on the call's signature (shapes, dtype,
layout, weight format), computed once per (layer, signature) so that a call costs one launch.

A :class:`KernelPlan` is also what the static performance report (``deprune kernels``) reads: the
``#define`` set the source is compiled with, and the bytes the launch moves, so the report can model a
kernel's time against the device's copy bandwidth without running it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["KernelPlan"]


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
