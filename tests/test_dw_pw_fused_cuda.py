"""cuda/dw_pw_fused.cu on a real GPU through CuPy: the emulation tests' cases against the unfused pair, on the
current torch stream, under CUDA-graph capture; and accelerate() choosing between the fused and the unfused
pair by measurement. Skipped unless torch sees a CUDA device and CuPy imports and sees it too."""
from __future__ import annotations

import pytest
import torch

from deprune_plugin import DEPruner, accelerate
from deprune_plugin.accel import AccelerateConfig
from deprune_plugin.accel.fused import FusedDSConv, ResidualPair
from deprune_plugin.core.zoo import build_model, classifier_of
from deprune_plugin.kernels import CompactTaps, dw_pw_fused
from deprune_plugin.kernels.dw_pw_fused import fused_tap_tables

from cuda_env import CUDA_MARKS
from test_dw_pw_fused_emulation import CASES, DTYPES, fuzz_cases, make, reference

pytestmark = CUDA_MARKS


def _to_cuda(t: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in t.items()}


def formats(t: dict) -> dict:
    """Everything a launch needs that takes host syncs to build (``CompactTaps``: ``nonzero``, ``.cpu()``;
    the fused tap tables: ``repeat_interleave``; the 1x1 weight in the storage dtype), built once, before any
    CUDA-graph capture, as ``accelerate()`` builds its formats at conversion time."""
    taps = CompactTaps.from_dense(t["weight"], t["keep"])
    fused_tap_tables(taps, 16 // t["x"].element_size())  # cached on taps: the launch finds them
    return {"taps": taps, "pw": t["pw"].to(t["x"].dtype)}


def launch(t: dict, fmt: dict, backend: str = "cupy") -> torch.Tensor:
    """One fused launch from prebuilt formats: what a CUDA graph captures (nothing here syncs with the host;
    tests/test_graph_capture_safety.py runs it on the CPU under a guard that raises on host syncs)."""
    return dw_pw_fused(t["x"], fmt["taps"], t["dw_bias"], fmt["pw"], t["pw_bias"], stride=t["stride"],
                       padding=t["pads"], dilation=t["dilation"], act=t["act"], residual=t["res"], backend=backend)


def _run(t: dict) -> torch.Tensor:
    return launch(t, formats(t))


def _check(t: dict) -> None:
    y = _run(t)
    ref = reference({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in t.items()}).cuda()
    if t["x"].dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(y.float(), ref.to(t["x"].dtype).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_unfused_pair(name, dtype):
    n, c, co, h, w, k, s, res, act = CASES[name]
    if DTYPES[dtype] == torch.float32 and c % 4 or DTYPES[dtype] != torch.float32 and c % 8:
        pytest.skip("C not a multiple of the vector")
    _check(_to_cuda(make(n, c, co, h, w, k, stride=s, act=act, residual=res, dtype=DTYPES[dtype])))


def test_fuzz_sample_on_the_gpu():
    for kw in fuzz_cases(200, seed=99):
        _check(_to_cuda(make(**kw)))


def test_mobilenetv2_pair_at_batch_32():
    _check(_to_cuda(make(32, 144, 12, 56, 56, 3, residual=True, density=2 / 9)))


def test_runs_on_the_current_stream_and_under_graph_capture():
    t = _to_cuda(make(8, 96, 24, 28, 28, 3, residual=True))
    expected = _run(t)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = _run(t)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, expected)
    fmt = formats(t)  # host syncs (nonzero, .cpu(), int(tensor)) are forbidden while a stream captures
    launch(t, fmt)    # warm-up outside capture: compiles and loads the module
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch(t, fmt)
    t["x"].copy_(t["x"].flip(0))
    graph.replay()
    torch.testing.assert_close(out, _run(t))


def _pruned_mbv2():
    m = build_model("timm", "mobilenetv2_100", num_classes=10)
    x = torch.randn(2, 3, 96, 96)
    DEPruner(m, x, dw_pruning_ratio=0.78, pw_pruning_ratio=0.5, ignored_layers=[classifier_of(m)]).step()
    return m.eval().cuda().half()


@pytest.mark.parametrize("graphs", [False, True])
def test_accelerate_fuses_every_pair_checks_and_times_both(graphs):
    m = _pruned_mbv2()
    x = torch.randn(8, 3, 96, 96, device="cuda", dtype=torch.float16)
    fast = accelerate(m, backend="cupy", example_inputs=x, config=AccelerateConfig(cuda_graphs=graphs))
    rep = fast.deprune_report
    fused = [e for e in rep.entries if e.action == "fused"]
    assert len([e for e in fused if "paired with" in e.detail]) == 17, str(rep)
    assert len([e for e in fused if "residual add" in e.detail]) == 10, str(rep)
    pairs = [mod for mod in fast.modules() if isinstance(mod, FusedDSConv)]
    assert len(pairs) == 17 and sum(isinstance(mod, ResidualPair) for mod in fast.modules()) == 10
    with torch.no_grad():
        ref = m(x)
        for _ in range(2):  # the second call replays the graph
            torch.testing.assert_close(fast(x).float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    for pair in pairs:
        (choice,) = pair.dispatcher().cache.values()
        assert not choice.dropped and set(choice.timings) == {"unfused", "fused"}, (pair.label, choice)
    if graphs:
        assert list(rep.cuda_graphs.values()) == ["captured"]
