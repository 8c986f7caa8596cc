"""Fast inference for DSConv models: :func:`accelerate` and the pieces it is made of."""
from .api import AccelerateConfig, AccelerateReport, accelerate
from .compact import CompactTaps, DRColumns
from .memory import MemoryReport, memory_report
from .modules import FastDWConv

__all__ = ["accelerate", "AccelerateConfig", "AccelerateReport", "FastDWConv", "CompactTaps", "DRColumns",
           "MemoryReport", "memory_report"]
