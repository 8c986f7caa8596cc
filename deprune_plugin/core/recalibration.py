"""BatchNorm recalibration after pruning.

Pruning changes what every BatchNorm after a pruned layer sees, while its running statistics still
describe the unpruned network; evaluated as is, a pruned MobileNetV2 drops to chance before any fine-tuning.
Re-estimating the statistics with a few forward passes (no gradients, no weight change) restores most
of it. A channel whose input never varies (a DW channel whose kept taps read only padding) would get
variance 0, which makes BN divide rounding noise by ``sqrt(eps)``; such channels are folded into the BN's
bias (:mod:`.constant_channels`).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .constant_channels import ConstantChannelTracker, fold_constant_channels_

__all__ = ["recalibrate_bn"]


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, num_batches: int | None = None,
                   device: torch.device | str | None = None, quiet: bool = True,
                   fold_constant: bool = True) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance of ``model`` in place; returns ``model``.

    The statistics are reset and re-accumulated as a cumulative (equal-weight) average over the batches
    (BN ``momentum=None``), with only the BatchNorm layers in training mode (dropout and drop-path stay
    off, so the statistics match inference) and without gradients. Each BN's momentum and every module's
    training flag are restored as they were; weights and biases are unchanged except where
    ``fold_constant`` folds a constant input channel (variance 0) into the BN's bias
    (:func:`~deprune_plugin.core.constant_channels.fold_constant_channels_`: same output, no division by
    ``sqrt(eps)``).

    Args:
        model: the (pruned) model.
        batches: an iterable of input tensors ``[N, C, H, W]`` or of ``(inputs, labels)`` pairs (a
            DataLoader works); batches of one sample are skipped (BN cannot estimate a variance from one).
        num_batches: use at most this many batches (``None``: all).
        device: where to run (default: the model's parameters' device).
        quiet: hide the progress bar.
        fold_constant: fold BN channels whose input was constant over every batch (see above).

    Raises:
        ValueError: ``num_batches`` < 1, or no usable batch (nothing to estimate from; the model is then
            left exactly as it was).
    """
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if not isinstance(fold_constant, bool):
        raise TypeError(f"fold_constant must be a bool, got {fold_constant!r}")
    bns = _batch_norms(model)
    if not bns:
        return model
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    saved = [(bn, bn.momentum, bn.running_mean.clone(), bn.running_var.clone(),
              None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone()) for bn in bns]
    used = 0
    tracker = ConstantChannelTracker(model)
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: every batch weighs the same
            bn.train()
        # disable=None: no bar unless stderr is a terminal (in a log, its \r updates pile up into one line)
        for item in tqdm(batches, total=num_batches, desc="recalibrate BN", disable=quiet or None, leave=False):
            if num_batches is not None and used >= num_batches:
                break
            x = item[0] if isinstance(item, (tuple, list)) else item
            if x.shape[0] < 2:
                continue
            with tracker:
                model(x.to(device, non_blocking=True))
            used += 1
    except BaseException:
        _restore_stats(saved)
        raise
    finally:
        for bn, momentum, *_ in saved:
            bn.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    if used == 0:
        _restore_stats(saved)
        raise ValueError("recalibrate_bn got no batch of at least 2 samples: running statistics left unchanged")
    if fold_constant:
        fold_constant_channels_(model, tracker.constant())
    return model


def _restore_stats(saved: list) -> None:
    for bn, _, mean, var, count in saved:
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if count is not None:
            bn.num_batches_tracked.copy_(count)
