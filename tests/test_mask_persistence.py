"""Pruned taps stay exactly zero through training, channel removal, saving, copying, casting and DDP."""
from __future__ import annotations

import copy
import io
import os
import socket

import pytest
import timm
import torch
import torch.multiprocessing as mp
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
    m, p = pruned_model()
    train_steps(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))
    m.eval()
    y = m(X)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, path: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different data per rank
    model = load(path)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(4, 3, 32, 32)
        nn.functional.cross_entropy(ddp(x), torch.randint(0, 10, (4,))).backward()
        opt.step()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_distributed_data_parallel_two_processes_gloo(tmp_path):
    m, p = pruned_model()
    path = str(tmp_path / "m.pt")
    save(m, path, history=p.pruning_history(), input_shape=(1, 3, 32, 32),
         arch={"source": "timm", "name": "mobilenetv2_050", "kwargs": {"num_classes": 10}})
    out = str(tmp_path / "sd")
    mp.spawn(_ddp_worker, args=(2, _free_port(), path, out), nprocs=2, join=True)
    sd0, sd1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)  # replicas identical
    for k, v in sd0.items():
        if k.endswith("dw_tap_mask"):
            w = sd0[k[: -len("dw_tap_mask")] + "weight"]
            assert (w[~v] == 0).all() and (w[v] != 0).all()
    assert not torch.equal(sd0["conv_stem.weight"], m.state_dict()["conv_stem.weight"])  # it did train
