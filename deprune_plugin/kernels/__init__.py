"""Kernels for tap-pruned depth-wise convs: weight formats, launchers, dispatch. Knows nothing of pruning
beyond a keep mask; imports :mod:`deprune_plugin.core` only (never ``accel`` or ``tp_glue``, hence never
torch-pruning); may be imported by ``accel``, ``app`` and the package root.

- :mod:`.formats`: :class:`CompactTaps` (per-channel CSR of kept taps) and :class:`DRColumns` (the kept DR
  sub-GEMM columns per balanced range), built once from a weight and a mask.
- :mod:`.activations`: the one registry of fusable epilogue activations.
- :func:`dw_direct`: direct kernel, each output visits only its channel's kept taps (``cuda/dw_direct.cu``).
- :func:`dw_dr`: the paper's DR form, one compacted ``group_size x K'_g`` sub-GEMM per balanced range
  (``cuda/dw_dr.cu``).
- :func:`dw_pw_fused`: a DW conv and the 1x1 conv after it in one kernel, the DW result kept on chip
  (``cuda/dw_pw_fused.cu``).
- :class:`KernelDispatcher`: per-layer choice of the fastest implementation, measured on first use.
- :mod:`.plan`: launch plans, and the SM counts the planners fill (a CTA per SM where the problem allows).
- :mod:`.smem_banks`: a model of shared-memory bank conflicts over the kernels' index arithmetic.

Kernel backends (:data:`KERNEL_BACKENDS`): ``"cupy"`` (CUDA tensors; CuPy is optional and imported lazily,
see :func:`cupy_available`) and ``"emu"`` (CPU tensors; the same ``.cu`` source built with g++, see
:func:`emulation_available`).
"""
from .activations import ACTIVATIONS, Activation, activation_of_module
from .cupy_launch import cupy_available
from .dispatch import Choice, KernelDispatcher, dispatch_key
from .dw_direct import dw_direct
from .dw_dr import dw_dr
from .dw_pw_fused import dw_pw_fused
from .emulation import emulation_available
from .formats import CompactTaps, DRColumns
from .launch import KERNEL_BACKENDS

__all__ = [
    "ACTIVATIONS", "Activation", "Choice", "CompactTaps", "DRColumns", "KERNEL_BACKENDS", "KernelDispatcher",
    "activation_of_module", "cupy_available", "dispatch_key", "dw_direct", "dw_dr", "dw_pw_fused",
    "emulation_available",
]
