"""When two outputs count as the same: the one dtype-aware tolerance every self-check uses.

A fast path is compared with the model or layer it replaces (``accelerate``'s safety net, the kernel
dispatcher's first-use check, exported files). Tolerances follow the storage dtype's precision, scaled by
the reference's magnitude so that large activations do not fail on rounding alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Agreement", "RTOL", "agreement"]

#: relative tolerance per storage dtype (about 8 ulps of fp16/bf16; fp32 allows reassociation and TF32-free
#: FMA contraction differences across kernels, BN folding in float64 and channels_last reordering).
RTOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float64: 1e-7, torch.float16: 1e-2,
                                  torch.bfloat16: 4e-2}


@dataclass(frozen=True)
class Agreement:
    """Outcome of :func:`agreement`: ``ok``, the largest absolute difference ``max_err``, the reference's
    largest magnitude ``scale``, and ``reason`` (empty when ``ok``)."""

    ok: bool
    max_err: float
    scale: float
    reason: str = ""


def agreement(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
              slack: float = 0.0) -> Agreement:
    """Compare ``got`` with ``ref``: shapes equal, the same non-finite positions, and every finite element
    within ``rtol * |ref| + rtol * max|ref| + slack`` where ``rtol = RTOL[dtype or ref.dtype]``.

    The second term keeps elements near zero (where a relative test is meaningless) to the rounding that the
    layer's scale implies. ``slack`` (an absolute error, >= 0) widens the bound where the reference itself is
    known to be that far from exact (see :mod:`deprune_plugin.accel.selfcheck`).
    """
    if not slack >= 0.0:  # also rejects NaN
        raise ValueError(f"slack must be a number >= 0, got {slack!r}")
    if not isinstance(got, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return Agreement(False, float("inf"), 0.0, f"not tensors: {type(got).__name__} vs {type(ref).__name__}")
    if got.shape != ref.shape:
        return Agreement(False, float("inf"), 0.0, f"shape {tuple(got.shape)} != {tuple(ref.shape)}")
    rtol = RTOL.get(dtype or ref.dtype, 1e-2)
    g, r = got.detach().double(), ref.detach().double()
    fin_g, fin_r = torch.isfinite(g), torch.isfinite(r)
    if not torch.equal(fin_g, fin_r):
        return Agreement(False, float("inf"), 0.0, "non-finite values differ")
    if fin_r.any():
        scale = float(r[fin_r].abs().max())
        err = (g - r).abs()[fin_r]
        max_err = float(err.max())
        bound = rtol * (r.abs()[fin_r] + scale) + slack
        if bool((err > bound).any()):
            extra = f", slack {slack:.3g}" if slack else ""
            return Agreement(False, max_err, scale, f"max abs err {max_err:.3g} at output scale {scale:.3g} "
                                                    f"(rtol {rtol:g} for {dtype or ref.dtype}{extra})")
        return Agreement(True, max_err, scale)
    same = torch.equal(torch.nan_to_num(g), torch.nan_to_num(r))
    return Agreement(same, 0.0 if same else float("inf"), 0.0, "" if same else "non-finite values differ")
