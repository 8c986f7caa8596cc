"""Tap masks that are part of the model, without writing weights during forward.

A pruned depth-wise conv stays a plain ``nn.Conv2d`` (same class, same names, same state-dict keys for
its weight) with these additions:

- a bool buffer ``dw_tap_mask`` shaped like the weight (``True`` = kept tap), so masks travel with
  ``state_dict``, ``torch.save``, ``copy.deepcopy``, ``.to(device/dtype)`` and DDP buffer broadcast;
- a **gradient hook** on the weight ``Parameter`` (``Tensor.register_hook``) that zeroes the gradient of
  pruned taps before it reaches ``.grad``. Pruned taps are exactly 0 when the mask is attached; with zero
  weight, zero gradient and zero optimizer state there, SGD (momentum, weight decay), Adam and AdamW (incl.
  decoupled decay, which multiplies 0) leave them exactly 0 (state left over from before pruning: see the
  optimizer post-hook below). DDP all-reduces the already masked gradient. A weight used twice in
  one graph (a DW conv called twice, two forwards then one backward) gets one hook call on its summed
  gradient. The hook is registered when the mask is attached;
- a forward pre-hook that **only checks** (never writes the weight): when autograd is on and the weight
  is a ``Parameter`` without the hook (the ``Parameter`` object was replaced: torch-pruning channel removal,
  ``copy.deepcopy``, ``torch.load`` of a whole module, ``load_state_dict(assign=True)``) it registers the
  hook again; when the mask no longer matches the weight's shape it re-derives the mask (see below). Under
  ``torch.no_grad()`` / ``inference_mode`` it returns after one call, so inference runs the plain conv on
  the stored (already zero) weights;
- a ``load_state_dict`` post-hook that zeroes pruned taps after every load (dense weights loaded over a
  pruned model cannot revive taps) and re-hooks a replaced ``Parameter``;
- a ``state_dict`` pre-hook that zeroes pruned taps that are not zero (only then: an unneeded in-place
  write would bump the weight's version between a forward and its backward), so saved files and
  ``timm`` EMA copies (``ModelEmaV2``/``V3`` read ``state_dict``) always hold exact zeros;
- one **global optimizer step post-hook** (``torch.optim.optimizer.register_optimizer_step_post_hook``,
  installed once, when the first mask is attached) for an optimizer created *before* pruning: its momentum
  buffer / Adam moments are non-zero at taps that were pruned later, so with a zero gradient its next
  ``step()`` still moves them. After every ``step()`` of any ``torch.optim.Optimizer`` the hook looks each
  stepped parameter up in a weak registry (parameter -> its masked conv, filled where the gradient hook is
  registered; one dict lookup per parameter, nothing else for unmasked ones) and, for a masked DW weight,
  zeroes its pruned taps and the entries of its per-element optimizer state (``momentum_buffer``,
  ``exp_avg``, ``exp_avg_sq``, ... : every state tensor shaped like the weight), so they stop pushing. The
  write is unconditional (``masked_fill_``): checking "any non-zero?" first would cost a device-to-host
  sync per layer and step and break CUDA-graph capture of the step; the step has already bumped the
  weight's version, so the write changes nothing for autograd. It runs after the step, never in forward.

``torch.func.functional_call(model, params, x)`` runs the given tensors as they are: nothing is written
into the caller's tensors and no hook is added to them (only ``Parameter`` objects of the model are hooked).

``torch.nn.utils.prune`` and ``parametrize`` break under torch-pruning (see docs), hence this design.
When a torch-pruning pass that does not know about masks removes channels, the mask no longer matches the
weight; it is then re-derived from the zero pattern, which is exact because pruned taps are exactly 0.
DEPruner itself slices masks with the removed indices.

Limits (what the hooks cannot see):

- a weight written by hand (``conv.weight.data.copy_(...)``, ``nn.init``, ``p.add_(noise)``) can make
  pruned taps non-zero; they are zeroed again at the next optimizer step (if the weight is in that
  optimizer), ``state_dict()`` or ``load_state_dict()``, or call :func:`apply_tap_masks_` yourself;
- a gradient transform that writes ``.grad`` outside autograd (``p.grad += noise``, SAM-style
  perturbations) bypasses the gradient hook; a ``torch.optim.Optimizer`` step re-masks it (post-hook
  above), an update applied by other means (not a ``torch.optim.Optimizer``, or a hand-written
  ``p -= lr * g``) does not: call :func:`apply_tap_masks_` after it;
- code that calls ``conv.forward`` / ``F.conv2d(x, conv.weight)`` directly on a replaced ``Parameter``
  skips the pre-hook, so that ``Parameter`` is not re-hooked until the module is called once.
"""
from __future__ import annotations

import weakref
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

MASK_BUFFER = "dw_tap_mask"

# Masked DW weights: id(Parameter) -> (weak ref to it, weak ref to its conv). An entry means the
# Parameter's gradient is masked; the optimizer post-hook reads it to find masked weights in one lookup.
# Keyed by id with a weak reference to tell a reused id apart (a WeakKeyDictionary would compare tensors
# with ==); weak both ways so the registry keeps neither the model nor an optimizer's tensors alive.
_MASKED_PARAMS: dict[int, tuple["weakref.ref[torch.Tensor]", "weakref.ref[nn.Module]"]] = {}
_STEP_HOOK: RemovableHandle | None = None  # the global optimizer step post-hook, installed once


def _grad_hooked(w: torch.Tensor) -> bool:
    entry = _MASKED_PARAMS.get(id(w))
    return entry is not None and entry[0]() is w


def is_depthwise(module: nn.Module) -> bool:
    """True for a depth-wise conv: ``groups == in_channels == out_channels`` and a kernel larger than 1x1."""
    return (isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels
            and module.groups > 1 and module.kernel_size[0] * module.kernel_size[1] > 1)


def tap_mask(conv: nn.Module) -> torch.Tensor | None:
    """The conv's keep mask ``[C, 1, kh, kw]`` (bool), or ``None`` if it has none."""
    return getattr(conv, MASK_BUFFER, None)


def _mask_grad(module_ref: "weakref.ref[nn.Module]", grad: torch.Tensor) -> torch.Tensor:
    module = module_ref()
    if module is None or tap_mask(module) is None:
        return grad
    if tap_mask(module).shape != grad.shape and module.weight.shape == grad.shape:
        sync_tap_mask(module)
    mask = tap_mask(module)
    if mask.shape != grad.shape:
        return grad
    return grad.masked_fill(~mask, 0)  # not grad * mask: NaN * 0 would leak NaN into pruned taps


def _hook_grad(module: nn.Module) -> None:
    """Mask the gradient of ``module.weight`` (once per ``Parameter`` object)."""
    w = module.weight
    if isinstance(w, nn.Parameter) and w.requires_grad and not _grad_hooked(w):
        module_ref = weakref.ref(module)
        w.register_hook(partial(_mask_grad, module_ref))
        key = id(w)
        _MASKED_PARAMS[key] = (weakref.ref(w, lambda _r, key=key: _MASKED_PARAMS.pop(key, None)), module_ref)


@torch.no_grad()
def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Global optimizer step post-hook: re-zero pruned taps and their optimizer state (module doc)."""
    if not _MASKED_PARAMS:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _MASKED_PARAMS.get(id(p))
            if entry is None or entry[0]() is not p:
                continue
            module = entry[1]()
            mask = None if module is None else tap_mask(module)
            # a Parameter the conv no longer uses (replaced by channel removal) is not computed with
            if mask is None or module.weight is not p or mask.shape != p.shape:
                continue
            pruned = ~mask
            p.masked_fill_(pruned, 0)
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.masked_fill_(pruned if value.device == pruned.device else pruned.to(value.device), 0)


def _install_step_hook() -> None:
    global _STEP_HOOK
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


def sync_tap_mask(conv: nn.Module) -> None:
    """Make the mask match the weight again after a mask-unaware channel removal (the weight is not changed)."""
    mask = tap_mask(conv)
    if mask is None or mask.shape == conv.weight.shape:
        return
    if mask.shape[1:] != conv.weight.shape[1:]:
        raise RuntimeError(f"tap mask {tuple(mask.shape)} cannot follow weight {tuple(conv.weight.shape)}")
    # Pruned taps are exactly zero, so the zero pattern of the surviving channels is their mask.
    setattr(conv, MASK_BUFFER, conv.weight.detach() != 0)


@torch.no_grad()
def apply_tap_mask_(conv: nn.Module, only_if_needed: bool = False) -> None:
    """Zero the pruned taps of ``conv`` in place (never call it between a forward and its backward).

    Args:
        only_if_needed: write only when some pruned tap is non-zero (keeps the weight's version counter).
    """
    sync_tap_mask(conv)
    mask = tap_mask(conv)
    if mask is None:
        return
    if only_if_needed and not conv.weight.detach().masked_select(~mask).any():
        return
    conv.weight.masked_fill_(~mask, 0)


def apply_tap_masks_(model: nn.Module) -> int:
    """Zero the pruned taps of every masked conv of ``model`` (after hand-written weights or a ``.grad``
    written outside autograd, see the module doc). Returns how many convs carry a mask."""
    count = 0
    for _, conv in masked_convs(model):
        apply_tap_mask_(conv)
        count += 1
    return count


def _pre_forward(module: nn.Module, args: tuple) -> None:
    # A check only: never writes the weight (two forwards then one backward, functional_call, speed).
    if torch.is_grad_enabled():
        mask = tap_mask(module)
        if mask is not None and mask.shape != module.weight.shape:
            sync_tap_mask(module)
        _hook_grad(module)


def _pre_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    apply_tap_mask_(module, only_if_needed=True)


def _post_load(module: nn.Module, incompatible_keys) -> None:
    apply_tap_mask_(module)
    _hook_grad(module)  # load_state_dict(assign=True) replaces the Parameter


_HOOKS = ("_forward_pre_hooks", _pre_forward), ("_state_dict_pre_hooks", _pre_state_dict), \
    ("_load_state_dict_post_hooks", _post_load)


def attach_tap_mask(conv: nn.Conv2d, keep: torch.Tensor) -> None:
    """Install (or replace) the keep mask of a DW conv, zero its pruned taps and mask its gradient (and,
    once per process, install the optimizer step post-hook that re-zeroes them after every step).

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
        conv.register_load_state_dict_post_hook(_post_load)
    apply_tap_mask_(conv)
    _hook_grad(conv)
    _install_step_hook()


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
    _hook_grad(conv)  # channel removal made a new Parameter


def masked_convs(model: nn.Module) -> Iterator[tuple[str, nn.Conv2d]]:
    """``(name, conv)`` of every conv carrying a tap mask."""
    for name, m in model.named_modules():
        if tap_mask(m) is not None:
            yield name, m


def remove_tap_masks(model: nn.Module) -> int:
    """Make pruning permanent: zero pruned taps, drop masks and hooks. Returns how many convs changed.

    (A gradient hook already on a weight stays but does nothing once the mask is gone.)"""
    count = 0
    for _, m in list(masked_convs(model)):
        apply_tap_mask_(m)
        for attr, fn in _HOOKS:
            hooks = getattr(m, attr)
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
