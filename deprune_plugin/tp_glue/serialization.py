"""Saving and loading pruned models.

Two formats in one file (``torch.save`` of a dict):

- **rebuildable** (``arch`` given): architecture name, torch-pruning's pruning history and the state
  dict (tap masks included). :func:`load` rebuilds the model, replays the history on a fresh dependency
  graph, installs the masks and loads the weights; it loads with ``weights_only=True``.
- **pickled** (no ``arch``): the whole module. Needs ``weights_only=False``, so only load files you trust.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from ..core.masks import install_mask_hooks_from_state
from ..core.zoo import build_model
from .adapters import run_fixups

FORMAT = "deprune-v1"


def save(model: nn.Module, path: str | os.PathLike, *, history: Sequence | None = None,
         arch: dict[str, Any] | None = None, input_shape: Sequence[int] | None = None,
         extra: dict[str, Any] | None = None) -> None:
    """Save a (pruned) model.

    Args:
        model: the model.
        path: output file.
        history: ``pruner.pruning_history()`` (needed with ``arch``).
        arch: ``{"source": "timm"|"torchvision", "name": str, "kwargs": {...}}`` to rebuild the model.
        input_shape: shape of an input for tracing during the replay, e.g. ``(1, 3, 224, 224)``.
        extra: plain data stored beside (metrics, arguments).
    """
    payload: dict[str, Any] = {"format": FORMAT, "extra": extra or {}}
    if arch is not None:
        if history is None or input_shape is None:
            raise ValueError("save(arch=...) also needs history= and input_shape=")
        payload.update(arch=dict(arch), history=[list(h) for h in history],
                       input_shape=list(input_shape), state_dict=model.state_dict())
    else:
        payload["model"] = model
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written file under the real name


def _plain_history(history: list) -> list:
    return [[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in history]


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by :func:`save` (rebuilding and replaying it if it was saved with ``arch``).

    Raises:
        FileNotFoundError: no such file. ValueError: not a deprune_plugin file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled module: retry trusting the file
        payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a deprune_plugin model file")
    if "model" in payload:
        return payload["model"]
    arch = payload["arch"]
    model = build_model(arch["source"], arch["name"], **arch.get("kwargs", {}))
    model.eval()
    with torch.enable_grad():  # torch-pruning traces with autograd; load() may be called under no_grad
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=(torch.zeros(*payload["input_shape"]),))
        DG.load_pruning_history(_plain_history(payload["history"]))
    run_fixups(model)
    install_mask_hooks_from_state(model, payload["state_dict"])
    model.load_state_dict(payload["state_dict"])
    return model


def load_extra(path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` dict of a saved file (weights-only load)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return payload.get("extra", {})
