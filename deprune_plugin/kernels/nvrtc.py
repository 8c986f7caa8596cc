"""Compile the kernels exactly as CuPy does at run time, without a GPU: NVRTC through ctypes.

:mod:`.cupy_launch` hands ``cupy.RawModule(code, options=NVRTC_OPTIONS + (-I<cuda headers>,),
backend="nvrtc")`` to CuPy, and CuPy's compiler (``cupy/cuda/compiler.py``) appends options of its own
before calling ``nvrtcCompileProgram``, in this order:

1. ``-ftz=true`` (always: ``_compile_with_cache_cuda``);
2. ``--device-as-default-execution-space`` (NVRTC >= 12 without jitify);
3. ``-arch=sm_XX`` when the device's architecture is one this NVRTC can emit a cubin for, else
   ``-arch=compute_XX`` (PTX, finished by the driver).

``-ftz=true`` flushes fp32 subnormals to zero and can change code, which is why the compile checks use
:func:`cupy_options` instead of the project's options alone. Some CuPy versions add ``--pch`` (precompiled
headers: compile time only, no effect on the generated code); :func:`cupy_options` takes ``pch=True`` for that.

NVRTC's compile entry points need no GPU driver, so this runs on CI machines without a GPU; the library is
the CUDA toolkit's ``libnvrtc.so`` or the ``nvidia-cuda-nvrtc`` wheel's (``nvidia/cu13/lib`` for CUDA 13,
``nvidia/cuda_nvrtc/lib`` for CUDA 12). :func:`resource_usage` reads a cubin's registers, stack frame and
local memory with ``cuobjdump --dump-resource-usage`` and counts its local-memory instructions (``LDL`` /
``STL``: register spills, or a private array the compiler could not keep in registers).

Cubins are cached on disk (``$DEPRUNE_NVRTC_CACHE``, default ``$XDG_CACHE_HOME/deprune_plugin/nvrtc`` or
``~/.cache/deprune_plugin/nvrtc``), one file per (source, options, NVRTC library and version).
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from .cupy_launch import NVRTC_OPTIONS, nvrtc_include_dirs

__all__ = ["CompileResult", "ResourceUsage", "cache_dir", "compile_cubin", "cupy_options", "load_nvrtc",
           "nvrtc_available", "nvrtc_version", "resource_usage"]

_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    candidates: list[str] = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"):
            candidates += sorted(glob.glob(os.path.join(entry, sub, "libnvrtc.so*")))
    for base in filter(None, [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]):
        candidates += sorted(glob.glob(os.path.join(base, "lib64", "libnvrtc.so*")))
    for path in candidates:
        # the .alt. variant and the builtins are not the compiler entry points
        if ".alt." in path or "builtins" in path:
            continue
        try:
            # NVRTC dlopens its builtins library by soname: preload the one next to it.
            for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib, os.path.realpath(path)
    return None, "libnvrtc not found (CUDA toolkit lib64/, or pip install nvidia-cuda-nvrtc)"


def load_nvrtc() -> ctypes.CDLL | None:
    """The NVRTC library (loaded once), or None."""
    return _load()[0]


def nvrtc_available() -> tuple[bool, str]:
    """``(True, library path)`` if NVRTC loads, else ``(False, reason)``."""
    lib, what = _load()
    return lib is not None, what


def nvrtc_version() -> tuple[int, int]:
    lib = load_nvrtc()
    if lib is None:
        raise RuntimeError(_load()[1])
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed: {lib.nvrtcGetErrorString(rc).decode()}")


def _arch_number(arch: str | int) -> int:
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)", str(arch))
    if m is None:
        raise ValueError(f"arch must look like sm_90, compute_90 or 90, got {arch!r}")
    return int(m.group(1))


def cupy_options(arch: str | int, *, include_dirs: Sequence[str] | None = None, pch: bool = False,
                 cubin: bool = True) -> tuple[str, ...]:
    """The option list CuPy passes to ``nvrtcCompileProgram`` for :mod:`.cupy_launch`'s modules on a GPU of
    ``arch`` (``"sm_90"``, ``90``): the launcher's :data:`.cupy_launch.NVRTC_OPTIONS` and ``-I`` of
    :func:`.cupy_launch.nvrtc_include_dirs`, then CuPy's own (module docstring). ``cubin=False``: the
    ``-arch=compute_XX`` CuPy uses for an architecture newer than its NVRTC."""
    major = nvrtc_version()[0]
    dirs = nvrtc_include_dirs(major) if include_dirs is None else list(include_dirs)
    options = (*NVRTC_OPTIONS, *(f"-I{d}" for d in dirs), "-ftz=true")
    if major >= 12:
        options += ("--device-as-default-execution-space",)
    if pch:
        options += ("--pch",)
    n = _arch_number(arch)
    return options + (f"-arch=sm_{n}" if cubin else f"-arch=compute_{n}",)


def cache_dir() -> Path:
    env = os.environ.get("DEPRUNE_NVRTC_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deprune_plugin" / "nvrtc"


@dataclass(frozen=True)
class CompileResult:
    cubin: bytes
    log: str
    options: tuple[str, ...]
    cached: bool


def _library_key() -> str:
    lib, path = _load()
    if lib is None:
        raise RuntimeError(path)
    st = os.stat(path)
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{nvrtc_version()}"


def compile_cubin(code: str, options: Sequence[str], *, name: str = "kern.cu") -> CompileResult:
    """``nvrtcCompileProgram(code, options)`` and ``nvrtcGetCUBIN`` (``options`` must name an ``-arch=sm_XX``).
    Raises RuntimeError with NVRTC's log when the compile fails. Cached on disk (:func:`cache_dir`)."""
    options = tuple(options)
    if not any(re.fullmatch(r"-arch=sm_\d+a?", o) or re.fullmatch(r"--gpu-architecture=sm_\d+a?", o)
               for o in options):
        raise ValueError(f"a cubin needs an -arch=sm_XX option, got {options}")
    key = hashlib.sha256("\0".join([_library_key(), name, *options, code]).encode()).hexdigest()[:32]
    folder = cache_dir()
    path, log_path = folder / f"{key}.cubin", folder / f"{key}.log"
    if path.is_file() and log_path.is_file():
        return CompileResult(path.read_bytes(), log_path.read_text(), options, True)
    lib = load_nvrtc()
    assert lib is not None
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        buf = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.value.decode(errors="replace")
        if rc != 0:
            raise RuntimeError(f"NVRTC compile failed ({lib.nvrtcGetErrorString(rc).decode()}) with options "
                               f"{' '.join(options)}:\n{log[-4000:]}")
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        data = cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    folder.mkdir(parents=True, exist_ok=True)
    # write-then-rename: a concurrent reader never sees half a cubin
    with _LOCK, tempfile.TemporaryDirectory(dir=folder) as tmp:
        (Path(tmp) / "c").write_bytes(data)
        (Path(tmp) / "l").write_text(log)
        os.replace(Path(tmp) / "l", log_path)
        os.replace(Path(tmp) / "c", path)
    return CompileResult(data, log, options, False)


@dataclass(frozen=True)
class ResourceUsage:
    """What one kernel of a cubin uses per thread (``cuobjdump --dump-resource-usage``) and its local-memory
    instructions (``LDL`` / ``STL`` in ``cuobjdump -sass``)."""

    registers: int
    stack: int          # bytes of stack frame per thread
    local: int          # bytes of local memory per thread
    shared: int         # static shared memory of the kernel
    local_loads: int    # LDL instructions (spill reloads, or reads of a private array in local memory)
    local_stores: int   # STL instructions


def _cuobjdump() -> str:
    from .report import find_tool  # noqa: PLC0415 - report imports much more than this module needs

    tool = find_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit, or the copy in the triton wheel)")
    return tool


def resource_usage(cubin: bytes, entry: str) -> ResourceUsage:
    tool = _cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(rf"Function {re.escape(entry)}:\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res)
    if m is None:
        raise RuntimeError(f"cuobjdump --dump-resource-usage shows no function {entry}:\n{res}")
    body = sass.split(f"Function : {entry}", 1)
    if len(body) != 2:
        raise RuntimeError(f"cuobjdump -sass shows no function {entry}")
    text = body[1].split("Function : ", 1)[0]
    return ResourceUsage(int(m.group(1)), int(m.group(2)), int(m.group(4)), int(m.group(3)),
                         len(re.findall(r"\bLDL(?:\.[\w.]+)?\s", text)), len(re.findall(r"\bSTL(?:\.[\w.]+)?\s", text)))
