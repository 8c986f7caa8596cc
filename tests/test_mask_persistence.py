"""Pruned taps stay exactly zero through training, channel removal, saving, copying, casting and DDP."""
from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp

from deprune_plugin import DEPruner, remove_tap_masks
from deprune_plugin.core.masks import masked_convs, tap_mask
from deprune_plugin.tp_glue.serialization import load, save

X = torch.randn(4, 3, 32, 32)


def pruned_model(name="mobilenetv2_050", **kw):
    m = timm.create_model(name, pretrained=False, num_classes=10)
    p = DEPruner(m, X, dw_pruning_ratio=0.6, pw_pruning_ratio=0.3, ignored_layers=[m.get_classifier()], **kw)
    p.step()
    return m, p


def pruned_taps_are_zero(m) -> bool:
    convs = list(masked_convs(m))
    return bool(convs) and all((c.weight[~tap_mask(c)] == 0).all() for _, c in convs)


def kept_taps_nonzero(m) -> bool:
    return all((c.weight[tap_mask(c)] != 0).all() for _, c in masked_convs(m))


def train_steps(m, opt, n=3):
    m.train()
    for _ in range(n):
        opt.zero_grad()
        nn.functional.cross_entropy(m(X), torch.randint(0, 10, (4,))).backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=1e-4),
    lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-4),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3),
], ids=["sgd", "adam", "adamw"])
def test_finetuning_keeps_pruned_taps_zero(make_opt):
    m, _ = pruned_model()
    before = {n: c.weight.detach().clone() for n, c in masked_convs(m)}
    train_steps(m, make_opt(m.parameters()))
    assert pruned_taps_are_zero(m)  # checked right after optimizer.step, before any forward
    changed = [not torch.equal(before[n], c.weight) for n, c in masked_convs(m)]
    assert all(changed) and kept_taps_nonzero(m)


def test_later_torch_pruning_channel_removal_shrinks_masks():
    m, _ = pruned_model()
    dw = m.blocks[2][0].conv_dw
    old_w, old_mask = dw.weight.detach().clone(), tap_mask(dw).clone()
    # plain torch-pruning, knowing nothing of masks, removes hidden channels
    pruner = tp.pruner.MetaPruner(m, X, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.25, ignored_layers=[m.get_classifier()])
    pruner.step()
    assert dw.weight.shape[0] < old_w.shape[0]
    m.eval()
    m(X)
    assert tap_mask(dw).shape == dw.weight.shape
    # the surviving channels keep exactly their old masks
    kept, j = [], 0  # torch-pruning keeps channel order: match surviving rows in sequence
    for w in dw.weight:
        while not torch.equal(old_w[j], w):
            j += 1
        kept.append(j)
        j += 1
    assert len(kept) == dw.weight.shape[0]
    assert torch.equal(tap_mask(dw), old_mask[kept])
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    train_steps(m, opt)
    assert pruned_taps_are_zero(m)


def test_state_dict_into_freshly_pruned_model_and_rebuildable_file(tmp_path):
    torch.manual_seed(0)
    m, p = pruned_model()
    # lr 1e-4: at 0.01 a randomly initialised MobileNetV2 (pruned or not) occasionally diverges to NaN in
    # three steps (1 of 80 seeds unpruned; its gradients are in the thousands), and NaN != NaN would fail
    # the exact comparisons below.
    train_steps(m, torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9))
    m.eval()
    y = m(X)
    assert torch.isfinite(y).all()
    fresh, _ = pruned_model()  # same architecture and pruning, other weights
    fresh.load_state_dict(m.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(X), y, rtol=0, atol=0)
    path = tmp_path / "m.pt"
    save(m, path, history=p.pruning_history(), input_shape=(1, 3, 32, 32),
         arch={"source": "timm", "name": "mobilenetv2_050", "kwargs": {"num_classes": 10}})
    torch.load(path, weights_only=True)  # the rebuildable format is weights-only safe
    loaded = load(path)
    loaded.eval()
    torch.testing.assert_close(loaded(X), y, rtol=0, atol=0)
    train_steps(loaded, torch.optim.Adam(loaded.parameters(), lr=1e-3))
    assert pruned_taps_are_zero(loaded)


def test_torch_save_load_deepcopy_and_casts(tmp_path):
    m, _ = pruned_model()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(m)):
        train_steps(other, torch.optim.SGD(other.parameters(), lr=0.01, momentum=0.9))
        assert pruned_taps_are_zero(other)
    half = copy.deepcopy(m).to(torch.float64)
    assert all(tap_mask(c).dtype == torch.bool for _, c in masked_convs(half))
    train_steps(half.float(), torch.optim.SGD(half.parameters(), lr=0.01))
    assert pruned_taps_are_zero(half)


def test_dense_weights_loaded_over_a_pruned_model_cannot_revive_taps():
    m, _ = pruned_model()
    sd = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    m.eval()
    m(X)
    assert pruned_taps_are_zero(m)


def test_remove_tap_masks_makes_a_plain_model():
    m, _ = pruned_model()
    n = remove_tap_masks(m)
    assert n > 0 and not list(masked_convs(m))
    assert not any(k.endswith("dw_tap_mask") for k in m.state_dict())
    assert m(X).shape == (4, 10)


def test_two_forwards_then_one_backward():
    """Two-view / consistency losses: the weights must not change between the forwards."""
    m, _ = pruned_model()
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        opt.zero_grad()
        loss = m(X).square().mean() + m(torch.flip(X, dims=[3])).square().mean()
        loss.backward()
        opt.step()
    assert pruned_taps_are_zero(m) and kept_taps_nonzero(m)


class TwiceDW(nn.Module):
    """One depth-wise conv applied twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.pw2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.pw2(self.dw(torch.relu(self.dw(self.pw1(x)))))


def test_a_depthwise_conv_used_twice_trains_and_keeps_zeros():
    m = TwiceDW()
    DEPruner(m, torch.randn(2, 3, 8, 8), dw_pruning_ratio=0.5, pw_pruning_ratio=0.0, variant="plain").step()
    keep = tap_mask(m.dw)
    assert int((~keep).sum()) == 72  # floor(0.5 * 16 * 9)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(2, 3, 8, 8)).sum().backward()
        assert (m.dw.weight.grad[~keep] == 0).all() and (m.dw.weight.grad[keep] != 0).any()
        opt.step()
    assert (m.dw.weight[~keep] == 0).all()


def test_functional_call_leaves_the_callers_tensors_untouched():
    m, _ = pruned_model()
    m.eval()
    params = {k: torch.randn_like(v) for k, v in m.named_parameters()}  # dense: pruned taps non-zero
    given = {k: v.clone() for k, v in params.items()}
    own = {k: v.detach().clone() for k, v in m.named_parameters()}
    y = torch.func.functional_call(m, params, (X,))
    assert all(torch.equal(params[k], given[k]) for k in params), "functional_call wrote into the caller's tensors"
    assert all(torch.equal(v, own[k]) for k, v in m.named_parameters())
    y_again = torch.func.functional_call(m, given, (X,))
    torch.testing.assert_close(y, y_again, rtol=0, atol=0)  # the given tensors are what ran
    assert pruned_taps_are_zero(m)


@pytest.mark.parametrize("ema_cls", ["ModelEmaV2", "ModelEmaV3"])
def test_timm_ema_copy_keeps_pruned_taps_zero(ema_cls):
    import timm.utils

    m, _ = pruned_model()
    ema = getattr(timm.utils, ema_cls)(m, decay=0.9)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05)
    m.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(m(X), torch.randint(0, 10, (4,))).backward()
        opt.step()
        ema.update(m)
    assert pruned_taps_are_zero(ema.module) and pruned_taps_are_zero(m)
    moved = [not torch.equal(c.weight, e.weight) for (_, c), (_, e) in zip(masked_convs(m), masked_convs(ema.module))]
    assert any(moved)  # the EMA really averaged (it is not a copy of the model)
    # the EMA copy itself can be fine-tuned: its replaced Parameters get the gradient mask again
    train_steps(ema.module, torch.optim.SGD(ema.module.parameters(), lr=0.01, momentum=0.9))
    assert pruned_taps_are_zero(ema.module)


def test_dense_weights_loaded_with_assign_are_masked_and_hooked():
    m, _ = pruned_model()
    sd = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    assert pruned_taps_are_zero(m)  # right after loading, before any forward
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt.zero_grad()
    nn.functional.cross_entropy(m(X), torch.randint(0, 10, (4,))).backward()
    assert all((c.weight.grad[~tap_mask(c)] == 0).all() for _, c in masked_convs(m))
    opt.step()
    assert pruned_taps_are_zero(m)


def test_inference_forward_writes_no_weight():
    """No in-place write in forward: the weights' version counters do not move, in train or eval mode."""
    m, _ = pruned_model()
    versions = {n: c.weight._version for n, c in masked_convs(m)}
    m.train()
    m(X)
    m.eval()
    with torch.no_grad():
        m(X)
    assert {n: c.weight._version for n, c in masked_convs(m)} == versions


def output_with_explicitly_masked_weights(m, x):
    """``m(x)`` computed with every masked DW weight masked by hand (``functional_call``, nothing written)."""
    params = {f"{n}.weight": c.weight.detach().masked_fill(~tap_mask(c), 0) for n, c in masked_convs(m)}
    return torch.func.functional_call(m, params, (x,))


# Small learning rates: a randomly initialised MobileNetV2 on random labels has gradients in the thousands,
# and at lr 0.01 with momentum it sometimes diverges to NaN within these five steps (seen in CI).
@pytest.mark.parametrize("make_opt, state_keys", [
    (lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, weight_decay=1e-4), ("momentum_buffer",)),
    (lambda ps: torch.optim.Adam(ps, lr=1e-4), ("exp_avg", "exp_avg_sq")),
], ids=["sgd-momentum", "adam"])
def test_optimizer_created_before_pruning_cannot_revive_pruned_taps(make_opt, state_keys):
    """An optimizer built before pruning holds momentum / Adam moments at taps pruned later; with a zero
    gradient its step would still move them (thousands of non-zero pruned taps without the step post-hook)."""
    torch.manual_seed(0)
    m = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=10)
    opt = make_opt(m.parameters())
    train_steps(m, opt, n=2)  # optimizer state now non-zero at (almost) every tap
    # DW taps only: the DW Parameters stay the very objects the optimizer holds
    DEPruner(m, X, dw_pruning_ratio=0.6, pw_pruning_ratio=0.0, ignored_layers=[m.get_classifier()]).step()
    convs = list(masked_convs(m))
    assert len(convs) == 17
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(c.weight) in held for _, c in convs)
    # the precondition of the hole: stale state at pruned taps
    assert all((opt.state[c.weight][k][~tap_mask(c)] != 0).any() for _, c in convs for k in state_keys)
    after_pruning = {n: c.weight.detach().clone() for n, c in convs}
    for step in range(3):
        train_steps(m, opt, n=1)
        for n, c in convs:
            pruned = ~tap_mask(c)
            assert int((c.weight[pruned] != 0).sum()) == 0, f"step {step}: {n} has non-zero pruned taps"
            for k in state_keys:  # the state is cleared too, so it stops pushing
                assert int((opt.state[c.weight][k][pruned] != 0).sum()) == 0, f"step {step}: {n} {k}"
        m.eval()
        with torch.no_grad():
            y = m(X)
            assert torch.isfinite(y).all(), f"step {step}: training diverged, the comparison would be vacuous"
            assert torch.equal(y, output_with_explicitly_masked_weights(m, X)), f"step {step}"
    # the steps really trained the kept taps
    assert all(not torch.equal(after_pruning[n], c.weight) for n, c in convs) and kept_taps_nonzero(m)


def test_the_optimizer_hook_registry_keeps_no_model_alive():
    """The param -> conv registry of the optimizer post-hook is weak: a dropped model is freed."""
    import gc
    import weakref

    from deprune_plugin.core import masks

    m = TwiceDW()
    DEPruner(m, torch.randn(2, 3, 8, 8), dw_pruning_ratio=0.5, pw_pruning_ratio=0.0, variant="plain").step()
    weight_id = id(m.dw.weight)
    assert masks._MASKED_PARAMS[weight_id][1]() is m.dw
    model_ref = weakref.ref(m)
    del m
    gc.collect()
    assert model_ref() is None
    assert weight_id not in masks._MASKED_PARAMS or masks._MASKED_PARAMS[weight_id][1]() is None
