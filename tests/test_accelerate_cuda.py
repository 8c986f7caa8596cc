"""accelerate() on a real GPU: kernel choices checked and reported, state-dict round trip of the choices,
CUDA-graph capture and replay. Skipped without CUDA and CuPy."""
from __future__ import annotations

import copy

import pytest
import torch

from deprune_plugin import DEPruner, accelerate
from deprune_plugin.accel import AccelerateConfig, FastDWConv
from deprune_plugin.accel.graphs import CUDAGraphModel
from deprune_plugin.core.zoo import build_model, classifier_of

from cuda_env import CUDA_MARKS

pytestmark = CUDA_MARKS


def _pruned(dtype=torch.float16):
    m = build_model("timm", "mobilenetv2_100", num_classes=10)
    x = torch.randn(2, 3, 96, 96)
    DEPruner(m, x, dw_pruning_ratio=0.78, pw_pruning_ratio=0.5, ignored_layers=[classifier_of(m)]).step()
    return m.eval().cuda().to(dtype)


def test_kernels_are_chosen_checked_and_reported():
    m = _pruned()
    x = torch.randn(4, 3, 96, 96, device="cuda", dtype=torch.float16)
    fast = accelerate(m, backend="cupy", example_inputs=x, config=AccelerateConfig(fuse_pairs=False))
    rep = fast.deprune_report
    assert rep.backend == "cupy" and len(rep.kernels) == 17, str(rep)
    assert all(k["name"] in {"dense", "direct", "dr"} and k["name"] in k["timings"] for k in rep.kernels.values())
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(fast(x).float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_choices_survive_the_state_dict():
    m = _pruned()
    x = torch.randn(2, 3, 96, 96, device="cuda", dtype=torch.float16)
    fast = accelerate(m, backend="cupy", example_inputs=x, config=AccelerateConfig(fuse_pairs=False))
    other = accelerate(copy.deepcopy(m), backend="torch", example_inputs=x)  # no choices made
    for mod in other.modules():
        if isinstance(mod, FastDWConv):
            mod.backend = "cupy"
    other.load_state_dict(fast.state_dict())
    a = [mod.choices for mod in fast.modules() if isinstance(mod, FastDWConv)]
    b = [mod.choices for mod in other.modules() if isinstance(mod, FastDWConv)]
    assert a == b and all(len(c) >= 1 for c in a)


@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_graph_capture_and_replay(batch):
    m = _pruned()
    x = torch.randn(batch, 3, 96, 96, device="cuda", dtype=torch.float16)
    fast = accelerate(m, backend="cupy", example_inputs=x, config=AccelerateConfig(cuda_graphs=True))
    assert isinstance(fast, CUDAGraphModel)
    with torch.no_grad():
        for seed in (1, 2):
            xs = torch.randn(batch, 3, 96, 96, device="cuda", dtype=torch.float16, generator=None)
            torch.manual_seed(seed)
            ref = m(xs)
            torch.testing.assert_close(fast(xs).float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert list(fast.deprune_report.cuda_graphs.values()) == ["captured"]
