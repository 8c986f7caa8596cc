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
from deprune_plugin.accel.fused import FusedDSConv, ResidualPair, plan_pair_edits, plan_residual_edits
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
    out = F.conv2d(y, pw_weight.float().reshape(pw_weight.shape[0], -1, 1, 1), pw_bias) + (1.0 if wrong else 0.0)
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


def _fuse(fast, x, residual: bool = False):
    """Apply every pair edit (and, with ``residual``, every residual-block edit) to ``fast``."""
    for e in plan_pair_edits(fast, x)[0]:
        e.apply(fast)
    if residual:
        for e in plan_residual_edits(fast, x):
            e.apply(fast)


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


# ---- residual blocks --------------------------------------------------------------------------------

def test_residual_blocks_become_residual_pairs_and_keep_the_output(fake_fused_kernel):
    """MobileNetV2's 10 inverted residuals with a skip: the expansion conv (BN folded) and ReLU6 chain into
    the pair, the add moves into the pair; the 7 blocks without a skip stay as they are."""
    m, fast, x = _accelerated()
    _fuse(fast, x)
    blocks = plan_residual_edits(fast, x)
    assert [e.name for e in blocks] == ["blocks.1.1", "blocks.2.1", "blocks.2.2", "blocks.3.1", "blocks.3.2",
                                        "blocks.3.3", "blocks.4.1", "blocks.4.2", "blocks.5.1", "blocks.5.2"]
    inputs, _ = check_inputs(m, (x,))
    verdict = verify_edits(fast, blocks, inputs)
    assert len(verdict.kept) == 10 and not verdict.reverted
    block = fast.blocks[2][1]
    assert isinstance(block, ResidualPair) and isinstance(block.pair, FusedDSConv)
    assert [type(c).__name__ for c in block.chain] == ["Conv2d", "ReLU6"]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-4, atol=1e-4)


def test_a_block_whose_output_is_not_pair_plus_input_is_left_alone(fake_fused_kernel):
    """The same chain -> pair structure without the add (timm's has_skip off), and a block that adds its input
    twice: neither output is the pair's output plus the block's input."""
    _, fast, x = _accelerated()
    _fuse(fast, x)
    fast.blocks[1][1].has_skip = False
    fast.blocks[2][1].register_forward_hook(lambda mod, args, out: out + args[0])
    names = [e.name for e in plan_residual_edits(fast, x)]
    assert "blocks.1.1" not in names and "blocks.2.1" not in names and "blocks.2.2" in names


def test_the_real_fused_kernel_in_emulation_runs_every_pair_of_a_pruned_mobilenetv2():
    """No stand-in: every DW+PW pair of a pruned MobileNetV2 (10 of them with their residual add in the
    epilogue) through cuda/dw_pw_fused.cu's host emulation, checked by the pair's own dispatcher against the
    unfused pair, and the whole model against the source model."""
    from deprune_plugin.kernels import emulation_available
    if not emulation_available()[0]:
        pytest.skip("host emulation unavailable")
    m, fast, x = _accelerated()
    _fuse(fast, x, residual=True)
    _use_kernels(fast)
    pairs = [mod for mod in fast.modules() if isinstance(mod, FusedDSConv)]
    for pair in pairs:
        d = pair.dispatcher()
        d.reps, d.warmup, d.calls_per_sample = 1, 0, 1
    with torch.no_grad():
        y = fast(x)
    torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-4)
    assert len(pairs) == 17
    for pair in pairs:
        (choice,) = pair.dispatcher().cache.values()
        assert not choice.dropped and set(choice.timings) == {"unfused", "fused"}, pair.label


def test_the_fused_launch_is_planned_once_per_signature(monkeypatch):
    """After the first fused call of a signature (x's and the residual's), a call runs the captured launch:
    the launcher is not called again, and the result is the launcher's."""
    from deprune_plugin.kernels import emulation_available
    if not emulation_available()[0]:
        pytest.skip("host emulation unavailable")
    m, fast, x = _accelerated()
    _fuse(fast, x, residual=True)
    _use_kernels(fast)
    block = fast.blocks[2][1]
    pair = block.pair
    pair.choices = {}
    pair._dispatcher = KernelDispatcher({"fused": lambda t, mod, r=None: mod.run_fused(t, r)})  # fused only
    calls = []
    real = kernels_pkg.dw_pw_fused
    monkeypatch.setattr(kernels_pkg, "dw_pw_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = []
    handle = block.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        fast(x)  # the pair's first call of this signature: the launcher runs, its launch is planned
    handle.remove()
    n_first = len(calls)
    inp = block.chain(seen[0])
    res = torch.randn(1, pair.pw_weight.shape[0], *inp.shape[2:]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        first = pair(inp, res)
        again = pair(inp, res)
        other = pair(inp, 2 * res)  # same signature, another residual: the plan takes it per call
    assert n_first >= 1 and len(calls) == n_first  # no launcher call after the first
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(other - first, res, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first, pair.unfused(inp, res), rtol=1e-4, atol=1e-4)
    assert len(pair._calls) == 1


def test_pair_choices_travel_in_the_state_dict_and_a_load_drops_stale_operands(fake_fused_kernel):
    m, fast, x = _accelerated()
    _fuse(fast, x)
    _use_kernels(fast)
    pair = fast.blocks[1][0].conv_dw
    pair.dispatcher().reps, pair.dispatcher().warmup, pair.dispatcher().calls_per_sample = 1, 0, 1
    with torch.no_grad():
        fast(x)
    assert len(pair.choices) == 1
    state = fast.state_dict()
    rows = state["blocks.1.0.conv_dw.pair_choices"]
    assert rows.dtype == torch.int64 and rows.shape == (1, 9)

    _, other, _ = _accelerated()
    edits, _ = plan_pair_edits(other, x)
    for e in edits:
        e.apply(other)
    twin = other.blocks[1][0].conv_dw
    ops = twin._pw_operands(x)  # cached before the load: must not survive it
    assert not torch.equal(ops[0], pair.pw_weight.reshape(pair.pw_weight.shape[0], -1))  # other random weights
    other.load_state_dict(state)
    assert twin.choices == pair.choices
    torch.testing.assert_close(twin._pw_operands(x)[0], pair.pw_weight.reshape(pair.pw_weight.shape[0], -1))
    twin.pw_weight.mul_(2)  # an in-place write is noticed too
    torch.testing.assert_close(twin._pw_operands(x)[0], 2 * pair.pw_weight.reshape(pair.pw_weight.shape[0], -1))
