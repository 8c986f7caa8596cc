"""The safety net of :func:`deprune_plugin.accelerate`: the accelerated model must reproduce the source
model, or the edits that break it are reverted and reported.

Checked inputs: the example input, and a second input of another batch and spatial size (odd offsets, so
stride-2 layers see both parities) when the source model accepts one. Outputs are compared leaf by leaf
with :func:`deprune_plugin.core.agreement.agreement` (dtype-aware). On a mismatch every edit is tried alone;
those that break the output alone are reverted; if the rest still disagree together, everything is.

Rounding versus error: a fp32 model can itself be far from its exact value (a BatchNorm whose running
variance is ~0 divides by ``sqrt(eps)`` and amplifies rounding ~300x), and then any reordering of its sums
(BN folding, channels_last, another runtime) differs from it by more than a fixed tolerance. So for fp32
sources the check also runs the source in float64: outputs are compared with that exact reference, and the
tolerance grows by :data:`SLACK_FACTOR` times the source's own fp32-vs-float64 error, which a failure
message reports. A wrong layer is off by the activations' scale and is still caught. Both sides of every
comparison run without TF32 (PyTorch enables it for cuDNN convs by default, ~1e-3 relative): the check is
of the fp32 math, not of a precision the source never promised.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from ..core.agreement import agreement
from ..core.precision import no_tf32
from .convert import Edit

__all__ = ["CheckInput", "SLACK_FACTOR", "check_inputs", "outputs_agree", "rounding_error", "shape_label",
           "verify_edits"]

#: how many times the source model's own fp32-vs-float64 error a replacement may differ from float64 by (on
#: top of the dtype's tolerance): two fp32 evaluations of one function in different orders are each about
#: that far from exact, and their worst elements need not coincide.
SLACK_FACTOR = 8.0


@dataclass
class CheckInput:
    """One input of the self-check and the source model's output on it.

    ``expected``: the source's output in its own dtype. ``exact``: the float64 source's output (fp32 sources
    where the model converts), the reference compared with when present. ``source_error``: per output leaf,
    the largest ``|expected - exact|`` (empty without ``exact``)."""

    label: str
    args: tuple
    expected: Any
    exact: Any = None
    source_error: list[float] = field(default_factory=list)

    def describe_source(self) -> str:
        """How far the source model itself is from float64 on this input ("" when not measured)."""
        if not self.source_error:
            return ""
        scale = max((float(t.detach().abs().max()) for t in tree_leaves(self.exact)
                     if isinstance(t, torch.Tensor) and t.numel()), default=0.0)
        err = max(self.source_error)
        rel = f", {err / scale:.2g} relative" if scale > 0 else ""
        return f"the source model itself is {err:.3g} from its float64 value here{rel}"


def _second_input(args: tuple) -> tuple | None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        return None
    n, c, h, w = x.shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x2 = torch.randn(max(n, 2), c, h + 17, w + 9, generator=g).to(device=x.device, dtype=x.dtype)
    return (x2, *args[1:])


@torch.no_grad()
def check_inputs(model: nn.Module, example: tuple, exact: bool = True) -> tuple[list[CheckInput], list[str]]:
    """The inputs to check with and the source model's outputs on them, plus notes on what was skipped.

    With ``exact`` and a fp32 ``model``, a float64 copy of it also runs on each input (see the module doc).
    """
    with no_tf32():
        out = [CheckInput(f"example input {shape_label(example)}", example, model(*example))]
        notes = []
        second = _second_input(example)
        if second is not None:
            try:
                out.append(CheckInput(f"second input {shape_label(second)}", second, model(*second)))
            except Exception as e:  # noqa: BLE001 - the model itself does not take that size: nothing to check
                notes.append(f"second input {shape_label(second)} skipped: the source model does not accept it "
                             f"({type(e).__name__})")
        if exact:
            note = _add_exact(model, out)
            if note:
                notes.append(note)
    return out, notes


def _is_fp32(model: nn.Module) -> bool:
    dtypes = {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    return dtypes == {torch.float32}


def rounding_error(double: nn.Module, args: tuple, expected: Any) -> tuple[Any, list[float]]:
    """Run ``double`` (a float64 copy of the model that gave ``expected`` on ``args``) and return its output
    and, per output leaf, the largest finite ``|expected - exact|`` (0 for non-float leaves)."""
    exact = double(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))
    errs = []
    for e, x in zip(tree_leaves(expected), tree_leaves(exact)):
        if isinstance(e, torch.Tensor) and e.is_floating_point() and isinstance(x, torch.Tensor):
            diff = (e.double() - x.double()).abs()
            diff = diff[torch.isfinite(diff)]
            errs.append(float(diff.max()) if diff.numel() else 0.0)
        else:
            errs.append(0.0)
    return exact, errs


def _add_exact(model: nn.Module, items: list[CheckInput]) -> str:
    """Fill ``exact`` and ``source_error`` of ``items`` from a float64 copy of ``model``; a note when it
    cannot run in float64 (then the plain dtype tolerance applies)."""
    if not _is_fp32(model):
        return ""
    try:
        double = copy.deepcopy(model).double()
        for item in items:
            item.exact, item.source_error = rounding_error(double, item.args, item.expected)
    except Exception as e:  # noqa: BLE001 - a model that cannot run in float64 keeps the fp32 reference
        for item in items:
            item.exact, item.source_error = None, []
        return f"float64 reference skipped: the source model does not run in float64 ({type(e).__name__})"
    return ""


def shape_label(args: tuple) -> str:
    """The first argument's shape as ``"1x3x224x224"`` (its type name when it is no tensor)."""
    x = args[0] if args else None
    return "x".join(map(str, x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def outputs_agree(model: Callable[..., Any], inputs: Sequence[CheckInput]) -> tuple[bool, str]:
    """``(True, "")`` when ``model`` (a module or any callable) reproduces every expected output, else
    ``(False, reason)``."""
    with torch.no_grad(), no_tf32():
        for item in inputs:
            try:
                got = model(*item.args)
            except Exception as e:  # noqa: BLE001 - a model that now fails is a mismatch, with the reason
                return False, f"{item.label}: raised {type(e).__name__}: {e}"
            got_leaves, ref_leaves = tree_leaves(got), tree_leaves(item.expected)
            if len(got_leaves) != len(ref_leaves):
                return False, f"{item.label}: output structure differs"
            exact = tree_leaves(item.exact) if item.source_error else [None] * len(ref_leaves)
            errors = item.source_error or [0.0] * len(ref_leaves)
            for g, r, x, err in zip(got_leaves, ref_leaves, exact, errors):
                if isinstance(r, torch.Tensor):
                    ref = r if x is None else x
                    a = agreement(g, ref, dtype=r.dtype, slack=SLACK_FACTOR * err)
                    if not a.ok:
                        source = item.describe_source()
                        return False, f"{item.label}: {a.reason}" + (f"; {source}" if source else "")
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
