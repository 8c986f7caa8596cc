"""What DEPruner does when torch-pruning cannot handle a model: a clear error, in seconds, never a stall.

torch-pruning 1.6.1 fails on some real models while it builds its dependency graph (a ``ZeroDivisionError``
in the reshape index mapping of channel-shuffle models such as torchvision ``shufflenet_v2_x0_5``), and its
group search does not end in useful time or memory on others:

- when a residual is added into a slice of the channels (timm ``rexnet_100``, ``rexnetr_*``:
  ``cat([x[:, :C] + shortcut, x[:, C:]])``), every block multiplies the (dependency, indices) pairs still
  to visit, and one group takes minutes to hours;
- when a reshape spreads channels over tokens (attention in timm ``efficientformerv2_s0``: a 256-channel
  key conv viewed as ``[heads, key_dim, tokens]``), each index is expanded into one per token, and a
  reshape back expands it again: a handful of items hold millions of indices (Python objects of ~100
  bytes each), and the search grew to 24 GB before the kernel ended it.

- :func:`bounded_groups` bounds each group search three ways: by dependency items
  (:data:`GROUP_STEP_LIMIT`), by the channel indices its items hold (:data:`GROUP_INDEX_LIMIT`, a
  deterministic stand-in for memory, checked before a reshape expands them) and by wall time
  (:data:`GROUP_SECONDS_LIMIT`);
- :class:`TorchPruningFailure` (a ``ValueError``) names the model part and says that
  ``pw_pruning_ratio=0`` prunes DW taps only, which needs no dependency graph at all.

The limits are module constants, read when :func:`bounded_groups` is entered.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch.nn as nn
from torch_pruning.dependency import graph as _graph
from torch_pruning.dependency import index_mapping as _index_mapping

GROUP_STEP_LIMIT = 5000
"""Most dependency items one group search may add before it is called a stall (the largest group of the
timm/torchvision DSConv zoo adds ~360, ``convnext_base``'s residual stream)."""

GROUP_INDEX_LIMIT = 4_000_000
"""Most channel indices one group search may hold, summed over its items (torch-pruning keeps each as a
Python object of ~100 bytes, so this keeps a search under about half a GB). The zoo's largest group holds
~180 000 (``convnext_base``); ``efficientformerv2_s0`` passes 4 million within a second."""

GROUP_SECONDS_LIMIT = 10.0
"""Most wall-clock seconds one group search may take (the zoo's slowest takes ~0.4 s on 2 CPU cores)."""

DW_ONLY_HINT = "pw_pruning_ratio=0 prunes DW taps only and needs no torch-pruning dependency graph"


class TorchPruningFailure(ValueError):
    """torch-pruning cannot build or search this model's dependency graph (PW channel pruning impossible)."""


class GroupSearchTooLong(RuntimeError):
    """A group search passed one of its bounds (raised inside torch-pruning, caught by DEPruner).

    ``str(e)`` says which bound (e.g. ``"passed 5000 items"``), ``why`` what usually causes it, and
    ``module`` is set to the group's root when known."""

    module: nn.Module | None = None

    def __init__(self, bound: str, why: str) -> None:
        super().__init__(bound)
        self.why = why


_BOUNDS = {"items": GROUP_STEP_LIMIT, "indices": GROUP_INDEX_LIMIT, "seconds": GROUP_SECONDS_LIMIT}
_ACTIVE: list = [None]  # the group whose search is running (index mappings run on its behalf)
_FLATTEN_CALL = _index_mapping._FlattenIndexMapping.__call__


class _BoundedGroup(_graph.Group):
    """torch-pruning's ``Group`` that counts what its search adds and stops it past a bound."""

    def __init__(self) -> None:
        super().__init__()
        self._added = 0
        self._volume = 0
        self._deadline = time.monotonic() + _BOUNDS["seconds"]
        _ACTIVE[0] = self  # get_pruning_group creates the group it searches first, the merged copy after

    def check(self, more_indices: int = 0) -> None:
        """Raise :class:`GroupSearchTooLong` if the search passed a bound, or would with ``more_indices``."""
        if self._added > _BOUNDS["items"]:
            raise GroupSearchTooLong(f"passed {_BOUNDS['items']} items",
                                     "a residual added into a slice of the channels does this")
        if self._volume + more_indices > _BOUNDS["indices"]:
            raise GroupSearchTooLong(f"passed {_BOUNDS['indices']} channel indices (a memory bound)",
                                     "a reshape that spreads channels over tokens, as attention does, "
                                     "multiplies them")
        if time.monotonic() > self._deadline:
            raise GroupSearchTooLong(f"passed {_BOUNDS['seconds']:g} s (a wall-time bound)",
                                     "torch-pruning's search of this graph does not end in useful time")

    def add_dep(self, dep, idxs):
        self._added += 1
        self._volume += len(idxs)
        self.check()
        return super().add_dep(dep, idxs)

    def has_pruning_op(self, dep, idxs):
        self.check()  # runs once per visited edge: the search loops here when items repeat
        return super().has_pruning_op(dep, idxs)

    def add_and_merge(self, dep, idxs):
        self.check()
        return super().add_and_merge(dep, idxs)


def _bounded_flatten_call(self, idxs):
    group = _ACTIVE[0]
    if group is not None and not self.reverse:
        group.check(len(idxs) * self._stride)  # before the expansion allocates its indices
    return _FLATTEN_CALL(self, idxs)


@contextlib.contextmanager
def bounded_groups(items: int | None = None, indices: int | None = None,
                   seconds: float | None = None) -> Iterator[None]:
    """Within the block, a torch-pruning group search that adds more than ``items`` dependency items,
    holds more than ``indices`` channel indices or runs longer than ``seconds`` raises
    :class:`GroupSearchTooLong` (defaults: :data:`GROUP_STEP_LIMIT`, :data:`GROUP_INDEX_LIMIT`,
    :data:`GROUP_SECONDS_LIMIT`, read on entry). torch-pruning has no such bounds of its own, so its
    ``Group`` class and its reshape index mapping are swapped for bounded ones in its modules while the
    block runs (then restored)."""
    saved_group, saved_bounds = _graph.Group, dict(_BOUNDS)
    _BOUNDS.update(items=GROUP_STEP_LIMIT if items is None else items,
                   indices=GROUP_INDEX_LIMIT if indices is None else indices,
                   seconds=GROUP_SECONDS_LIMIT if seconds is None else seconds)
    _graph.Group = _BoundedGroup
    _index_mapping._FlattenIndexMapping.__call__ = _bounded_flatten_call
    try:
        yield
    finally:
        _graph.Group = saved_group
        _index_mapping._FlattenIndexMapping.__call__ = _FLATTEN_CALL
        _BOUNDS.clear()
        _BOUNDS.update(saved_bounds)
        _ACTIVE[0] = None


def search_failure(e: GroupSearchTooLong, model: nn.Module) -> TorchPruningFailure:
    """The :class:`TorchPruningFailure` for a group search stopped by :func:`bounded_groups`."""
    part = {m: n for n, m in model.named_modules()}.get(e.module, "?")
    return TorchPruningFailure(
        f"torch-pruning 1.6.1 cannot search the channel group of {part!r} in {type(model).__name__}: its "
        f"dependency search {e} without ending ({e.why}); {DW_ONLY_HINT}")


def node_part(node, names: dict[nn.Module, str], depth: int = 8) -> str:
    """A readable model part for a torch-pruning graph node: its module name, or the op type plus the
    nearest named modules before and after it (ops such as reshape have no module of their own)."""
    module = getattr(node, "module", None)
    if isinstance(module, nn.Module) and module in names:
        return repr(names[module])

    def nearest(attr: str) -> str | None:
        seen, frontier = set(), [node]
        for _ in range(depth):
            nxt = []
            for n in frontier:
                for m in getattr(n, attr, []):
                    if id(m) in seen:
                        continue
                    seen.add(id(m))
                    mod = getattr(m, "module", None)
                    if isinstance(mod, nn.Module) and mod in names:
                        return names[mod]
                    nxt.append(m)
            frontier = nxt
        return None

    kind = getattr(getattr(node, "type", None), "name", "unknown").lower()  # OPTYPE member, e.g. RESHAPE
    before, after = nearest("inputs"), nearest("outputs")
    where = " and ".join(x for x in (f"after {before!r}" if before else "", f"before {after!r}" if after else "") if x)
    return f"a {kind} op {where}".strip()


def failure_from(exc: BaseException, model: nn.Module, what: str) -> TorchPruningFailure:
    """A :class:`TorchPruningFailure` for an exception raised inside torch-pruning while doing ``what``;
    names the model part when a traceback frame holds the graph node torch-pruning was working on."""
    names = {m: n or "<model>" for n, m in model.named_modules()}
    part = None
    tb = exc.__traceback__
    while tb is not None:  # innermost frame with a graph node wins
        node = tb.tb_frame.f_locals.get("node")
        if node is not None and hasattr(node, "inputs"):
            part = node_part(node, names)
        tb = tb.tb_next
    where = f" at {part}" if part else ""
    return TorchPruningFailure(f"torch-pruning 1.6.1 failed {what} of {type(model).__name__}{where}: "
                               f"{type(exc).__name__}: {exc}; {DW_ONLY_HINT}")
