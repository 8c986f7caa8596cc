"""The CUDA epilogue's activation switch (``deprune_activate`` in ``cuda/deprune_common.cuh``) and the
Python registry (``deprune_plugin.kernels.activations.ACTIVATIONS``) agree: same names, same codes, and
each ``case`` computes what the registry's torch function computes.

The kernels receive the activation as an integer code, so a code changed on one side only would make the
accelerated model apply another activation without any error; this test reads the ``.cuh`` text itself.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from deprune_plugin.kernels.activations import ACTIVATIONS

CUH = Path(__file__).resolve().parents[1] / "cuda" / "deprune_common.cuh"
# `case 2: return <expr>;   // relu6` and `default: return v;   // identity`; the registry name is the
# comment's last word ("exact (erf) gelu" -> "gelu")
_CASE = re.compile(r"^\s*case\s+(\d+)\s*:\s*return\s+(.+?);\s*//.*?(\w+)\s*$")
_DEFAULT = re.compile(r"^\s*default\s*:\s*return\s+(.+?);\s*//.*?(\w+)\s*$")
# the C functions and float literals of the switch, as Python
_C_TO_PY = {"fmaxf": "max", "fminf": "min", "expf": "math.exp", "erff": "math.erf"}


def parse_activation_switch(text: str) -> tuple[dict[str, tuple[int, str]], tuple[str, str]]:
    """``({name: (code, C expression)}, (default name, default expression))`` of ``deprune_activate``."""
    body = re.search(r"deprune_activate\s*\([^)]*\)\s*\{\s*switch\s*\(\s*act\s*\)\s*\{(.*?)\n\s*\}", text, re.S)
    assert body, "deprune_activate's switch (act) not found"
    cases: dict[str, tuple[int, str]] = {}
    default = None
    for line in body.group(1).splitlines():
        if m := _CASE.match(line):
            code, expr, name = int(m.group(1)), m.group(2), m.group(3)
            assert name not in cases, f"{name} has two cases"
            cases[name] = (code, expr)
        elif m := _DEFAULT.match(line):
            default = (m.group(2), m.group(1))
        elif line.strip():
            raise AssertionError(f"unparsed line in the activation switch: {line.strip()!r}")
    assert default is not None, "the switch has no default"
    return cases, default


def c_expression_as_python(expr: str):
    """``lambda v: ...`` computing a C float expression of the switch (f-suffixed literals, fmaxf, ...)."""
    py = re.sub(r"(\d+\.\d*|\.\d+)f\b", r"\1", expr)
    for c_name, py_name in _C_TO_PY.items():
        py = re.sub(rf"\b{c_name}\b", py_name, py)
    return eval(f"lambda v: {py}", {"math": math})  # noqa: S307 - text of our own header


def switch_codes(text: str) -> dict[str, int]:
    """``{name: code}`` of the switch's ``case`` lines."""
    return {name: code for name, (code, _) in parse_activation_switch(text)[0].items()}


def registry_case_codes() -> dict[str, int]:
    """``{name: code}`` of the registry, less identity (the switch's default branch, no case)."""
    return {a.name: a.code for a in ACTIVATIONS.values() if a.name != "identity"}


def test_the_switch_has_exactly_the_registry_codes():
    text = CUH.read_text()
    assert switch_codes(text) == registry_case_codes()
    # the default branch is identity and identity's code reaches it (no case claims it)
    _, (default_name, default_expr) = parse_activation_switch(text)
    assert default_name == "identity" and default_expr == "v"
    assert ACTIVATIONS["identity"].code not in switch_codes(text).values()
    assert len({a.code for a in ACTIVATIONS.values()}) == len(ACTIVATIONS)  # codes are unique


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_case_computes_the_registry_function(name):
    cases, (default_name, default_expr) = parse_activation_switch(CUH.read_text())
    expr = default_expr if name == default_name else cases[name][1]
    fn = c_expression_as_python(expr)
    v = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)  # both sides of relu6's and hardswish's kinks
    want = ACTIVATIONS[name].fn(v)
    got = torch.tensor([fn(float(x)) for x in v], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_changed_code_or_label_is_caught():
    """The parser reads what the header says: a copy with a code changed, two codes swapped or a case
    relabelled disagrees with the registry."""
    text = CUH.read_text()
    assert switch_codes(text) == registry_case_codes()
    changed = text.replace("case 2:", "case 7:", 1)
    assert switch_codes(changed)["relu6"] == 7 and switch_codes(changed) != registry_case_codes()
    swapped = text.replace("case 1:", "case 6:", 1).replace("case 3:", "case 1:", 1).replace("case 6:", "case 3:", 1)
    assert switch_codes(swapped) == {**registry_case_codes(), "relu": 3, "silu": 1} != registry_case_codes()
    relabelled = text.replace("// relu6", "// silu", 1)
    with pytest.raises(AssertionError, match="silu has two cases"):
        parse_activation_switch(relabelled)
    # a case whose expression is another activation's: the numeric check would fail
    relu = c_expression_as_python(parse_activation_switch(text)[0]["relu"][1])
    assert relu(7.0) == 7.0 != float(ACTIVATIONS["relu6"].fn(torch.tensor(7.0)))
