"""Fast inference: :func:`accelerate` swaps depth-wise convs (BN folded, activation fused) for
:class:`FastDWConv` modules running the kernels. Imports :mod:`deprune_plugin.core` and
:mod:`deprune_plugin.kernels`; never the torch-pruning glue (``tp_glue``) or the app.
"""
from ..kernels.formats import CompactTaps, DRColumns
from .api import AccelerateConfig, AccelerateReport, accelerate
from .memory import MemoryReport, memory_report
from .modules import FastDWConv

__all__ = ["accelerate", "AccelerateConfig", "AccelerateReport", "FastDWConv", "CompactTaps", "DRColumns",
           "MemoryReport", "memory_report"]
