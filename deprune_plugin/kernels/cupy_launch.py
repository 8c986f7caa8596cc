"""Launch the ``.cu`` kernels on a GPU through CuPy (NVRTC), on PyTorch's current stream.

- One ``cupy.RawModule`` per specialisation and device, compiled on first use and kept in a dict keyed by
  (source hash, defines, device index); no ``name_expressions`` / templates (CuPy's template caching is
  unreliable), every variant is plain source with ``extern "C"`` entry points.
- Tensors are passed as raw pointers (``t.data_ptr()``) and outputs are allocated by torch, so the caching
  allocator and CUDA-graph capture see every buffer. CuPy allocates nothing per call.
- The launch goes to ``torch.cuda.current_stream()`` read per call (it changes under ``torch.cuda.stream``
  and graph capture) wrapped once per stream pointer (:func:`wrap_stream`: ``cupy.cuda.Stream.from_external``,
  or ``ExternalStream`` before CuPy 14).
- CuPy is imported lazily: this module imports (and :func:`cupy_available` answers) without it.

- Dynamic shared memory above the default 48 KB is opted in per kernel inside the tensor's device
  context, up to that device's opt-in maximum (:func:`max_dynamic_smem`: 64 KB on sm_75, 99 KB on
  sm_86/89, 163 KB on sm_80, 227 KB on sm_90), read once per device.

Capture rule: call every variant once before ``torch.cuda.graph`` capture (compiling/loading a module
during capture is not allowed).
"""
from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from .sources import KernelArg, KernelSource

__all__ = ["DEFAULT_SMEM_LIMIT", "cupy_available", "launch", "max_dynamic_smem", "nvrtc_include_dirs",
           "NVRTC_OPTIONS"]

#: NVRTC options for every module (plus ``-I`` for the CUDA headers, see :func:`nvrtc_include_dirs`).
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)
#: Shared memory per block without opt-in (every architecture); above it a kernel must opt in.
DEFAULT_SMEM_LIMIT = 48 * 1024
_ATTR_SMEM_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin, if this CuPy does not name it
_SMEM_OPTIN: dict[int, int] = {}

_KERNELS: dict[tuple[str, tuple[tuple[str, str], ...], int, str], Any] = {}
_STREAMS: dict[tuple[int, int], Any] = {}
_LOCK = threading.Lock()


def _import_cupy():
    import cupy  # noqa: PLC0415 - optional dependency, imported on first GPU use only

    return cupy


def cupy_available() -> tuple[bool, str]:
    """``(True, "cupy <version>")`` if CuPy imports and sees a CUDA device, else ``(False, reason)``."""
    try:
        cupy = _import_cupy()
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return False, (f"cupy is not importable ({type(exc).__name__}: {exc}); "
                       "install cupy-cuda12x or cupy-cuda13x")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"cupy cannot query CUDA devices ({type(exc).__name__}: {exc})"
    if count == 0:
        return False, "cupy sees no CUDA device"
    return True, f"cupy {cupy.__version__}"


def _cudart_major(include_dir: Path) -> int | None:
    """CUDA major version of the headers in ``include_dir`` (from ``CUDART_VERSION``), if readable."""
    try:
        text = (include_dir / "cuda_runtime_api.h").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", text)
    return int(m.group(1)) // 1000 if m else None


def nvrtc_include_dirs(cuda_major: int | None = None) -> list[str]:
    """One directory holding ``cuda_fp16.h`` / ``cuda_bf16.h``, which NVRTC does not ship built in.

    Candidates: ``$CUDA_PATH``, ``$CUDA_HOME``, ``/usr/local/cuda`` and the ``nvidia`` pip wheels (CUDA 13:
    ``nvidia/cu13``, CUDA 12: ``nvidia/cuda_runtime``). With ``cuda_major`` (NVRTC's major version) headers of
    that CUDA major are preferred, since the fp16/bf16 headers are tied to their compiler release.
    """
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    dirs = [Path(r) / "include" for r in roots if r]
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        dirs += [base / sub / "include" for sub in ("cu13", "cuda_runtime", "cuda_nvrtc")]
    found: list[Path] = []
    for d in dirs:
        if d not in found and (d / "cuda_fp16.h").is_file() and (d / "cuda_bf16.h").is_file():
            found.append(d)
    if cuda_major is not None:
        found.sort(key=lambda d: _cudart_major(d) != cuda_major)  # stable: matching major first
    return [str(d) for d in found[:1]]


def _kernel(src: KernelSource, entry: str, device_index: int):
    """The RawKernel ``entry`` of ``src`` on ``device_index``, compiled and loaded on first request."""
    key = (src.hash, src.defines, device_index, entry)
    with _LOCK:
        kernel = _KERNELS.get(key)
        if kernel is None:
            cupy = _import_cupy()
            major = cupy.cuda.nvrtc.getVersion()[0]
            options = NVRTC_OPTIONS + tuple(f"-I{d}" for d in nvrtc_include_dirs(major))
            with cupy.cuda.Device(device_index):
                module = cupy.RawModule(code=src.code, options=options, backend="nvrtc")
                # get_function compiles and loads the module now; reading an attribute forces the
                # cuModuleGetFunction, so nothing is left to do lazily inside a CUDA-graph capture.
                kernel = module.get_function(entry)
                _ = kernel.num_regs
            _KERNELS[key] = kernel
    return kernel


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def max_dynamic_smem(device: torch.device | int) -> int:
    """The opt-in maximum of shared memory per block of a CUDA device (``cudaDevAttrMaxSharedMemoryPerBlockOptin``),
    read through CuPy once per device and cached."""
    index = device if isinstance(device, int) else _device_index(device)
    limit = _SMEM_OPTIN.get(index)
    if limit is None:
        runtime = _import_cupy().cuda.runtime
        attr = getattr(runtime, "cudaDevAttrMaxSharedMemoryPerBlockOptin", _ATTR_SMEM_OPTIN)
        limit = _SMEM_OPTIN[index] = int(runtime.deviceGetAttribute(attr, index))
    return limit


class _ForeignStream:
    """A stream handle in the CUDA stream protocol (``__cuda_stream__() -> (version 0, cudaStream_t)``)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.ptr


def wrap_stream(cupy: Any, ptr: int, device_index: int) -> Any:
    """A CuPy stream for a stream CuPy does not own (torch's): ``cupy.cuda.Stream.from_external`` through the
    CUDA stream protocol where CuPy has it (14+, which deprecates ``ExternalStream``), else
    ``cupy.cuda.ExternalStream`` (CuPy 13). Call it inside ``cupy.cuda.Device(device_index)``: a protocol
    stream belongs to the current device."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_ForeignStream(ptr))
    return cupy.cuda.ExternalStream(ptr, device_index)


def _external_stream(device_index: int):
    ptr = torch.cuda.current_stream(device_index).cuda_stream
    key = (device_index, ptr)
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = wrap_stream(_import_cupy(), ptr, device_index)
    return stream


def _marshal(args: Sequence[KernelArg]) -> tuple:
    import numpy as np  # CuPy depends on NumPy; numpy scalars fix each argument's C type and size

    conv = {"ptr": np.uint64, "i32": np.int32, "f32": np.float32}
    return tuple(conv[a.kind](a.value) for a in args)


def launch(src: KernelSource, entry: str, grid: tuple[int, int, int], block: tuple[int, int, int],
           smem_bytes: int, args: Sequence[KernelArg], device: torch.device) -> None:
    """Launch ``entry<<<grid, block, smem_bytes>>>(args)`` on ``device``'s current torch stream (async).

    Dynamic shared memory above :data:`DEFAULT_SMEM_LIMIT` is opted in for the kernel inside ``device``'s
    context; more than the device's :func:`max_dynamic_smem` is a ValueError (nothing is launched)."""
    if device.type != "cuda":
        raise ValueError(f"the cupy backend needs CUDA tensors, got device {device}")
    index = _device_index(device)
    cupy = _import_cupy()
    kernel = _kernel(src, entry, index)
    with cupy.cuda.Device(index):
        if smem_bytes > DEFAULT_SMEM_LIMIT:
            limit = max_dynamic_smem(index)
            if smem_bytes > limit:
                raise ValueError(f"{entry} asks for {smem_bytes} bytes of dynamic shared memory; device {index} "
                                 f"allows {limit}")
            if kernel.max_dynamic_shared_size_bytes < smem_bytes:
                kernel.max_dynamic_shared_size_bytes = int(smem_bytes)
        with _external_stream(index):
            kernel(tuple(grid), tuple(block), _marshal(args), shared_mem=int(smem_bytes))
