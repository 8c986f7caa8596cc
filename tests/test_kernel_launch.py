"""Shared-memory limits of the direct kernel: the tile planner takes the device's opt-in maximum as an
argument, and the CuPy launch opts in inside the tensor's device context, reading that maximum per device.

No GPU: the planner is pure Python, and the CuPy launch runs against a fake ``cupy`` that records which
device is current when the kernel attribute is set and when it launches.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from deprune_plugin.kernels import cupy_launch
from deprune_plugin.kernels.dw_direct import plan_tile
from deprune_plugin.kernels.launch import DEFAULT_SMEM_LIMIT, ConvGeometry, dynamic_smem_limit

KB = 1024
SM75, SM90 = 64 * KB, 227 * KB  # cudaDevAttrMaxSharedMemoryPerBlockOptin of a T4 and an H100


def geometry(k: int, dil: int, nhwc: bool, size: int = 64, c: int = 64) -> ConvGeometry:
    pad = dil * (k - 1) // 2
    return ConvGeometry(n=1, c=c, h=size, w=size, oh=size, ow=size, kh=k, kw=k, sh=1, sw=1,
                        pad=(pad, pad, pad, pad), dh=dil, dw=dil, nhwc=nhwc)


@pytest.mark.parametrize("nhwc", [False, True])
def test_ordinary_windows_plan_the_same_under_every_limit(nhwc):
    g = geometry(3, 1, nhwc)
    plans = {limit: plan_tile(g, limit) for limit in (DEFAULT_SMEM_LIMIT, SM75, SM90)}
    assert len(set(plans.values())) == 1  # below 48 KB the device's maximum does not matter
    assert plans[SM90][3] <= DEFAULT_SMEM_LIMIT
    assert plan_tile(g) == plans[SM90]  # default: 48 KB


@pytest.mark.parametrize("nhwc,k,dil,need", [
    (False, 31, 4, 71176),    # NCHW smallest block (8 x 1): taps + a 124 x 128 fp32 tile
    (True, 21, 3, 124928),    # NHWC smallest block (8 channels x 4 pixels): 61 x 64 x 8 fp32
])
def test_a_huge_window_plans_only_where_the_device_allows_it(nhwc, k, dil, need):
    g = geometry(k, dil, nhwc)
    assert SM75 < need <= SM90
    block, tile_h, tile_w, smem = plan_tile(g, SM90)
    assert smem == need and block[0] == 8 and block[1] == 1  # shrunk to the smallest block first
    with pytest.raises(ValueError, match=f"needs {need} bytes.*more than the {SM75}"):
        plan_tile(g, SM75)
    with pytest.raises(ValueError, match=f"more than the {DEFAULT_SMEM_LIMIT}"):
        plan_tile(g)  # no device known (host emulation): 48 KB


def test_a_limit_below_48_kb_shrinks_the_tile():
    g = geometry(11, 3, False)
    block, _, _, smem = plan_tile(g, DEFAULT_SMEM_LIMIT)
    small = plan_tile(g, 12 * KB)
    assert small[3] <= 12 * KB < smem and small[0][1] < block[1]


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
