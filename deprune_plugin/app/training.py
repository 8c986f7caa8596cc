"""Training and evaluation loops (the paper's recipe: SGD, momentum 0.9, weight decay 1e-4).

Fine-tuning a pruned model is plain :func:`train`: tap masks live in the model (buffers and hooks), so
pruned depth-wise taps stay exactly zero. Each call builds a fresh optimizer, which is what pruning needs
(the parameters changed shape, old momentum buffers no longer fit).
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.distillation import distillation_loss

SCHEDULES = ("cosine", "step", "constant")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other values pass through ``torch.device``.

    Raises:
        ValueError: CUDA asked for but not available, or an unknown device string.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


@torch.no_grad()
def reinit_classifier_(model: nn.Module, std: float = 0.01) -> nn.Module:
    """Re-initialise the final classifier with small weights (normal(0, ``std``), zero bias) in place.

    timm's default head init scales with ``1/sqrt(num_classes)``, sized for 1000 classes: with 10 classes
    the initial logits are so large that the first loss is ~8 instead of ~2.3 and short runs from scratch
    stall. Returns the model.
    """
    from ..core.zoo import classifier_of

    head = classifier_of(model)
    if isinstance(head, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(head.weight, 0.0, std)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    return model


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9,
                   weight_decay: float = 1e-4) -> torch.optim.SGD:
    """SGD with momentum and weight decay over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)


def _scheduler(opt: torch.optim.Optimizer, schedule: str, total_steps: int):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if schedule == "step":
        # Decay 10x at 1/2 and 3/4 of the run (the classic ImageNet step recipe, compressed).
        return torch.optim.lr_scheduler.MultiStepLR(opt, [total_steps // 2, (3 * total_steps) // 4], gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 0.05,
          device: str | torch.device = "cpu", quiet: bool = False, schedule: str = "cosine",
          momentum: float = 0.9, weight_decay: float = 1e-4, desc: str = "train",
          teacher: nn.Module | None = None, kd_temperature: float = 4.0, kd_alpha: float = 0.5) -> list[float]:
    """Train ``model`` in place with cross-entropy; returns the mean loss of every epoch.

    An incomplete last batch is dropped (one of size 1 crashes BatchNorm in training mode); a loader whose
    only batch is incomplete is used as it is unless it holds a single sample.

    Args:
        model: the model (moved to ``device``).
        loader: yields ``(images, labels)``.
        epochs: number of passes over ``loader`` (0 = nothing to do).
        lr: peak learning rate.
        device: where to train (``"auto"`` allowed, see :func:`resolve_device`).
        quiet: hide the progress bar (and, where stderr is not a terminal, the one line per epoch that
            stands in for it there).
        schedule: ``"cosine"`` (per iteration, to 0), ``"step"`` or ``"constant"``.
        momentum, weight_decay: SGD settings.
        desc: progress-bar label.
        teacher: distil from this model (e.g. the unpruned one; run in eval mode, no gradients): the loss is
            :func:`deprune_plugin.core.distillation.distillation_loss` with ``kd_temperature`` and
            ``kd_alpha`` instead of plain cross-entropy.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if epochs == 0 or len(loader) == 0:
        return []
    full = loader.batch_size
    size = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
    drop_last = bool(full and not loader.drop_last and size is not None and size % full
                     and (len(loader) > 1 or size < 2))
    steps = len(loader) - drop_last
    if steps == 0:
        raise ValueError(f"training needs batches of at least 2 samples; the data has {size}")
    dev = resolve_device(device)
    model.to(dev).train()
    if teacher is not None:
        teacher.to(dev).eval()
    opt = make_optimizer(model, lr, momentum, weight_decay)
    sched = _scheduler(opt, schedule, epochs * steps)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    # disable=None: no bar unless stderr is a terminal (in a log, its \r updates pile up into one line)
    bar = tqdm(total=epochs * steps, desc=desc, disable=quiet or None, leave=False)
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for i, (x, y) in enumerate(loader):
                if i == steps:  # the incomplete last batch
                    break
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                logits = model(x)
                if teacher is None:
                    loss = loss_fn(logits, y)
                else:
                    with torch.no_grad():
                        soft = teacher(x)
                    loss = distillation_loss(logits, soft, y, kd_temperature, kd_alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{total / count:.3f}")
            history.append(total / max(count, 1))
            if bar.disable and not quiet:  # no bar in a log: one plain line per epoch says it is alive
                print(f"{desc}: epoch {epoch + 1}/{epochs}, loss {history[-1]:.3f}", file=sys.stderr, flush=True)
            if not math.isfinite(history[-1]):
                raise FloatingPointError(f"training diverged (loss {history[-1]}) in epoch {epoch + 1}; lower lr")
    finally:
        bar.close()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu",
             quiet: bool = False, desc: str = "eval") -> float:
    """Top-1 accuracy of ``model`` on ``loader``, in percent (0-100). The model is left in eval mode."""
    dev = resolve_device(device)
    model.to(dev).eval()
    correct, count = 0, 0
    # disable=None: no bar unless stderr is a terminal (in a log, its \r updates pile up into one line)
    for x, y in tqdm(loader, desc=desc, disable=quiet or None, leave=False):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        correct += int((model(x).argmax(dim=1) == y).sum())
        count += len(y)
    return 100.0 * correct / max(count, 1)
