"""DW+PW fused pairs: which pairs are found (and why the others are not), the pair module's two candidates
checked against each other, and the report. The fused kernel itself is stood in for by a reference here;
its emulation tests live with the kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deprune_plugin import kernels as kernels_pkg
from deprune_plugin.accel import FastDWConv
from deprune_plugin.accel.fused import FusedDSConv, plan_pair_edits
from deprune_plugin.accel.selfcheck import check_inputs, verify_edits
from deprune_plugin.kernels.activations import apply_activation
from deprune_plugin.kernels.dispatch import KernelDispatcher
from zoo_models import pruned_accelerated


def reference_fused(x, taps, dw_bias, pw_weight, pw_bias, *, stride, padding, dilation, act, backend,
                    wrong=False):
    top, bottom, left, right = padding
    y = F.conv2d(F.pad(x.float(), (left, right, top, bottom)), taps.to_dense(), dw_bias, stride, 0, dilation,
                 x.shape[1])
    y = apply_activation(act, y)
    out = F.conv2d(y, pw_weight.float(), pw_bias) + (1.0 if wrong else 0.0)
    return out.to(x.dtype).contiguous(memory_format=torch.channels_last)


def _accelerated(name="mobilenetv2_050", se=False):
    return pruned_accelerated("mobilenetv3_small_050" if se else name, pw_pruning_ratio=0.25)


def _use_kernels(fast):
    """Kernel path on: DW layers run dense (their own kernels are tested elsewhere), pairs choose between
    the unfused pair and the stand-in fused kernel."""
    for mod in fast.modules():
        if isinstance(mod, FastDWConv):
            mod.backend = "emu"
            mod.choices = {}
            mod._dispatcher = KernelDispatcher({"dense": lambda x, m: m.dense(x)}, reps=1, warmup=0)


@pytest.fixture
def fake_fused_kernel(monkeypatch):
    calls = []

    def fused(*args, **kw):
        calls.append(1)
        return reference_fused(*args, **kw)
    monkeypatch.setattr(kernels_pkg, "dw_pw_fused", fused, raising=False)
    return calls


def test_every_mobilenetv2_dw_pairs_with_its_projection(fake_fused_kernel):
    m, fast, x = _accelerated()
    edits, unfused = plan_pair_edits(fast, x)
    assert len(edits) == 17 and not unfused
    names = {e.name: e.entry.detail for e in edits}
    assert names["blocks.1.0.conv_dw"].startswith("paired with blocks.1.0.conv_pwl")
    inputs, _ = check_inputs(m, (x,))
    _use_kernels(fast)
    for e in edits:
        pair = e.swaps[0][1]
        pair.dispatcher().reps, pair.dispatcher().warmup, pair.dispatcher().calls_per_sample = 1, 0, 1
    verdict = verify_edits(fast, edits, inputs)
    assert len(verdict.kept) == 17 and not verdict.reverted
    pair = fast.blocks[1][0].conv_dw
    assert isinstance(pair, FusedDSConv) and type(fast.blocks[1][0].conv_pwl) is nn.Identity
    assert fake_fused_kernel, "the fused candidate never ran"
    choice = next(iter(pair.dispatcher().cache.values()))
    assert set(choice.timings) == {"unfused", "fused"} and not choice.dropped


def test_a_wrong_fused_kernel_is_dropped_by_the_pair_check(monkeypatch):
    monkeypatch.setattr(kernels_pkg, "dw_pw_fused", lambda *a, **k: reference_fused(*a, **k, wrong=True),
                        raising=False)
    _, fast, x = _accelerated()
    edits, _ = plan_pair_edits(fast, x)
    _use_kernels(fast)
    edits[0].apply(fast)
    pair = fast.get_submodule(edits[0].name)
    with pytest.warns(RuntimeWarning, match="'fused'.*dropped: disagrees"):
        with torch.no_grad():
            fast(x)
    choice = next(iter(pair.dispatcher().cache.values()))
    assert choice.name == "unfused" and "disagrees with unfused" in choice.dropped["fused"]


def test_se_blocks_are_left_unfused_with_the_reason(fake_fused_kernel):
    _, fast, x = _accelerated(se=True)
    edits, unfused = plan_pair_edits(fast, x)
    reasons = {e.name: e.detail for e in unfused}
    assert "blocks.0.0.conv_dw" in reasons and "se.conv_reduce" in reasons["blocks.0.0.conv_dw"]
    assert "SE block" in reasons["blocks.0.0.conv_dw"]
    assert {e.name for e in edits}.isdisjoint(reasons)
