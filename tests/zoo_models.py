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


def pruned_accelerated(name: str, pw_pruning_ratio: float, size: int = 48):
    """A small timm model (10 classes) pruned (DW 60%, PW as given) and accelerated on the torch path.

    Returns ``(pruned model, accelerated model, example input [1, 3, size, size])``."""
    import warnings

    import torch

    from deprune_plugin import DEPruner, accelerate
    from deprune_plugin.core.zoo import build_model, classifier_of

    m = build_model("timm", name, num_classes=10)
    x = torch.randn(2, 3, size, size)
    DEPruner(m, x, dw_pruning_ratio=0.6, pw_pruning_ratio=pw_pruning_ratio, ignored_layers=[classifier_of(m)]).step()
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = accelerate(m, backend="torch", example_inputs=x[:1])
    return m, fast, x[:1]
