"""What DEPruner does when torch-pruning cannot handle a model: a clear error, in seconds, never a stall.

torch-pruning 1.6.1 fails on some real models while it builds its dependency graph (a ``ZeroDivisionError``
in the reshape index mapping of channel-shuffle models such as torchvision ``shufflenet_v2_x0_5``), and its
group search does not end in useful time on others: when a residual is added into a slice of the channels
(timm ``rexnet_100``, ``rexnetr_*``: ``cat([x[:, :C] + shortcut, x[:, C:]])``), every block multiplies the
(dependency, indices) pairs still to visit, and one group takes minutes to hours.

- :func:`bounded_groups` caps the work of each group search (:data:`GROUP_STEP_LIMIT` dependency items;
  the largest group of the timm/torchvision DSConv zoo has ~700, ``convnext_base``'s residual stream);
- :class:`TorchPruningFailure` (a ``ValueError``) names the model part and says that
  ``pw_pruning_ratio=0`` prunes DW taps only, which needs no dependency graph at all.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn
from torch_pruning.dependency import graph as _graph

GROUP_STEP_LIMIT = 5000
"""Most dependency items one group search may add before it is called a stall."""

DW_ONLY_HINT = "pw_pruning_ratio=0 prunes DW taps only and needs no torch-pruning dependency graph"


class TorchPruningFailure(ValueError):
    """torch-pruning cannot build or search this model's dependency graph (PW channel pruning impossible)."""


class GroupSearchTooLong(RuntimeError):
    """A group search passed its item limit (raised inside torch-pruning, caught by DEPruner).
    ``module`` is set to the group's root when known."""

    module: nn.Module | None = None


_LIMIT = [GROUP_STEP_LIMIT]


class _BoundedGroup(_graph.Group):
    def add_dep(self, dep, idxs):
        self._added = getattr(self, "_added", 0) + 1
        if self._added > _LIMIT[0]:
            raise GroupSearchTooLong(f"more than {_LIMIT[0]} dependency items")
        return super().add_dep(dep, idxs)


@contextlib.contextmanager
def bounded_groups(limit: int = GROUP_STEP_LIMIT) -> Iterator[None]:
    """Within the block, a torch-pruning group search that adds more than ``limit`` items raises
    :class:`GroupSearchTooLong`. torch-pruning has no such cap of its own, so its ``Group`` class is
    swapped for a counting subclass in its graph module while the block runs (then restored)."""
    saved, saved_limit = _graph.Group, _LIMIT[0]
    _graph.Group, _LIMIT[0] = _BoundedGroup, limit
    try:
        yield
    finally:
        _graph.Group, _LIMIT[0] = saved, saved_limit


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
