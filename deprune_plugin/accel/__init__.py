"""Fast inference: :func:`accelerate` swaps depth-wise convs (BN folded, activation fused) for
:class:`FastDWConv` modules running the kernels, and on a CPU hands the result to the fastest installed
runtime (:mod:`.runtimes`); :func:`export` writes it as checked ONNX / OpenVINO files. Imports
:mod:`deprune_plugin.core` and :mod:`deprune_plugin.kernels`; never the torch-pruning glue (``tp_glue``) or
the app.
"""
from ..kernels.formats import CompactTaps, DRColumns
from .api import AccelerateConfig, AccelerateReport, accelerate
from .exporter import EXPORT_FORMATS, ExportCheckFailed, export
from .memory import MemoryReport, memory_report
from .modules import FastDWConv
from .runtimes import RUNTIMES, RuntimeModel
from .targets import CudaTarget, RuntimeTarget, TorchTarget  # registers the latency targets

__all__ = ["accelerate", "AccelerateConfig", "AccelerateReport", "FastDWConv", "CompactTaps", "DRColumns",
           "MemoryReport", "memory_report", "export", "ExportCheckFailed", "EXPORT_FORMATS", "RUNTIMES",
           "RuntimeModel", "CudaTarget", "RuntimeTarget", "TorchTarget"]
