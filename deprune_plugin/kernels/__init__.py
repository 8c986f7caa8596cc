"""CUDA kernels for tap-pruned depth-wise convs, launched through CuPy or run in a host emulation.

- :func:`dw_direct`: direct kernel, each output visits only its channel's kept taps (``cuda/dw_direct.cu``).
- :func:`dw_dr`: the paper's DR form, one compacted ``group_size x K'_g`` sub-GEMM per balanced range
  (``cuda/dw_dr.cu``).
- :class:`KernelDispatcher`: per-layer choice of the fastest implementation, measured on first use.

Backends: ``"cupy"`` (CUDA tensors; CuPy is optional and imported lazily, see :func:`cupy_available`)
and ``"emu"`` (CPU tensors; the same ``.cu`` source built with g++, see :func:`emulation_available`).
"""
from .cupy_launch import cupy_available
from .dispatch import Choice, KernelDispatcher, dispatch_key
from .dw_direct import ACTIVATIONS, BACKENDS, dw_direct
from .dw_dr import dw_dr
from .emulation import emulation_available

__all__ = [
    "ACTIVATIONS", "BACKENDS", "Choice", "KernelDispatcher", "cupy_available", "dispatch_key", "dw_direct",
    "dw_dr", "emulation_available",
]
