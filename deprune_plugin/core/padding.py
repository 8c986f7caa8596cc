"""Zero padding of a conv as ``(top, bottom, left, right)``, including the kinds that depend on the input
size (TensorFlow "SAME", timm ``Conv2dSame``). Torch only; used by the pruner (which taps ever read real
input) and by ``accel`` (which padding a kernel must apply)."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["conv_padding", "plain_forward", "same_padding", "same_padding_classes"]


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding ``(before, after)`` of one spatial dim for an input of ``size``:
    output ``ceil(size / stride)``, the odd pixel of padding goes after (timm ``Conv2dSame``)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def same_padding_classes() -> tuple[type, ...]:
    """Conv classes whose padding is TF-"SAME", computed per input size (timm's ``Conv2dSame``)."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # pragma: no cover - timm is a dependency, but the rule must not need it
        return ()
    return (Conv2dSame,)


def plain_forward(conv: nn.Conv2d) -> bool:
    """A conv whose forward is ``nn.Conv2d``'s (any padding mode) or timm's ``Conv2dSame``: folding a
    BatchNorm into its weights is exact. Other subclasses (weight standardisation, ...) are left alone."""
    return type(conv).forward is nn.Conv2d.forward or isinstance(conv, same_padding_classes())


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int] | str | None:
    """The conv's zero padding as ``(top, bottom, left, right)``, ``"same"`` (TF-style, per input size) or
    None when it is not a plain zero-padded conv (custom forward, reflect/replicate/circular padding)."""
    if getattr(conv, "padding_mode", "zeros") != "zeros" or not plain_forward(conv):
        return None
    if isinstance(conv, same_padding_classes()):
        return "same"
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":  # PyTorch's static "same" (stride 1): the odd pixel goes after
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = conv.padding
    return (ph, ph, pw, pw)
