"""The one registry of epilogue activations: name -> kernel code, torch function and module types.

The CUDA kernels apply the activation in their epilogue by code (``deprune_activate`` in
``cuda/deprune_common.cuh``); the torch path and BN folding use the same entries, so every table that
used to list activations separately now reads this one. A test parses the ``.cuh`` switch and checks
the codes agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Activation", "ACTIVATIONS", "activation_of_module", "apply_activation"]


@dataclass(frozen=True)
class Activation:
    """One fusable activation.

    Attributes:
        name: registry key (``"relu6"``).
        code: the ``act`` argument of the kernels (``deprune_activate``'s switch).
        fn: the same function in torch, ``fn(tensor) -> tensor``.
        modules: module classes that compute it exactly (matched by exact type).
    """

    name: str
    code: int
    fn: Callable[[torch.Tensor], torch.Tensor]
    modules: tuple[type, ...] = ()


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _gelu_erf(t: torch.Tensor) -> torch.Tensor:
    return F.gelu(t)  # exact (erf) form; the tanh approximation is not fused


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("identity", 0, _identity, (nn.Identity,)),
    Activation("relu", 1, F.relu, (nn.ReLU,)),
    Activation("relu6", 2, F.relu6, (nn.ReLU6,)),
    Activation("silu", 3, F.silu, (nn.SiLU,)),
    Activation("hardswish", 4, F.hardswish, (nn.Hardswish,)),
    Activation("gelu", 5, _gelu_erf, ()),  # nn.GELU only with approximate="none": see activation_of_module
)}


def activation_of_module(m: nn.Module | None) -> str | None:
    """Registry name of what module ``m`` computes (``None`` module = identity), or ``None`` if no
    kernel epilogue computes it exactly."""
    if m is None:
        return "identity"
    if type(m) is nn.GELU:
        return "gelu" if m.approximate == "none" else None
    for act in ACTIVATIONS.values():
        if type(m) in act.modules:
            return act.name
    return None


def apply_activation(name: str, t: torch.Tensor) -> torch.Tensor:
    """``ACTIVATIONS[name].fn(t)`` with a clear error for an unknown name."""
    try:
        return ACTIVATIONS[name].fn(t)
    except KeyError:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None
