"""deprune_plugin: DEPrune (NeurIPS 2024) for torch-pruning.

Public API::

    from deprune_plugin import DEPruner, DEPruneImportance, accelerate, save, load

Importing the package also registers ``tp.pruner.DEPruner`` and ``tp.importance.DEPruneImportance``.
"""
from __future__ import annotations

import torch_pruning as tp

from .accel import AccelerateConfig, accelerate
from .importance import DEPruneImportance
from .masks import remove_tap_masks, tap_mask
from .pruner import VARIANTS, DEPruner
from .serialization import load, save
from .summary import LayerRow, Summary

__version__ = "0.1.0"

tp.pruner.DEPruner = DEPruner
tp.importance.DEPruneImportance = DEPruneImportance

__all__ = ["DEPruner", "DEPruneImportance", "accelerate", "AccelerateConfig", "save", "load", "VARIANTS", "Summary", "LayerRow", "tap_mask", "remove_tap_masks"]
