"""The torch-pruning glue: the only package that imports ``torch_pruning``. It imports
:mod:`deprune_plugin.core` and nothing else of the package: :class:`DEPruner`, :class:`DEPruneImportance`,
the PW-conv2 structure analysis, fix-ups for model code, and weights-only saving / replay loading.

Importing it registers ``tp.pruner.DEPruner`` and ``tp.importance.DEPruneImportance``, so torch-pruning
workflows reach the plugin by torch-pruning's own names.
"""
import torch_pruning as _tp

from .importance import DEPruneImportance
from .pruner import VARIANTS, DEPruner

_tp.pruner.DEPruner = DEPruner
_tp.importance.DEPruneImportance = DEPruneImportance

__all__ = ["DEPruner", "DEPruneImportance", "VARIANTS"]
