"""The safety net of :func:`deprune_plugin.accelerate`: the accelerated model must reproduce the source
model, or the edits that break it are reverted and reported.

Checked inputs: the example input, and a second input of another batch and spatial size (odd offsets, so
stride-2 layers see both parities) when the source model accepts one. Outputs are compared leaf by leaf
with :func:`deprune_plugin.core.agreement.agreement` (dtype-aware). On a mismatch every edit is tried alone;
those that break the output alone are reverted; if the rest still disagree together, everything is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from ..core.agreement import agreement
from .convert import Edit

__all__ = ["CheckInput", "check_inputs", "outputs_agree", "verify_edits"]


@dataclass
class CheckInput:
    """One input of the self-check and the source model's output on it."""

    label: str
    args: tuple
    expected: Any


def _second_input(args: tuple) -> tuple | None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        return None
    n, c, h, w = x.shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x2 = torch.randn(max(n, 2), c, h + 17, w + 9, generator=g).to(device=x.device, dtype=x.dtype)
    return (x2, *args[1:])


@torch.no_grad()
def check_inputs(model: nn.Module, example: tuple) -> tuple[list[CheckInput], list[str]]:
    """The inputs to check with and the source model's outputs on them, plus notes on what was skipped."""
    out = [CheckInput(f"example input {_shape(example)}", example, model(*example))]
    notes = []
    second = _second_input(example)
    if second is not None:
        try:
            out.append(CheckInput(f"second input {_shape(second)}", second, model(*second)))
        except Exception as e:  # noqa: BLE001 - the model itself does not take that size: nothing to check
            notes.append(f"second input {_shape(second)} skipped: the source model does not accept it "
                         f"({type(e).__name__})")
    return out, notes


def _shape(args: tuple) -> str:
    x = args[0] if args else None
    return "x".join(map(str, x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def outputs_agree(model: Callable[..., Any], inputs: Sequence[CheckInput]) -> tuple[bool, str]:
    """``(True, "")`` when ``model`` (a module or any callable) reproduces every expected output, else
    ``(False, reason)``."""
    with torch.no_grad():
        for item in inputs:
            try:
                got = model(*item.args)
            except Exception as e:  # noqa: BLE001 - a model that now fails is a mismatch, with the reason
                return False, f"{item.label}: raised {type(e).__name__}: {e}"
            got_leaves, ref_leaves = tree_leaves(got), tree_leaves(item.expected)
            if len(got_leaves) != len(ref_leaves):
                return False, f"{item.label}: output structure differs"
            for g, r in zip(got_leaves, ref_leaves):
                if isinstance(r, torch.Tensor):
                    a = agreement(g, r)
                    if not a.ok:
                        return False, f"{item.label}: {a.reason}"
    return True, ""


@dataclass
class Verdict:
    """What :func:`verify_edits` kept, what it reverted and why, and which checks ran."""

    kept: list[Edit] = field(default_factory=list)
    reverted: list[tuple[Edit, str]] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)


def verify_edits(model: nn.Module, edits: list[Edit], inputs: Sequence[CheckInput],
                 prepare: Callable[[nn.Module], None] | None = None) -> Verdict:
    """Apply ``edits`` to ``model`` and keep only those under which it reproduces ``inputs``' outputs.

    Args:
        model: the model being accelerated (edited in place).
        edits: planned edits, not applied yet.
        inputs: from :func:`check_inputs` on the source model.
        prepare: called after every change (e.g. to convert new modules to channels_last).
    """
    prepare = prepare or (lambda m: None)
    labels = ", ".join(i.label for i in inputs)
    verdict = Verdict()

    def apply(selection: list[Edit]) -> None:
        for e in selection:
            e.apply(model)
        prepare(model)

    def revert(selection: list[Edit]) -> None:
        for e in reversed(selection):
            e.revert(model)

    apply(edits)
    ok, reason = outputs_agree(model, inputs)
    if ok:
        verdict.kept = list(edits)
        verdict.checks.append(f"outputs match the source model on {labels}")
        return verdict
    verdict.checks.append(f"outputs differ with all {len(edits)} edits ({reason}); edits checked one by one")
    revert(edits)
    bad: dict[int, str] = {}
    for i, e in enumerate(edits):
        apply([e])
        ok_one, why = outputs_agree(model, inputs)
        revert([e])
        if not ok_one:
            bad[i] = why
    good = [e for i, e in enumerate(edits) if i not in bad]
    apply(good)
    ok, reason = outputs_agree(model, inputs)
    if not ok:
        revert(good)
        verdict.reverted = [(e, f"output mismatch ({bad.get(i, 'only in combination: ' + reason)})")
                            for i, e in enumerate(edits)]
        verdict.checks.append("still different without the failing edits: every edit reverted")
        return verdict
    verdict.kept = good
    verdict.reverted = [(edits[i], f"output mismatch ({why})") for i, why in bad.items()]
    verdict.checks.append(f"outputs match the source model on {labels} after reverting {len(bad)} edit(s)")
    return verdict
