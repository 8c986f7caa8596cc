"""Shared-memory limits of the direct kernel: the tile planner (:func:`dw_direct_plan`) takes the device's
opt-in maximum as an argument, and the CuPy launch opts in inside the tensor's device context, reading that
maximum per device.

No GPU: the planner is pure Python, and the CuPy launch runs against a fake ``cupy`` that records which
device is current when the kernel attribute is set and when it launches.
"""
from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from deprune_plugin.kernels import cupy_launch
from deprune_plugin.kernels.dw_direct import dw_direct_plan
from deprune_plugin.kernels.launch import DEFAULT_SMEM_LIMIT, ConvGeometry, dynamic_smem_limit

KB = 1024
SM75, SM90 = 64 * KB, 227 * KB  # cudaDevAttrMaxSharedMemoryPerBlockOptin of a T4 and an H100


def geometry(k: int, dil: int, nhwc: bool, size: int = 64, c: int = 64) -> ConvGeometry:
    pad = dil * (k - 1) // 2
    return ConvGeometry(n=1, c=c, h=size, w=size, oh=size, ow=size, kh=k, kw=k, sh=1, sw=1,
                        pad=(pad, pad, pad, pad), dh=dil, dw=dil, nhwc=nhwc)


def plan(g: ConvGeometry, limit: int = DEFAULT_SMEM_LIMIT):
    return dw_direct_plan(g, torch.float32, smem_limit=limit)


@pytest.mark.parametrize("nhwc", [False, True])
def test_ordinary_windows_plan_the_same_under_every_limit(nhwc):
    g = geometry(3, 1, nhwc)
    plans = {limit: plan(g, limit) for limit in (DEFAULT_SMEM_LIMIT, SM75, SM90)}
    assert plans[DEFAULT_SMEM_LIMIT] == plans[SM75] == plans[SM90]  # below 48 KB the maximum does not matter
    assert plans[SM90].smem_bytes <= DEFAULT_SMEM_LIMIT
    assert dw_direct_plan(g, torch.float32) == plans[SM90]  # default: 48 KB


@pytest.mark.parametrize("nhwc,k,dil,need", [
    (False, 31, 4, 69640),    # NCHW smallest tile (1 x 8 outputs): taps + a 121 x 128 fp32 window
    (True, 21, 3, 66816),     # NHWC smallest tile (1 x 1 output, one 4-channel vector): 61 x 61 x 4 fp32 + taps
])
def test_a_huge_window_plans_only_where_the_device_allows_it(nhwc, k, dil, need):
    g = geometry(k, dil, nhwc)
    assert SM75 < need <= SM90
    big = plan(g, SM90)
    assert DEFAULT_SMEM_LIMIT < big.smem_bytes <= SM90  # opted in: nothing fits the default 48 KB
    with pytest.raises(ValueError, match=f"needs {need} bytes.*more than the {SM75}"):
        plan(g, SM75)
    with pytest.raises(ValueError, match=f"more than the {DEFAULT_SMEM_LIMIT}"):
        dw_direct_plan(g, torch.float32)  # no device known (host emulation): 48 KB


def test_a_limit_below_48_kb_shrinks_the_tile():
    g = geometry(11, 3, False)
    full, small = plan(g, DEFAULT_SMEM_LIMIT), plan(g, 12 * KB)
    assert small.smem_bytes <= 12 * KB < full.smem_bytes
    assert math.prod(small.extra["tile"]) < math.prod(full.extra["tile"])


# ---- the CuPy launch, against a fake cupy -------------------------------------------------------------

class FakeKernel:
    def __init__(self, cupy: "FakeCupy") -> None:
        self.cupy = cupy
        self._max_dynamic = 0

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self._max_dynamic

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        self.cupy.events.append(("opt-in", self.cupy.current, value))
        self._max_dynamic = value

    def __call__(self, grid, block, args, shared_mem=0) -> None:
        self.cupy.events.append(("launch", self.cupy.current, shared_mem))


class FakeCupy:
    """Just what cupy_launch.launch / max_dynamic_smem touch: Device contexts, deviceGetAttribute."""

    def __init__(self, optin: dict[int, int]) -> None:
        self.current = 0
        self.events: list[tuple] = []
        self.queries: list[tuple[int, int]] = []
        self.optin = optin

        @contextlib.contextmanager
        def device(index: int):
            before, self.current = self.current, index
            try:
                yield
            finally:
                self.current = before

        def device_get_attribute(attr: int, index: int) -> int:
            self.queries.append((attr, index))
            return self.optin[index]

        runtime = SimpleNamespace(deviceGetAttribute=device_get_attribute)  # no named constant: the 97 fallback
        self.cuda = SimpleNamespace(Device=device, runtime=runtime)


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = FakeCupy({0: SM75, 1: SM90})
    kernel = FakeKernel(fake)
    monkeypatch.setattr(cupy_launch, "_import_cupy", lambda: fake)
    monkeypatch.setattr(cupy_launch, "_kernel", lambda src, entry, index: kernel)
    monkeypatch.setattr(cupy_launch, "_external_stream", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(cupy_launch, "_SMEM_OPTIN", {}, raising=False)  # raising=False: runs on the old launch too
    return fake


def test_opt_in_is_set_inside_the_tensors_device_context(fake_cupy):
    """Before: the attribute was set before entering ``cupy.cuda.Device(index)``, i.e. on whatever device
    was current (device 0 here) for a tensor on device 1."""
    cupy_launch.launch(None, "k", (1, 1, 1), (32, 1, 1), 100 * KB, [], torch.device("cuda", 1))
    assert fake_cupy.events == [("opt-in", 1, 100 * KB), ("launch", 1, 100 * KB)]


def test_the_device_maximum_is_read_once_per_device(fake_cupy):
    assert dynamic_smem_limit("cupy", torch.device("cuda", 1)) == SM90
    assert dynamic_smem_limit("cupy", torch.device("cuda", 0)) == SM75
    for _ in range(3):
        cupy_launch.launch(None, "k", (1, 1, 1), (32, 1, 1), 60 * KB, [], torch.device("cuda", 1))
    assert fake_cupy.queries == [(97, 1), (97, 0)]  # cudaDevAttrMaxSharedMemoryPerBlockOptin, cached
    assert dynamic_smem_limit("emu", torch.device("cpu")) == DEFAULT_SMEM_LIMIT


def test_a_request_above_the_device_maximum_launches_nothing(fake_cupy):
    with pytest.raises(ValueError, match=f"allows {SM75}"):
        cupy_launch.launch(None, "k", (1, 1, 1), (32, 1, 1), 100 * KB, [], torch.device("cuda", 0))
    assert fake_cupy.events == []


def test_no_opt_in_below_48_kb(fake_cupy):
    cupy_launch.launch(None, "k", (1, 1, 1), (32, 1, 1), 40 * KB, [], torch.device("cuda", 1))
    assert fake_cupy.events == [("launch", 1, 40 * KB)] and fake_cupy.queries == []


# ---- wrapping torch's stream for CuPy -----------------------------------------------------------------------

def _fake_cupy_streams(protocol: bool):
    """A CuPy with ``Stream.from_external`` (14+, protocol objects) or only ``ExternalStream`` (13)."""
    made: list[tuple] = []

    class Stream:
        pass

    if protocol:
        Stream.from_external = staticmethod(lambda obj: made.append(("from_external", obj.__cuda_stream__()))
                                            or object())

    def external(ptr, device_id):
        made.append(("ExternalStream", ptr, device_id))
        return object()
    cuda = SimpleNamespace(Stream=Stream, ExternalStream=external)
    return SimpleNamespace(cuda=cuda), made


@pytest.mark.parametrize("protocol", [True, False], ids=["cupy14", "cupy13"])
def test_torch_stream_is_wrapped_without_the_deprecated_class_where_cupy_allows(monkeypatch, protocol):
    fake, made = _fake_cupy_streams(protocol)
    monkeypatch.setattr(cupy_launch, "_import_cupy", lambda: fake)
    monkeypatch.setattr(cupy_launch, "_STREAMS", {})
    ptr = [0x7F00]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: SimpleNamespace(cuda_stream=ptr[0]))
    first = cupy_launch._external_stream(1)
    assert cupy_launch._external_stream(1) is first  # cached per (device, stream pointer)
    ptr[0] = 0x7F80  # another current stream (torch.cuda.stream(...), graph capture): wrapped anew
    assert cupy_launch._external_stream(1) is not first
    if protocol:
        assert made == [("from_external", (0, 0x7F00)), ("from_external", (0, 0x7F80))]
    else:
        assert made == [("ExternalStream", 0x7F00, 1), ("ExternalStream", 0x7F80, 1)]
