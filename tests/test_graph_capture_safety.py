"""What a real-GPU test captures into a CUDA graph must not sync with the host: ``nonzero``, ``.cpu()``,
``.item()``, ``int(tensor)``, ``repeat_interleave`` without ``output_size`` and the like raise "operation not
permitted when stream is capturing" on any GPU. Checked here without one: the calls inside every
``with torch.cuda.graph(...)`` block of ``tests/test_dw_pw_fused_cuda.py`` are run on the CPU (host emulation
backend, launches recorded instead of run) under a torch function mode that raises on each host-syncing op."""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from deprune_plugin.kernels import CompactTaps
from deprune_plugin.kernels.dw_pw_fused import fused_tap_tables
from deprune_plugin.kernels.launch import capture_launches

from test_dw_pw_fused_emulation import make

HERE = Path(__file__).resolve().parent
# Tensor ops whose result the host must wait for (a value, a data-dependent shape, or a copy to the host).
SYNCING = {"nonzero", "argwhere", "cpu", "item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__",
           "unique", "unique_consecutive", "masked_select", "equal", "allclose", "is_nonzero", "bincount"}


class HostSync(AssertionError):
    pass


class NoHostSync(TorchFunctionMode):
    """Raises :class:`HostSync` on every torch op that would sync a CUDA stream with the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        to_host = name == "to" and any(str(a) == "cpu" for a in (*args[1:], kwargs.get("device")))
        if name in SYNCING or to_host or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                          and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"),
                                                         torch.Tensor)):
            raise HostSync(f"{name} syncs with the host")
        return func(*args, **kwargs)


def captured_calls(path: Path) -> list[str]:
    """Names of the functions called inside the ``with torch.cuda.graph(...)`` blocks of a test file."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.With) and any(isinstance(i.context_expr, ast.Call)
                                              and ast.unparse(i.context_expr.func) == "torch.cuda.graph"
                                              for i in node.items):
            names += [c.func.id for stmt in node.body for c in ast.walk(stmt)
                      if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
    return names


def test_the_guard_catches_what_building_formats_does():
    """Building the formats syncs (``nonzero``, ``.cpu()``, ``int(tensor)``; the tap tables'
    ``repeat_interleave``): the guard must see it, or passing under it would prove nothing."""
    t = make(2, 32, 16, 8, 8, 3)
    with pytest.raises(HostSync), NoHostSync():
        CompactTaps.from_dense(t["weight"], t["keep"])
    taps = CompactTaps.from_dense(t["weight"], t["keep"])
    with pytest.raises(HostSync, match="repeat_interleave"), NoHostSync():
        fused_tap_tables(taps, 8)


def test_fused_graph_capture_calls_nothing_that_syncs():
    mod = importlib.import_module("test_dw_pw_fused_cuda")
    names = captured_calls(HERE / "test_dw_pw_fused_cuda.py")
    assert names, "no torch.cuda.graph block found"
    t = make(8, 96, 24, 28, 28, 3, residual=True)  # the captured test's shape, on the CPU
    fmt = mod.formats(t) if hasattr(mod, "formats") else None  # built before capture, as the GPU test does
    for name in names:
        fn = getattr(mod, name)
        params = inspect.signature(fn).parameters
        args = (t, fmt)[:len([p for p in params.values() if p.default is inspect.Parameter.empty])]
        kwargs = {"backend": "emu"} if "backend" in params else {}
        with capture_launches() as launches, NoHostSync():
            out = fn(*args, **kwargs)
        assert len(launches) == 1 and launches[0].entry == "deprune_dw_pw_fused", name
        assert tuple(out.shape) == (8, 24, 28, 28), name
