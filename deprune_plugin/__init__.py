"""deprune_plugin: DEPrune (NeurIPS 2024) for torch-pruning, and fast inference for what it prunes.

Public API::

    from deprune_plugin import DEPruner, DEPruneImportance, accelerate, export, save, load
    from deprune_plugin import recalibrate_bn, distillation_loss   # accuracy after pruning

Importing the package also registers ``tp.pruner.DEPruner`` and ``tp.importance.DEPruneImportance`` in
torch-pruning (done by :mod:`deprune_plugin.tp_glue`).

Layout (arrows point one way; a test reads every import and enforces them):
``core`` (torch only) <- ``tp_glue`` (the only importer of torch_pruning) <- ``app`` (the ``deprune`` command),
and ``core`` <- ``kernels`` <- ``accel`` <- ``app``. This file is the one public face.
"""
from __future__ import annotations

from .accel import AccelerateConfig, accelerate, export
from .core.distillation import distillation_loss
from .core.masks import remove_tap_masks, tap_mask
from .core.recalibration import recalibrate_bn
from .core.summary import LayerRow, Summary
from .tp_glue.importance import DEPruneImportance
from .tp_glue.limits import TorchPruningFailure
from .tp_glue.pruner import VARIANTS, DEPruner
from .tp_glue.serialization import load, save

__version__ = "0.1.0"

__all__ = ["DEPruner", "DEPruneImportance", "accelerate", "AccelerateConfig", "export", "save", "load", "VARIANTS",
           "Summary", "LayerRow", "tap_mask", "remove_tap_masks", "TorchPruningFailure", "recalibrate_bn",
           "distillation_loss"]
