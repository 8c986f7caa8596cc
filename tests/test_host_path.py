"""The host path of FastDWConv: a launch plan per input signature (the launcher runs once, later calls cost one
allocation and one launch), the fp16 bias cast once, kernel choices kept through the state dict and never
re-timed for a known signature. CPU only: the layers run the kernels' host emulation."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deprune_plugin.kernels as kernels_pkg
from deprune_plugin.accel import FastDWConv
from deprune_plugin.kernels import emulation_available
from deprune_plugin.kernels.dispatch import KernelDispatcher, dispatch_key
from deprune_plugin.kernels.launch import capture_launches
from deprune_plugin.kernels.planned import PlannedCall, plan_call, plan_key

emu_ok, emu_why = emulation_available()
pytestmark = pytest.mark.skipif(not emu_ok, reason=emu_why)

C = 16


def _layer(dtype: torch.dtype = torch.float32) -> FastDWConv:
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(C, 1, 3, 3, generator=g) < 0.4
    w = torch.randn(C, 1, 3, 3, generator=g) * keep
    return FastDWConv(w, torch.randn(C, generator=g), keep, (1, 1), (1, 1, 1, 1), (1, 1), "relu6",
                      backend="emu").to(dtype)


def _input(n: int = 2, dtype: torch.dtype = torch.float32, channels_last: bool = True) -> torch.Tensor:
    x = torch.randn(n, C, 7, 9).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _Count:
    """Wrap a function and count its calls."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    """Counters on the launchers FastDWConv calls and on the specialisation they do."""
    import importlib

    counts = {}
    for name in ("dw_direct", "dw_dr"):
        counts[name] = _Count(getattr(kernels_pkg, name))
        monkeypatch.setattr(kernels_pkg, name, counts[name])
        module = importlib.import_module(f"deprune_plugin.kernels.{name}")
        counts[f"{name}.specialize"] = _Count(module.specialize)
        monkeypatch.setattr(module, "specialize", counts[f"{name}.specialize"])
    return counts


@pytest.mark.parametrize("kernel", ["direct", "dr"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_signature_is_planned_once_and_later_calls_skip_the_launcher(kernel, channels_last, counted):
    layer = _layer()
    x = _input(channels_last=channels_last)
    layer.choices = {dispatch_key(x): kernel}  # chosen ahead of time
    with torch.no_grad():
        outs = [layer(x) for _ in range(3)] + [layer(x.clone())]  # another tensor, same signature
    for y in outs:
        torch.testing.assert_close(y, layer.dense(x), rtol=1e-5, atol=1e-5)
        assert y.stride() == layer.dense(x).stride()
    name = f"dw_{kernel}"
    assert counted[name].calls == 1 and counted[f"{name}.specialize"].calls <= 1
    (entry,) = layer._calls.values()
    assert isinstance(entry[2], PlannedCall), layer.plan_notes
    x2 = _input(n=3, channels_last=channels_last)  # a new signature is planned anew
    layer.choices[dispatch_key(x2)] = kernel
    with torch.no_grad():
        torch.testing.assert_close(layer(x2), layer.dense(x2), rtol=1e-5, atol=1e-5)
    assert counted[name].calls == 2 and len(layer._calls) == 2


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_planned_call_is_one_allocation_and_no_bias_cast(dtype, monkeypatch):
    """fp16: the bias is cast to fp32 once (with the formats), not by a cast launch on every call."""
    layer = _layer(dtype)
    x = _input(dtype=dtype)
    layer.choices = {dispatch_key(x): "direct"}
    with torch.no_grad():
        layer(x)  # plans (and runs for real)
        launches = []
        monkeypatch.setattr("deprune_plugin.kernels.emulation.launch", lambda *a, **k: launches.append(a))
        with _Ops() as mode:
            layer(x)
            layer(x)
    assert mode.ops == ["aten.empty_strided.default"] * 2 and len(launches) == 2
    bias_ptr = layer.formats()["bias"].data_ptr()
    assert layer.formats()["bias"].dtype == torch.float32
    assert all(("ptr", bias_ptr) in [tuple(a) for a in args[5]] for args in launches)


def test_the_plan_follows_a_changed_choice_and_a_move():
    layer = _layer()
    x = _input()
    key = dispatch_key(x)
    with torch.no_grad():
        layer.choices = {key: "direct"}
        layer(x)
        layer.choices[key] = "dr"  # edited from outside: the next call must not run the stale plan
        torch.testing.assert_close(layer(x), layer.dense(x), rtol=1e-5, atol=1e-5)
        assert next(iter(layer._calls.values()))[1] == "dr"
        layer.double().float()  # a move: new buffers, the plans (pointing at the old ones) go
        assert layer._calls == {}
        torch.testing.assert_close(layer(x), layer.dense(x), rtol=1e-5, atol=1e-5)


def test_choices_survive_the_state_dict_and_are_not_retimed(monkeypatch):
    selects = _Count(KernelDispatcher._select)
    monkeypatch.setattr(KernelDispatcher, "_select", lambda self, *a: selects(self, *a))
    layer = _layer()
    x = _input()
    with torch.no_grad():
        layer(x)
        layer(x)
    assert selects.calls == 1 and dispatch_key(x) in layer.choices
    other = _layer()
    other.load_state_dict(layer.state_dict())
    assert other.choices == layer.choices
    with torch.no_grad():
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
        assert selects.calls == 1  # restored: not re-timed
        other(_input(n=1))  # a new signature is timed
    assert selects.calls == 2


def test_copies_do_not_share_plans():
    import copy

    layer = _layer()
    x = _input()
    layer.choices = {dispatch_key(x): "direct"}
    with torch.no_grad():
        layer(x)
        twin = copy.deepcopy(layer)
        assert twin._calls == {} and twin.choices == layer.choices
        twin.taps_tap_val.zero_()  # the copy's own weights
        twin.weight.zero_()
        twin._generation += 1
        torch.testing.assert_close(twin(x), torch.clamp(twin.bias.view(1, C, 1, 1).expand_as(x), 0, 6))


def test_plan_call_refuses_launches_it_cannot_replay():
    """A launch pointing at a temporary of the launcher (here a copy of the input) is run but not planned."""
    from deprune_plugin.kernels import dw_direct
    from deprune_plugin.kernels.formats import CompactTaps

    w = torch.randn(C, 1, 3, 3)
    taps = CompactTaps.from_dense(w)
    x = torch.randn(2, C, 7, 9)[:, :, :, 1:]  # strided: the launcher makes a contiguous copy
    plan, y, why = plan_call(lambda t: dw_direct(t, taps, None, padding=1, backend="emu"), x,
                             [taps.tap_ptr, taps.tap_idx, taps.tap_val])
    assert plan is None and "temporary" in why
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, None, 1, 1, 1, C), rtol=1e-5, atol=1e-5)
    with capture_launches() as launches:
        dw_direct(x.contiguous(), taps, None, padding=1, backend="emu")
    assert len(launches) == 1 and launches[0].entry == "deprune_dw_direct"


def test_plan_key_tells_alignment_apart():
    base = torch.randn(1, 1 + C * 63)
    a = base[:, :C * 63].view(1, C, 7, 9)
    b = base[:, 1:].view(1, C, 7, 9)  # 4 bytes off: a launcher may pick a scalar path for it
    assert dispatch_key(a) == dispatch_key(b) and plan_key(a) != plan_key(b)


def test_a_cupy_plan_packs_once_and_binds_only_the_pointers(monkeypatch):
    """The CuPy side of a plan against a fake CuPy (no GPU here): the kernel is fetched, its shared memory opted
    in and its arguments packed at planning; a call swaps the input/output pointers and launches inside the
    tensor's device context on the current stream."""
    import contextlib
    from types import SimpleNamespace

    import numpy as np

    from deprune_plugin.kernels import cupy_launch
    from deprune_plugin.kernels.launch import CapturedLaunch
    from deprune_plugin.kernels.sources import arg_i32, arg_ptr

    events = []

    class Kernel:
        max_dynamic_shared_size_bytes = 0

        def __call__(self, grid, block, args, shared_mem=0):
            events.append(("launch", current[0], grid, block, args, shared_mem))

    current = [0]

    @contextlib.contextmanager
    def device(index):
        before, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = before

    kernel = Kernel()
    fake = SimpleNamespace(cuda=SimpleNamespace(Device=device, runtime=None))
    monkeypatch.setattr(cupy_launch, "_import_cupy", lambda: fake)
    fetched = []
    monkeypatch.setattr(cupy_launch, "_kernel", lambda src, entry, index: fetched.append(index) or kernel)
    monkeypatch.setattr(cupy_launch, "_external_stream", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(cupy_launch, "max_dynamic_smem", lambda index: 227 * 1024)
    x, w = torch.randn(2, C, 5, 5), torch.randn(C)
    y = torch.empty_like(x)
    launch = CapturedLaunch("cupy", None, "k", (4, 1, 2), (128, 1, 1), 64 * 1024,
                            (arg_ptr(x), arg_ptr(y), arg_ptr(w), arg_i32(7)), torch.device("cuda", 1))
    plan = PlannedCall(launch, x, y, [w])
    assert fetched == [1] and kernel.max_dynamic_shared_size_bytes == 64 * 1024 and events == []
    x2 = torch.randn(2, C, 5, 5)
    y2 = plan(x2)
    (event,) = events
    assert event[:4] == ("launch", 1, (4, 1, 2), (128, 1, 1)) and event[5] == 64 * 1024
    args = event[4]
    assert [type(a) for a in args] == [np.uint64, np.uint64, np.uint64, np.int32]
    assert [int(a) for a in args] == [x2.data_ptr(), y2.data_ptr(), w.data_ptr(), 7]
    assert y2.shape == y.shape and y2.stride() == y.stride() and fetched == [1]


def test_planned_layers_compile_in_one_graph_and_export():
    """Under torch.compile (fullgraph: a graph break raises) and torch.export the layers do not run their
    plans but the chosen kernel's custom op (its CPU implementation here), one node per layer."""
    model = torch.nn.Sequential(_layer(), _layer()).eval()
    x = _input()
    for layer in model:
        layer.choices = {dispatch_key(x): "direct"}
    with torch.no_grad():
        eager = model(x)  # plans
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("deprune.dw_direct" in t for t in targets) == 2, targets
    torch.testing.assert_close(ep.module()(x), eager, rtol=1e-5, atol=1e-5)


def test_a_misaligned_input_gets_its_own_plan():
    """Same signature, input 2 bytes off 16-byte alignment: the launcher picks its scalar path for it and the
    vector path for an aligned input; each gets its own plan and both stay right."""
    layer = _layer(torch.float16)
    n, h, w = 2, 7, 9
    base = torch.randn(n * h * w * C + 1).half()
    misaligned = base[1:].view(n, h, w, C).permute(0, 3, 1, 2)  # channels_last at a 2-byte offset
    aligned = misaligned.clone(memory_format=torch.channels_last)
    assert dispatch_key(misaligned) == dispatch_key(aligned) and misaligned.data_ptr() % 16
    layer.choices = {dispatch_key(aligned): "direct"}
    with torch.no_grad():
        for x in (misaligned, aligned, misaligned, aligned):
            torch.testing.assert_close(layer(x), layer.dense(x), rtol=1e-2, atol=1e-2)
    assert len(layer._calls) == 2 and all(isinstance(v[2], PlannedCall) for v in layer._calls.values())
    assert len({v[2].src.hash for v in layer._calls.values()}) == 2  # two specialisations


@pytest.mark.parametrize("kernel", ["direct", "dr"])
def test_the_ops_gpu_implementations_keep_plans(kernel, monkeypatch):
    """What a compiled graph calls on a GPU (run here through the emulation): the launcher once per (signature,
    weights, version), the fp16 bias cast once; an in-place weight write starts a new plan."""
    import importlib

    from deprune_plugin.kernels import ops
    from deprune_plugin.kernels.formats import CompactTaps, DRColumns

    module = importlib.import_module(f"deprune_plugin.kernels.dw_{kernel}")
    launcher = _Count(getattr(module, f"dw_{kernel}"))
    monkeypatch.setattr(module, f"dw_{kernel}", launcher)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(C, 1, 3, 3, generator=g) < 0.4
    w, b = torch.randn(C, 1, 3, 3, generator=g) * keep, torch.randn(C, generator=g).half()
    x = _input(dtype=torch.float16)
    conv = ([1, 1], [1, 1, 1, 1], [1, 1], "relu6")
    if kernel == "direct":
        f = CompactTaps.from_dense(w, keep)
        weights = (f.tap_ptr, f.tap_idx, f.tap_val)
        run = lambda: ops._direct_call(x, *weights, b, [3, 3], *conv, backend="emu")  # noqa: E731
        ref = lambda: torch.ops.deprune.dw_direct(x, *weights, b, [3, 3], *conv)  # noqa: E731 - CPU: reference
    else:
        f = DRColumns.from_dense(w, keep)
        weights = (f.col_ptr, f.col_chan, f.col_tap, f.col_val, f.col_kept)
        run = lambda: ops._dr_call(x, *weights, b, [3, 3], 32, 32, *conv, backend="emu")  # noqa: E731
        ref = lambda: torch.ops.deprune.dw_dr(x, *weights, b, [3, 3], 32, 32, *conv)  # noqa: E731
    for _ in range(3):
        torch.testing.assert_close(run(), ref(), rtol=1e-2, atol=1e-2)
    assert launcher.calls == 1 and ops._bias32(b) is ops._bias32(b)
    with torch.no_grad():
        weights[3 if kernel == "dr" else 2].mul_(2)  # in place: the version counter moves
    torch.testing.assert_close(run(), ref(), rtol=1e-2, atol=1e-2)
    assert launcher.calls == 2
