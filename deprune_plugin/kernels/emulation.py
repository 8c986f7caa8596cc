"""Run the CUDA kernels on the CPU: the same ``.cu`` source compiled by g++ against
``cuda/cuda_host_emulation.h`` (blocks run one at a time on ``blockDim`` OS threads).

Meant for correctness tests on machines without a GPU, not for speed. Each specialisation is built
once into a shared library under ``$DEPRUNE_EMU_CACHE`` (default ``<tmp>/deprune_emu_cache``), named by a
hash of the specialised source, the header, the generated wrapper and the compiler flags, and loaded
with ctypes. Tensors must be contiguous CPU tensors (in their memory format); pointers are passed raw.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from .sources import EMULATION_HEADER, KernelArg, KernelSource

__all__ = ["cache_dir", "emulation_available", "launch"]

_CXX_FLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC", "-pthread")
_CTYPES = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int, "f32": ctypes.c_float}
_CPP_TYPES = {"ptr": "void*", "i32": "int", "f32": "float"}
_LIBS: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()


def _compiler() -> str | None:
    return shutil.which("g++")


def emulation_available() -> tuple[bool, str]:
    """``(True, compiler path)`` if the host emulation can be built, else ``(False, reason)``."""
    cxx = _compiler()
    if cxx is None:
        return False, "g++ not found on PATH (needed to build the host emulation of the CUDA kernels)"
    return True, cxx


def cache_dir() -> Path:
    """Where built emulation libraries are cached: ``$DEPRUNE_EMU_CACHE`` or ``<tmp>/deprune_emu_cache``."""
    env = os.environ.get("DEPRUNE_EMU_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "deprune_emu_cache"


def _wrapper(entry: str, kinds: Sequence[str]) -> str:
    """``extern "C"`` host function ``deprune_emu_<entry>(grid, block, smem, args...)`` -> emu_launch."""
    params = ", ".join(f"{_CPP_TYPES[k]} a{i}" for i, k in enumerate(kinds))
    names = ", ".join(f"a{i}" for i in range(len(kinds)))
    return f"""
#include <cstdio>
#include <exception>
static char deprune_emu_error_[512];
extern "C" const char* deprune_emu_last_error() {{ return deprune_emu_error_; }}
extern "C" int deprune_emu_{entry}(unsigned gx, unsigned gy, unsigned gz,
                                   unsigned bx, unsigned by, unsigned bz,
                                   unsigned long long smem, {params}) {{
    try {{
        emu_launch({entry}, dim3(gx, gy, gz), dim3(bx, by, bz), static_cast<std::size_t>(smem), {names});
        return 0;
    }} catch (const std::exception& e) {{
        std::snprintf(deprune_emu_error_, sizeof deprune_emu_error_, "%s", e.what());
        return 1;
    }}
}}
"""


def _build(src: KernelSource, entry: str, kinds: tuple[str, ...]) -> ctypes.CDLL:
    ok, cxx = emulation_available()
    if not ok:
        raise RuntimeError(cxx)
    header = (src.directory / EMULATION_HEADER).read_text()
    code = src.code + _wrapper(entry, kinds)
    key = hashlib.sha256("\0".join([code, header, cxx, *_CXX_FLAGS]).encode()).hexdigest()[:24]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / f"{Path(src.name).stem}-{entry}-{key}.so"
    if not lib_path.exists():
        # Private build directory + atomic rename: concurrent processes never load a half-written library.
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            # The specialised source includes "cuda_host_emulation.h" from the .cu file's directory.
            cpp = Path(tmp) / f"{Path(src.name).stem}.cpp"
            cpp.write_text(code)
            tmp_lib = Path(tmp) / "lib.so"
            cmd = [cxx, *_CXX_FLAGS, "-I", str(src.directory), "-o", str(tmp_lib), str(cpp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"host emulation build of {src.name} failed:\n{' '.join(cmd)}\n"
                                   f"{proc.stderr[-4000:]}")
            os.replace(tmp_lib, lib_path)
    return ctypes.CDLL(str(lib_path))


def _function(src: KernelSource, entry: str, kinds: tuple[str, ...]):
    key = f"{src.hash}:{entry}:{','.join(kinds)}"
    with _LOCK:
        lib = _LIBS.get(key)
        if lib is None:
            lib = _LIBS[key] = _build(src, entry, kinds)
    fn = getattr(lib, f"deprune_emu_{entry}")
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_ulonglong] + [_CTYPES[k] for k in kinds]
    return lib, fn


def launch(src: KernelSource, entry: str, grid: tuple[int, int, int], block: tuple[int, int, int],
           smem_bytes: int, args: Sequence[KernelArg]) -> None:
    """Run ``entry<<<grid, block, smem_bytes>>>(args)`` of ``src`` on the CPU, synchronously.

    Pointer arguments must address CPU memory that stays alive for the call (ctypes releases the GIL).
    """
    kinds = tuple(a.kind for a in args)
    lib, fn = _function(src, entry, kinds)
    rc = fn(*grid, *block, int(smem_bytes), *(a.value for a in args))
    if rc != 0:
        lib.deprune_emu_last_error.restype = ctypes.c_char_p
        raise RuntimeError(f"emulated launch of {entry} failed: {lib.deprune_emu_last_error().decode()}")
