"""Saving and loading pruned models.

Two formats in one file (``torch.save`` of a dict):

- **rebuildable** (``arch`` given): architecture name, torch-pruning's pruning history and the state
  dict (tap masks included). :func:`load` rebuilds the model, replays the history on a fresh dependency
  graph (none when no channel was removed), installs the masks and loads the weights. Histories compose:
  the loaded model carries its history (:data:`HISTORY_ATTR`) and a DEPruner on it returns that history
  followed by its own, so a re-pruned model saves and loads like a once-pruned one.
- **pickled** (no ``arch``): the whole module.

Loading never runs code from a file by default: :func:`load` reads with ``torch.load(weights_only=True)``
only. A file that needs full unpickling (the pickled format, or anything crafted) is refused with an error
naming the file and the opt-in ``load(path, trusted=True)``, which is **only for files you made**:
unpickling can run arbitrary code.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from ..core.masks import install_mask_hooks_from_state
from ..core.zoo import build_model
from .adapters import run_fixups

FORMAT = "deprune-v1"

HISTORY_ATTR = "deprune_history"
"""Model attribute holding the channel-pruning history that produced its widths from the unpruned
architecture: set by :func:`load` and by ``DEPruner.step()``, a plain list so it survives
``copy.deepcopy`` and pickling. A later ``DEPruner`` on the model extends it."""


def carried_history(model: nn.Module) -> list:
    """A copy of the history ``model`` carries (``[[module_name, is_out, idxs], ...]``), ``[]`` if none."""
    history = getattr(model, HISTORY_ATTR, None)
    return _plain_history(history) if history else []


def attach_history(model: nn.Module, history: Sequence) -> None:
    """Make ``model`` carry ``history`` (the full history from the unpruned architecture)."""
    setattr(model, HISTORY_ATTR, _plain_history(history))


def save(model: nn.Module, path: str | os.PathLike, *, history: Sequence | None = None,
         arch: dict[str, Any] | None = None, input_shape: Sequence[int] | None = None,
         extra: dict[str, Any] | None = None) -> None:
    """Save a (pruned) model.

    Args:
        model: the model.
        path: output file.
        history: ``pruner.pruning_history()`` (needed with ``arch``): every channel-pruning step from the
            unpruned architecture, in order. For a model that was loaded (or pruned before) and pruned again,
            the last DEPruner's ``pruning_history()`` is that: the history the model carried, then its own.
        arch: ``{"source": "timm"|"torchvision", "name": str, "kwargs": {...}}`` to rebuild the model.
        input_shape: shape of an input for tracing during the replay, e.g. ``(1, 3, 224, 224)``.
        extra: plain data stored beside (metrics, arguments).

    Raises:
        ValueError: ``arch`` without ``history``/``input_shape``, or a ``history`` that does not begin with
            the history the model carries (see :data:`HISTORY_ATTR`): :func:`load` could not rebuild it.
    """
    payload: dict[str, Any] = {"format": FORMAT, "extra": extra or {}}
    if arch is not None:
        if history is None or input_shape is None:
            raise ValueError("save(arch=...) also needs history= and input_shape=")
        history = _plain_history(history)
        carried = carried_history(model)
        if history[: len(carried)] != carried:
            raise ValueError(
                f"save({os.fspath(path)}): history= does not begin with the {len(carried)} pruning step(s) the "
                f"model already carries (model.{HISTORY_ATTR}, from load() or an earlier DEPruner), so the file "
                "could not be rebuilt; pass the last DEPruner's pruning_history(), which includes them")
        payload.update(arch=dict(arch), history=history,
                       input_shape=list(input_shape), state_dict=model.state_dict())
    else:
        payload["model"] = model
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written file under the real name


def _plain_history(history: list) -> list:
    return [[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in history]


def _read(path: str | os.PathLike, map_location: str | torch.device, trusted: bool) -> Any:
    """``torch.load`` weights-only; with ``trusted`` a file that needs pickle is unpickled instead."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{os.fspath(path)} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised below unless the file's first bytes explain it
        from ..core.checks import torch_file_problem

        # A text or foreign file fails as an unpickling error too, which would read as "needs --trusted".
        problem = torch_file_problem(path)
        if problem is not None:
            raise ValueError(f"{os.fspath(path)} is {problem}") from None
        if not isinstance(e, pickle.UnpicklingError):
            raise
        if not trusted:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{os.fspath(path)} cannot be loaded as weights only (it needs full unpickling, which can run "
                f"code from the file: {reason}); refused. Only for files you made: load(path, trusted=True) "
                "(deprune inspect --trusted)") from None
    return torch.load(path, map_location=map_location, weights_only=False)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, trusted: bool = False,
         build: Callable[[dict[str, Any]], nn.Module] | None = None) -> nn.Module:
    """Load a model saved by :func:`save` (rebuilding and replaying it if it was saved with ``arch``).

    Args:
        path: the file.
        map_location: where tensors go.
        trusted: allow full unpickling for a file that needs it (the pickled format). **Only for files you
            made**: unpickling can run arbitrary code. Default: weights only, never unpickles.
        build: ``build(arch) -> nn.Module`` builds the unpruned model from the stored ``arch`` dict, for
            architectures outside timm/torchvision (default: :func:`deprune_plugin.core.zoo.build_model`).

    Returns:
        The model; a rebuilt one carries the replayed history as ``model.deprune_history`` (see
        :data:`HISTORY_ATTR`), so a DEPruner that prunes it further returns the full history to save.

    Raises:
        FileNotFoundError: no such file. ValueError: not a deprune_plugin file, a file that needs
        unpickling without ``trusted=True``, or a file whose pruning history does not rebuild the widths of
        its weights (the message names the file and the first mismatching parameter).
    """
    if not isinstance(trusted, bool):
        raise TypeError(f"trusted must be True or False, got {trusted!r}")
    if build is not None and not callable(build):
        raise TypeError(f"build must be a callable arch -> nn.Module, got {type(build).__name__}")
    payload = _read(path, map_location, trusted)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a deprune_plugin model file")
    if "model" in payload:
        if not isinstance(payload["model"], nn.Module):
            raise ValueError(f"{path}: its 'model' entry is not an nn.Module")
        return payload["model"]
    arch = payload["arch"]
    if build is not None:
        model = build(dict(arch))
        if not isinstance(model, nn.Module):
            raise TypeError(f"build(arch) must return an nn.Module, got {type(model).__name__}")
    else:
        model = build_model(arch["source"], arch["name"], **arch.get("kwargs", {}))
    model.eval()
    history = _plain_history(payload["history"])
    if history:  # DW taps only (no channel removed): no dependency graph needed
        with torch.enable_grad():  # torch-pruning traces with autograd; load() may be called under no_grad
            DG = tp.DependencyGraph().build_dependency(model, example_inputs=(torch.zeros(*payload["input_shape"]),))
            try:
                DG.load_pruning_history(list(history))
            except Exception as e:  # noqa: BLE001 - a bad index or module name: the file's fault, said so
                raise ValueError(f"{os.fspath(path)}: its pruning history cannot be replayed on {arch.get('name')!r} "
                                 f"({type(e).__name__}: {e})") from e
        run_fixups(model)
    state = payload["state_dict"]
    _check_widths(path, model, state, len(history))
    install_mask_hooks_from_state(model, state)
    model.load_state_dict(state)
    attach_history(model, history)
    return model


def _check_widths(path: str | os.PathLike, model: nn.Module, state: dict, steps: int) -> None:
    """Raise a ValueError naming ``path`` when the replayed model's shapes differ from the saved weights'."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{os.fspath(path)}: its pruning history ({steps} step(s)) does not match its weights: after "
                f"replaying it {key} is {tuple(own[key].shape)}, the saved weight is {tuple(value.shape)}. The "
                "file was saved with an incomplete history (e.g. only the last of several pruners'); save a "
                "re-pruned model with the last DEPruner's pruning_history(), which includes the earlier steps")


def load_extra(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, Any]:
    """The ``extra`` dict of a saved file (weights-only load unless ``trusted``, see :func:`load`)."""
    payload = _read(path, "cpu", trusted)
    extra = payload.get("extra", {}) if isinstance(payload, dict) else {}
    return extra if isinstance(extra, dict) else {}


def saved_input_shape(path: str | os.PathLike, *, trusted: bool = False) -> list[int] | None:
    """The input shape a rebuildable file was saved with (``save(..., input_shape=...)``), else ``None``."""
    payload = _read(path, "cpu", trusted)
    shape = payload.get("input_shape") if isinstance(payload, dict) else None
    return [int(v) for v in shape] if isinstance(shape, (list, tuple)) else None
