"""The model list every model-zoo test runs over (timm and torchvision DSConv CNNs, no weights)."""
from __future__ import annotations

MODELS = [("timm", "mobilenetv2_100"), ("timm", "mobilenetv3_small_100"), ("timm", "mobilenetv3_large_100"),
          ("timm", "efficientnet_b0"), ("timm", "convnext_base"), ("timm", "mixnet_s"),
          ("torchvision", "mobilenet_v2"), ("torchvision", "mobilenet_v3_small"),
          ("torchvision", "efficientnet_b0"), ("torchvision", "convnext_tiny")]
# The same families with a small ConvNeXt, for tests that run each model several times.
SMALL_MODELS = [(s, "convnext_atto" if n == "convnext_base" else n) for s, n in MODELS]


def ids(models: list[tuple[str, str]]) -> list[str]:
    return [f"{source}-{name}" for source, name in models]
