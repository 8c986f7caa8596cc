"""Tap masks that are part of the model.

A pruned depth-wise conv stays a plain ``nn.Conv2d`` (same class, same names, same state-dict keys for
its weight) with three additions:

- a bool buffer ``dw_tap_mask`` shaped like the weight (``True`` = kept tap), so masks travel with
  ``state_dict``, ``torch.save``, ``copy.deepcopy``, ``.to(device/dtype)`` and DDP buffer broadcast;
- a forward pre-hook that re-zeros pruned taps (a dense weight loaded over a pruned one cannot revive
  them) and, when autograd is on, hooks the weight's gradient once so pruned taps get zero gradient:
  with zero weight and zero gradient, SGD (momentum, weight decay) and Adam/AdamW keep them exactly 0;
- a state-dict pre-hook that keeps the mask consistent before saving.

``torch.nn.utils.prune`` and ``parametrize`` break under torch-pruning (see docs), hence this design.
When a torch-pruning pass that does not know about masks removes channels, the mask no longer matches
the weight; it is then re-derived from the zero pattern, which is exact because pruned taps are exactly 0.
DEPruner itself slices masks with the removed indices.
"""
from __future__ import annotations

import weakref
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.nn as nn

MASK_BUFFER = "dw_tap_mask"

# Parameters whose gradient is already masked, by id with a weak reference to tell a reused id apart:
# replaced parameters (after channel pruning, deepcopy or loading) are hooked again on their next forward.
# (A WeakSet would compare tensors with ==.)
_GRAD_HOOKED: dict[int, "weakref.ref[torch.Tensor]"] = {}


def _grad_hooked(w: torch.Tensor) -> bool:
    ref = _GRAD_HOOKED.get(id(w))
    return ref is not None and ref() is w


def is_depthwise(module: nn.Module) -> bool:
    """True for a depth-wise conv: ``groups == in_channels == out_channels`` and a kernel larger than 1x1."""
    return (isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels
            and module.groups > 1 and module.kernel_size[0] * module.kernel_size[1] > 1)


def tap_mask(conv: nn.Module) -> torch.Tensor | None:
    """The conv's keep mask ``[C, 1, kh, kw]`` (bool), or ``None`` if it has none."""
    return getattr(conv, MASK_BUFFER, None)


def _mask_grad(module_ref: "weakref.ref[nn.Module]", grad: torch.Tensor) -> torch.Tensor:
    module = module_ref()
    mask = None if module is None else tap_mask(module)
    if mask is None or mask.shape != grad.shape:
        return grad
    return grad.masked_fill(~mask, 0)  # not grad * mask: NaN * 0 would leak NaN into pruned taps


def sync_tap_mask(conv: nn.Module) -> None:
    """Make the mask match the weight again after a mask-unaware channel removal."""
    mask = tap_mask(conv)
    if mask is None or mask.shape == conv.weight.shape:
        return
    if mask.shape[1:] != conv.weight.shape[1:]:
        raise RuntimeError(f"tap mask {tuple(mask.shape)} cannot follow weight {tuple(conv.weight.shape)}")
    # Pruned taps are exactly zero, so the zero pattern of the surviving channels is their mask.
    setattr(conv, MASK_BUFFER, conv.weight.detach() != 0)


@torch.no_grad()
def apply_tap_mask_(conv: nn.Module) -> None:
    """Zero the pruned taps of ``conv`` in place."""
    sync_tap_mask(conv)
    mask = tap_mask(conv)
    if mask is not None:
        conv.weight.masked_fill_(~mask, 0)


def _pre_forward(module: nn.Module, args: tuple) -> None:
    apply_tap_mask_(module)
    w = module.weight
    if torch.is_grad_enabled() and w.requires_grad and not _grad_hooked(w):
        w.register_hook(partial(_mask_grad, weakref.ref(module)))
        key = id(w)
        _GRAD_HOOKED[key] = weakref.ref(w, lambda _r, key=key: _GRAD_HOOKED.pop(key, None))


def _pre_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    apply_tap_mask_(module)


def attach_tap_mask(conv: nn.Conv2d, keep: torch.Tensor) -> None:
    """Install (or replace) the keep mask of a DW conv and zero its pruned taps.

    Args:
        conv: a depth-wise ``nn.Conv2d``.
        keep: bool tensor shaped like ``conv.weight``; ``True`` = kept.
    """
    if keep.shape != conv.weight.shape:
        raise ValueError(f"keep mask shape {tuple(keep.shape)} != weight shape {tuple(conv.weight.shape)}")
    keep = keep.to(device=conv.weight.device, dtype=torch.bool)
    if tap_mask(conv) is None:
        conv.register_buffer(MASK_BUFFER, keep)
    else:
        setattr(conv, MASK_BUFFER, keep)
    if _pre_forward not in conv._forward_pre_hooks.values():
        conv.register_forward_pre_hook(_pre_forward)
        conv.register_state_dict_pre_hook(_pre_state_dict)
    apply_tap_mask_(conv)


def slice_tap_mask(conv: nn.Module, removed: Sequence[int]) -> None:
    """Drop the mask rows of removed channels (called right after the weight lost them)."""
    mask = tap_mask(conv)
    if mask is None or mask.shape[0] == conv.weight.shape[0]:
        return
    drop = set(int(i) for i in removed)
    kept_rows = [i for i in range(mask.shape[0]) if i not in drop]
    if len(kept_rows) != conv.weight.shape[0]:
        sync_tap_mask(conv)  # indices do not describe this change: fall back to the zero pattern
        return
    setattr(conv, MASK_BUFFER, mask[kept_rows])


def masked_convs(model: nn.Module) -> Iterator[tuple[str, nn.Conv2d]]:
    """``(name, conv)`` of every conv carrying a tap mask."""
    for name, m in model.named_modules():
        if tap_mask(m) is not None:
            yield name, m


def remove_tap_masks(model: nn.Module) -> int:
    """Make pruning permanent: zero pruned taps, drop masks and hooks. Returns how many convs changed."""
    count = 0
    for _, m in list(masked_convs(model)):
        apply_tap_mask_(m)
        for hooks, fn in ((m._forward_pre_hooks, _pre_forward), (m._state_dict_pre_hooks, _pre_state_dict)):
            for k in [k for k, v in hooks.items() if v is fn]:
                del hooks[k]
        del m._buffers[MASK_BUFFER]
        count += 1
    return count


def install_mask_hooks_from_state(model: nn.Module, state_dict: dict) -> int:
    """Create mask buffers for every ``<name>.dw_tap_mask`` key of ``state_dict`` so it loads strictly."""
    modules = dict(model.named_modules())
    count = 0
    for key, value in state_dict.items():
        if key.endswith("." + MASK_BUFFER):
            conv = modules.get(key[: -len(MASK_BUFFER) - 1])
            if conv is None or not isinstance(conv, nn.Conv2d):
                raise KeyError(f"state_dict key {key!r} names no conv of the model")
            if conv.weight.shape != value.shape:
                raise ValueError(f"{key}: mask {tuple(value.shape)} does not fit weight {tuple(conv.weight.shape)}")
            attach_tap_mask(conv, value.bool())
            count += 1
    return count
