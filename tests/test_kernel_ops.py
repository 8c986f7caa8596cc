"""The kernels as torch.library custom ops: schema/fake checks, the reference implementation, and an
accelerated model whose layers chose kernels compiling in one graph (torch.compile fullgraph, torch.export)."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from deprune_plugin.accel import FastDWConv
from deprune_plugin.kernels import ops  # noqa: F401 - registers torch.ops.deprune
from deprune_plugin.kernels.dispatch import dispatch_key
from deprune_plugin.kernels.formats import CompactTaps, DRColumns
from zoo_models import pruned_accelerated


def _problem(channels_last: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 40, 9, 11, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(40, 1, 3, 3, generator=g)
    keep = torch.rand(40, 1, 3, 3, generator=g) < 0.5
    return x, w * keep, keep, torch.randn(40, generator=g)


@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_implementations_match_conv2d_with_asymmetric_padding(channels_last):
    x, w, keep, b = _problem(channels_last)
    pad, stride, dil = [0, 1, 1, 2], [2, 1], [1, 2]  # top, bottom, left, right
    ref = F.relu6(F.conv2d(F.pad(x, (1, 2, 0, 1)), w, b, stride, 0, dil, 40))
    t = CompactTaps.from_dense(w, keep)
    y = torch.ops.deprune.dw_direct(x, t.tap_ptr, t.tap_idx, t.tap_val, b, [3, 3], stride, pad, dil, "relu6")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    c = DRColumns.from_dense(w, keep)
    y2 = torch.ops.deprune.dw_dr(x, c.col_ptr, c.col_chan, c.col_tap, c.col_val, c.col_kept, b, [3, 3], 32, 32,
                                 stride, pad, dil, "relu6")
    torch.testing.assert_close(y2, ref, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_schema_fake_and_dispatch(channels_last):
    x, w, keep, b = _problem(channels_last)
    t = CompactTaps.from_dense(w, keep)
    torch.library.opcheck(torch.ops.deprune.dw_direct.default,
                          (x, t.tap_ptr, t.tap_idx, t.tap_val, b, [3, 3], [1, 2], [1, 1, 0, 2], [1, 1], "silu"))
    c = DRColumns.from_dense(w, keep)
    torch.library.opcheck(torch.ops.deprune.dw_dr.default,
                          (x, c.col_ptr, c.col_chan, c.col_tap, c.col_val, c.col_kept, None, [3, 3], 32, 32, [1, 1],
                           [1, 1, 1, 1], [1, 1], "identity"))


def _accelerated_with_choices(kernel: str):
    """A small pruned model, accelerated, whose DW layers use ``kernel`` for the test input's signature."""
    m, fast, x = pruned_accelerated("mobilenetv3_small_050", pw_pruning_ratio=0.0)
    x = torch.cat([x, torch.randn_like(x)])  # batch 2: the tests' signature, not the example's
    sizes = {}
    def record(mod, args):
        sizes.setdefault(mod, dispatch_key(args[0]))
    hooks = [mod.register_forward_pre_hook(record) for mod in fast.modules() if isinstance(mod, FastDWConv)]
    with torch.no_grad():
        fast(x)
    for h in hooks:
        h.remove()
    for mod, key in sizes.items():
        mod.backend = "emu"
        mod.choices = {key: kernel}  # as if selected ahead of time
    return m, fast, x


@pytest.mark.parametrize("kernel", ["direct", "dr"])
def test_compiled_model_holds_the_chosen_kernels_in_one_graph(kernel):
    m, fast, x = _accelerated_with_choices(kernel)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-4 * m(x).abs().max().item())
    ep = torch.export.export(fast, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    n_dw = sum(isinstance(mod, FastDWConv) for mod in fast.modules())
    assert sum(f"deprune.dw_{kernel}" in t for t in targets) == n_dw, targets
    torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-4, atol=1e-4 * m(x).abs().max().item())


def test_without_a_choice_for_the_signature_the_graph_uses_the_dense_conv():
    _, fast, x = _accelerated_with_choices("direct")
    ep = torch.export.export(fast, (x[:1, :, :40, :40],))  # another signature: no kernel chosen for it
    assert not any("deprune" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")
