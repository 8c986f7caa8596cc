"""dw_direct / dw_dr on a real GPU through CuPy: results vs F.conv2d, streams, CUDA-graph capture.

Skipped unless torch sees a CUDA device and CuPy imports and sees it too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deprune_plugin.core.precision import no_tf32
from deprune_plugin.kernels.formats import CompactTaps, DRColumns
from deprune_plugin.kernels import dw_direct, dw_dr

from cuda_env import CUDA_MARKS

pytestmark = CUDA_MARKS

ACT_FNS = {"identity": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu,
           "hardswish": F.hardswish, "gelu": F.gelu}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _problem(n, c, h, w, k, density, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    weight = torch.randn(c, 1, k, k, generator=g) / k
    mask = torch.rand(c, 1, k, k, generator=g) < density
    mask[::7] = False  # some fully pruned channels
    bias = torch.randn(c, generator=g)
    x = x.cuda()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, weight.cuda(), mask.cuda(), bias.cuda()


def _run(kind, x, weight, mask, bias, **conv):
    if kind == "direct":
        fmt = CompactTaps.from_dense(weight, mask)
        return dw_direct(x, fmt, bias, backend="cupy", **conv), fmt.to_dense()
    fmt = DRColumns.from_dense(weight, mask)
    return dw_dr(x, fmt, bias, backend="cupy", **conv), fmt.to_dense()


def _reference(x, dense, bias, act="identity", stride=1, padding=0, dilation=1):
    with no_tf32():  # cuDNN may run an fp32 conv in TF32 (on by default): ~1e-3 error, over the fp32 tolerance
        y = F.conv2d(x.float(), dense, bias, stride, padding, dilation, groups=x.shape[1])
    return ACT_FNS[act](y)


def _assert_close(y, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)  # the reference without TF32; FMA contraction
    else:
        torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind", ["direct", "dr"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("geom", [
    dict(n=4, c=144, h=28, w=28, k=3, stride=1, padding=1, dilation=1, act="relu6"),
    dict(n=2, c=96, h=56, w=56, k=7, stride=2, padding=3, dilation=1, act="gelu"),
    dict(n=3, c=40, h=17, w=23, k=5, stride=2, padding=4, dilation=2, act="hardswish"),
], ids=["k3", "k7-s2", "k5-s2-d2"])
def test_matches_conv2d(kind, layout, dtype, geom):
    dt = DTYPES[dtype]
    g = dict(geom)
    act = g.pop("act")
    conv = {key: g.pop(key) for key in ("stride", "padding", "dilation")}
    x, weight, mask, bias = _problem(density=0.45, dtype=dt, channels_last=layout == "nhwc", **g)
    y, dense = _run(kind, x, weight, mask, bias, act=act, **conv)
    torch.cuda.synchronize()
    assert y.dtype == dt and y.is_cuda
    assert y.is_contiguous(memory_format=torch.channels_last) if layout == "nhwc" else y.is_contiguous()
    _assert_close(y, _reference(x, dense, bias, act, **conv), dt)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_large_window_uses_opt_in_shared_memory(layout):
    # 41x41 needs more than 48 KB of halo tile in channels_last even at the smallest tile
    x, weight, mask, bias = _problem(1, 16, 64, 64, 41, 0.2, torch.float16, layout == "nhwc")
    y, dense = _run("direct", x, weight, mask, bias, padding=20)
    _assert_close(y, _reference(x, dense, bias, padding=20), torch.float16)


@pytest.mark.parametrize("kind", ["direct", "dr"])
def test_runs_on_the_current_torch_stream(kind):
    x, weight, mask, bias = _problem(8, 64, 32, 32, 3, 0.5, torch.float16, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y, dense = _run(kind, x, weight, mask, bias, padding=1)
        ref = _reference(x, dense, bias, padding=1)
    torch.cuda.current_stream().wait_stream(side)
    _assert_close(y, ref, torch.float16)


@pytest.mark.parametrize("kind", ["direct", "dr"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cuda_graph_capture_and_replay(kind, layout):
    x, weight, mask, bias = _problem(2, 72, 20, 20, 5, 0.4, torch.float16, layout == "nhwc")
    fmt = CompactTaps.from_dense(weight, mask) if kind == "direct" else DRColumns.from_dense(weight, mask)
    fn = dw_direct if kind == "direct" else dw_dr

    def step(inp):
        return fn(inp, fmt, bias, stride=2, padding=2, act="silu", backend="cupy")

    static_in = x.clone(memory_format=torch.preserve_format)
    step(static_in)  # warm-up: compiles and loads the module before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_in)
    for seed in (1, 2):
        new_x, *_ = _problem(2, 72, 20, 20, 5, 0.4, torch.float16, layout == "nhwc", seed=seed)
        static_in.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(static_out, _reference(new_x, fmt.to_dense(), bias, "silu", 2, 2), torch.float16)
