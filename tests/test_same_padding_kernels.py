"""Asymmetric (TensorFlow "SAME") padding in the kernels, run through the host emulation.

Before: the launchers read ``padding`` with ``pair()``, so the ``(top, bottom, left, right)`` that FastDWConv
passes for an uneven SAME layer raised TypeError in both kernel candidates (dense ran silently), and the
``torch.ops.deprune`` CUDA implementations, which always pass four values, crashed under torch.compile.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deprune_plugin import accelerate
from deprune_plugin.accel import FastDWConv
from deprune_plugin.accel.api import kernel_choices
from deprune_plugin.core.padding import same_padding
from deprune_plugin.kernels import CompactTaps, DRColumns, dw_direct, dw_dr, emulation_available, ops
from deprune_plugin.kernels.launch import conv_padding

_OK, _WHY = emulation_available()
needs_emu = pytest.mark.skipif(not _OK, reason=f"host emulation unavailable: {_WHY}")

LAUNCHERS = {
    "direct": lambda x, w, keep, b, **kw: dw_direct(x, CompactTaps.from_dense(w, keep), b, **kw),
    "dr": lambda x, w, keep, b, **kw: dw_dr(x, DRColumns.from_dense(w, keep), b, **kw),
}
# (H, W): odd and even sizes, so that stride 2 gives top == bottom on some dims and top < bottom on others
SIZES = [(33, 32), (32, 33), (32, 32), (17, 24)]


def _same_pads(h: int, w: int, k: int, stride: int) -> tuple[int, int, int, int]:
    top, bottom = same_padding(h, k, stride, 1)
    left, right = same_padding(w, k, stride, 1)
    return top, bottom, left, right


def _problem(h: int, w: int, k: int, dtype: torch.dtype, channels_last: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 37, h, w, generator=g).to(dtype)  # 37 channels: a partial channel block / range
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    keep = torch.rand(37, 1, k, k, generator=g) < 0.6
    w_ = torch.randn(37, 1, k, k, generator=g) * keep
    return x, w_, keep, torch.randn(37, generator=g)


def _reference(x, w, b, pads, stride):
    top, bottom, left, right = pads
    return F.conv2d(F.pad(x.float().contiguous(), (left, right, top, bottom)), w, b, stride, 0, 1, x.shape[1])


def _assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:  # fp32 accumulation, one rounding to the storage dtype
        torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=1e-2, atol=1e-2)


def test_the_cases_include_uneven_padding():
    pads = [_same_pads(h, w, k, 2) for h, w in SIZES for k in (3, 5)]
    assert any(p[0] != p[1] for p in pads) and any(p[2] != p[3] for p in pads)
    assert any(p[0] == p[1] for p in pads)  # and symmetric dims as well


@needs_emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("kernel", sorted(LAUNCHERS))
def test_kernels_match_conv2d_on_tf_same_padding(kernel, k, layout, dtype):
    for h, w in SIZES:
        x, weight, keep, b = _problem(h, w, k, dtype, layout == "nhwc")
        pads = _same_pads(h, w, k, 2)
        y = LAUNCHERS[kernel](x, weight, keep, b, stride=2, padding=pads, backend="emu")
        assert y.shape[-2:] == (-(-h // 2), -(-w // 2))  # SAME: ceil(size / stride)
        assert y.is_contiguous(memory_format=torch.channels_last) if layout == "nhwc" else y.is_contiguous()
        _assert_close(y, _reference(x, weight, b, pads, 2), dtype)


@needs_emu
@pytest.mark.parametrize("kernel", sorted(LAUNCHERS))
def test_top_larger_than_bottom_and_mixed_strides(kernel):
    """Any (top, bottom, left, right), not only SAME's (after >= before)."""
    x, weight, keep, b = _problem(13, 14, 3, torch.float32, False)
    for pads, stride in [((2, 0, 0, 2), (2, 1)), ((0, 3, 1, 0), (1, 2)), ((1, 0, 2, 1), (3, 2))]:
        y = LAUNCHERS[kernel](x, weight, keep, b, stride=stride, padding=pads, backend="emu")
        _assert_close(y, _reference(x, weight, b, pads, stride), torch.float32)


@needs_emu
@pytest.mark.parametrize("kernel", sorted(LAUNCHERS))
def test_int_pair_and_four_values_are_the_same_symmetric_padding(kernel):
    x, weight, keep, b = _problem(9, 11, 3, torch.float32, True)
    outs = [LAUNCHERS[kernel](x, weight, keep, b, padding=p, backend="emu") for p in (1, (1, 1), (1, 1, 1, 1))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("padding,expected", [
    (2, (2, 2, 2, 2)), ((1, 2), (1, 1, 2, 2)), ([0, 1, 2, 3], (0, 1, 2, 3)), (torch.Size([1, 0]), (1, 1, 0, 0)),
])
def test_conv_padding_normalises_to_four_values(padding, expected):
    assert conv_padding(padding) == expected


@pytest.mark.parametrize("padding,exc", [
    ((1, 2, 3), TypeError), ((1, 1, 1, 1, 1), TypeError), ("same", TypeError), (1.5, TypeError), (True, TypeError),
    ((1, 1.0), TypeError), ((0, -1, 0, 0), ValueError), (-1, ValueError),
])
def test_conv_padding_refuses_bad_values(padding, exc):
    with pytest.raises(exc, match="padding"):
        conv_padding(padding)


# ---- the torch.library ops' CUDA implementations pass (top, bottom, left, right) ----------------------

@needs_emu
@pytest.mark.parametrize("channels_last", [False, True])
def test_custom_op_cuda_implementations_accept_four_padding_values(monkeypatch, channels_last):
    """The ops' CUDA kernels call the launchers with the 4-value padding of their schema (which crashed every
    kernel layer under torch.compile on CUDA). Run those very functions with the launchers on the emulation."""
    for name in ("dw_direct", "dw_dr"):
        module = sys.modules[f"deprune_plugin.kernels.{name}"]
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, **kw: real(*a, **{**kw, "backend": "emu"}))
    x, weight, keep, b = _problem(16, 15, 3, torch.float32, channels_last)
    pad, stride, dil = [0, 1, 1, 2], [2, 1], [1, 1]
    ref = F.silu(_reference(x, weight, b, pad, stride))
    t = CompactTaps.from_dense(weight, keep)
    y = ops._dw_direct_cuda(x, t.tap_ptr, t.tap_idx, t.tap_val, b, [3, 3], stride, pad, dil, "silu")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    c = DRColumns.from_dense(weight, keep)
    y = ops._dw_dr_cuda(x, c.col_ptr, c.col_chan, c.col_tap, c.col_val, c.col_kept, b, [3, 3], 32, 32, stride, pad,
                        dil, "silu")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    fake = ops._fake(x, [3, 3], stride, pad, dil)  # the fake (meta) shape agrees with what the kernels return
    assert fake.shape == y.shape and fake.stride() == y.stride()


# ---- accelerate(): a timm SAME stride-2 DW layer keeps its kernel candidates ------------------------------

def _same_model(channels: int = 24):
    from timm.layers import create_conv2d

    torch.manual_seed(0)
    dw = create_conv2d(channels, channels, 3, stride=2, padding="same", depthwise=True)
    with torch.no_grad():
        dw.weight.mul_(torch.rand_like(dw.weight) < 0.6)  # some taps pruned
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(dw, bn, nn.ReLU6()).eval()


@needs_emu
def test_accelerated_tf_same_layer_keeps_direct_and_dr_candidates():
    m = _same_model()
    assert type(m[0]).__name__ == "Conv2dSame" or m[0].padding != (0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = accelerate(m, backend="torch", example_inputs=torch.randn(1, 24, 32, 32))
    layer = fast[0]
    assert isinstance(layer, FastDWConv) and layer.padding == "same"
    layer.backend = "emu"  # the kernels' host emulation on CPU inputs (MODULE_BACKENDS)
    layer.dispatcher().reps, layer.dispatcher().warmup = 1, 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a dropped candidate warns: make it fail here
        for size in (33, 32, 34):  # pads (1, 1), (0, 1), (0, 1): symmetric and uneven
            x = torch.randn(2, 24, size, size + 1)
            with torch.no_grad():
                ref, got = m(x), fast(x)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            for name in ("direct", "dr"):  # each kernel itself, not only the one the timing chose
                with torch.no_grad():
                    torch.testing.assert_close(layer.run_kernel(name, x.contiguous(memory_format=torch.channels_last)),
                                               layer.dense(x), rtol=1e-4, atol=1e-4)
    table = kernel_choices(fast)
    assert len(table) == 3, table
    for choice in table.values():
        assert not choice["dropped"], choice["dropped"]
        assert set(choice["timings"]) == {"dense", "direct", "dr"}, choice
