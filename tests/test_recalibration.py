"""BatchNorm recalibration after pruning: running statistics re-estimated, nothing else changed."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from deprune_plugin import recalibrate_bn


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Dropout(0.5),
                        nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():  # stale statistics, as after pruning
        for bn in (net[1], net[5]):
            bn.running_mean.fill_(5.0)
            bn.running_var.fill_(9.0)
    return net


def test_one_batch_gives_that_batchs_statistics_and_changes_no_weight():
    net = _net().train()
    params = {k: v.clone() for k, v in net.named_parameters()}
    x = torch.randn(6, 3, 5, 5)
    recalibrate_bn(net, [x])
    with torch.no_grad():
        h = net[0](x)
    assert torch.allclose(net[1].running_mean, h.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(net[1].running_var, h.var((0, 2, 3), unbiased=True), atol=1e-5)
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), k
        assert v.grad is None
    assert net[1].momentum == 0.3 and net[5].momentum == 0.1  # restored
    assert all(m.training for m in net.modules())               # train mode restored


def test_batches_are_averaged_with_equal_weight_and_dropout_stays_off():
    net = _net().eval()
    a, b = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5) + 2.0
    recalibrate_bn(net, [(a, torch.zeros(4)), (b, torch.zeros(4))])  # (inputs, labels) pairs as a loader gives
    with torch.no_grad():
        mean_a, mean_b = net[0](a).mean((0, 2, 3)), net[0](b).mean((0, 2, 3))
    assert torch.allclose(net[1].running_mean, (mean_a + mean_b) / 2, atol=1e-5)
    assert not any(m.training for m in net.modules())
    # the second BN saw the first one's batch statistics with dropout off: recompute it that way
    ref = _net()
    with torch.no_grad():
        feats = [ref[4](ref[2](nn.functional.batch_norm(ref[0](t), None, None, training=True))) for t in (a, b)]
    expected = (feats[0].mean((0, 2, 3)) + feats[1].mean((0, 2, 3))) / 2
    assert torch.allclose(net[5].running_mean, expected, atol=1e-5)


def test_num_batches_limits_the_batches_used():
    net = _net()
    a, b = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5) + 3.0
    recalibrate_bn(net, [a, b], num_batches=1)
    with torch.no_grad():
        assert torch.allclose(net[1].running_mean, net[0](a).mean((0, 2, 3)), atol=1e-6)


def test_no_usable_batch_is_an_error_and_leaves_the_statistics_alone():
    net = _net()
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_bn(net, [torch.randn(1, 3, 5, 5)])  # one sample: no variance to estimate
    assert float(net[1].running_mean[0]) == 5.0 and float(net[1].running_var[0]) == 9.0
    assert net[1].momentum == 0.3
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_bn(net, [torch.randn(2, 3, 5, 5)], num_batches=0)

