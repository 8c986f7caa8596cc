"""Build models by name from timm or torchvision (never downloads weights)."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

SOURCES = ("timm", "torchvision")


def build_model(source: str, name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` or ``torchvision.models.get_model(name,
    weights=None, **kwargs)``.

    Raises:
        ValueError: unknown source or model name (the message names it).
    """
    if source == "timm":
        import timm
        if name not in timm.list_models():
            raise ValueError(f"unknown timm model {name!r}")
        return timm.create_model(name, pretrained=False, **kwargs)
    if source == "torchvision":
        import torchvision
        if name not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model {name!r}")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def classifier_of(model: nn.Module) -> nn.Module | None:
    """The final classifier layer (timm ``get_classifier()``, torchvision ``classifier``/``fc``/``head``)."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    for attr in ("classifier", "fc", "head"):
        mod = getattr(model, attr, None)
        if isinstance(mod, nn.Module):
            linears = [m for m in mod.modules() if isinstance(m, nn.Linear)]
            return linears[-1] if linears else mod
    return None
