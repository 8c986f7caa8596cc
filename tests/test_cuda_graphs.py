"""CUDA-graph plumbing, checked on the CPU with a stand-in capture: one capture per input signature,
replays thereafter, eager fallback with one warning, and the report. (Real capture and replay are in the
cuda-marked tests.)"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from deprune_plugin import accelerate
from deprune_plugin.accel import AccelerateConfig
from deprune_plugin.accel.graphs import Captured, CUDAGraphModel


class Recorder:
    """Stands in for capture_cuda_graph: 'replay' reruns the model on the static inputs."""

    def __init__(self, fail: bool = False) -> None:
        self.captures = 0
        self.replays = 0
        self.fail = fail

    def __call__(self, model, args):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        static = [a.clone() for a in args]
        holder = {}

        def replay():
            self.replays += 1
            holder["out"].copy_(model(*static))
        holder["out"] = model(*static)
        return Captured(static, holder["out"], replay)


def _cuda_looking(monkeypatch):
    """Make CPU tensors pass the wrapper's 'all inputs on CUDA' test."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


def test_one_capture_per_signature_then_replays(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    rec = Recorder()
    g = CUDAGraphModel(model, capture=rec)
    _cuda_looking(monkeypatch)
    a, b, c = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        for x in (a, b, c, a):
            torch.testing.assert_close(g(x), model(x))  # replays compute from the copied-in input
    assert rec.captures == 2 and rec.replays == 4
    assert sorted(g.status.values()) == ["captured", "captured"]
    out1 = g(a)
    g(b)
    assert torch.equal(out1, model(a))  # an output handed out is not overwritten by the next replay


def test_failed_capture_runs_eagerly_warns_once_and_is_not_retried(monkeypatch):
    model = nn.Conv2d(3, 4, 1).eval()
    rec = Recorder(fail=True)
    g = CUDAGraphModel(model, capture=rec)
    _cuda_looking(monkeypatch)
    x = torch.randn(1, 3, 4, 4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(g(x), model(x))
    assert len([m for m in w if "CUDA graph not used" in str(m.message)]) == 1
    (status,) = g.status.values()
    assert status.startswith("eager: capture failed: RuntimeError: operation not permitted")


def test_cpu_inputs_and_grad_run_eagerly():
    model = nn.Linear(3, 2)
    rec = Recorder()
    g = CUDAGraphModel(model, capture=rec)
    with pytest.warns(RuntimeWarning, match="not all CUDA"):
        y = g(torch.randn(2, 3))
    assert rec.captures == 0 and y.shape == (2, 2) and g.get_parameter("model.weight") is model.weight
    assert g.in_features == 3  # attributes reach the wrapped model


def test_accelerate_option_on_cpu_is_ignored_with_a_warning_and_reported():
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.BatchNorm2d(3)).eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fast = accelerate(m, backend="torch", config=AccelerateConfig(cuda_graphs=True))
    assert not isinstance(fast, CUDAGraphModel)
    assert any("cuda_graphs=True needs a model on a CUDA device" in str(x.message) for x in w)
    assert any("cuda_graphs ignored" in c for c in fast.deprune_report.checks)
