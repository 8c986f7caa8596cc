"""Run the CUDA kernels on the CPU: the same ``.cu`` source compiled by g++ against
``cuda/cuda_host_emulation.h`` (blocks run one at a time on ``blockDim`` OS threads).

Meant for correctness tests on machines without a GPU, not for speed. Each specialisation is built
once into a shared library under ``$DEPRUNE_EMU_CACHE`` (default ``<tmp>/deprune_emu_cache``), named by a
hash of the specialised source, the header, the generated wrapper and the compiler flags, and loaded
with ctypes. Tensors must be contiguous CPU tensors (in their memory format); pointers are passed raw.
Linux only: the build relies on ELF linker sections (g++ and GNU ld).

What the emulation checks (see the header for the details):

- **Shared memory is poisoned before every block** (all bytes 0xFF: a float NaN, an int -1), so a kernel
  reading shared memory that its block never wrote produces NaNs rather than passing on zeros or stale data.
- **Launches a GPU would refuse are refused** (RuntimeError naming the limit, nothing runs): block and grid
  dimensions beyond CUDA's limits, more threads than the kernel's ``__launch_bounds__``, more static +
  dynamic shared memory than the :class:`Target` allows (by default 48 KB, what a kernel gets without
  opting in; ``$DEPRUNE_EMU_SMEM_LIMIT``, ``$DEPRUNE_EMU_SMEM_OPTIN`` or ``launch(..., target=Target(...))``
  change it, e.g. ``Target(smem_per_block_optin=99 * 1024)`` for an sm_86 opt-in maximum, used, as
  :mod:`.cupy_launch` does, by launches asking for more than 48 KB of dynamic shared memory).
  The kernel's static ``__shared__`` bytes are read from the built library's symbol table (every array the
  kernel declares, by its ``sizeof``; :func:`static_shared_arrays`).
- **Sanitizers** (``sanitize=True`` or ``$DEPRUNE_EMU_SANITIZE=1``): the library is built with
  ``-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g`` (cached apart
  from the plain build), so an out-of-bounds access to a tensor or to the dynamic shared buffer, or undefined
  behaviour (e.g. signed overflow in index arithmetic), aborts the process with a report. Static
  ``__shared__`` arrays get no redzones (they live in a section of their own, which the poisoning rewrites
  whole): an index past one of them lands in the next array or in poison, not in an ASan report.

  An ASan library cannot be loaded into an ordinary ``python``: the ASan runtime must be the first library
  of the process (loading it later aborts with "ASan runtime does not come first in initial library list",
  and ``verify_asan_link_order=0`` would leave malloc uninstrumented, i.e. tensors unchecked). So sanitized
  runs happen in a **separate process** started with :func:`sanitizer_env`: ``LD_PRELOAD`` of the compiler's
  ``libasan.so`` (``g++ -print-file-name=libasan.so``) followed by its ``libstdc++.so``,
  ``ASAN_OPTIONS=detect_leaks=0`` (CPython and torch keep memory until exit on purpose) and
  ``DEPRUNE_EMU_SANITIZE=1``. In Python: ``subprocess.run(cmd, env=sanitizer_env())``; from a shell, e.g.::

      LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \\
      ASAN_OPTIONS=detect_leaks=0 DEPRUNE_EMU_SANITIZE=1 python -m pytest tests/test_dw_dr_emulation.py

  Loading a sanitized build in a process without the ASan runtime raises a RuntimeError saying so, instead
  of aborting. The tests run their sanitized checks that way (``tests/test_emulation_checks.py``).
- **ThreadSanitizer** (``sanitize="thread"`` or ``$DEPRUNE_EMU_SANITIZE=thread``): built with
  ``-fsanitize=thread -fno-omit-frame-pointer -g`` (cached apart; TSan cannot be combined with ASan). The
  emulated threads of a block are real OS threads and ``__syncthreads()`` is a ``std::barrier`` (header-only,
  so its atomics are instrumented too), so TSan sees exactly the ordering the barriers give: a missing
  barrier is a data race on shared memory, reported even when the stale value read happens to be right
  (e.g. a write-after-read race where the old and the new chunk hold equal data, which no numeric check
  sees). Like ASan the runtime must come first: :func:`sanitizer_env` with ``kind="thread"`` preloads
  ``libtsan.so`` and sets ``TSAN_OPTIONS`` (``exitcode=66``: a race fails the process at exit) and
  ``DEPRUNE_EMU_SANITIZE=thread``. A kernel in which some threads skip a barrier hangs the emulation, so run
  these processes with a timeout (``subprocess.run(..., timeout=...)``).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .sources import EMULATION_HEADER, KernelArg, KernelSource

__all__ = ["SANITIZE_FLAGS", "TSAN_FLAGS", "LaunchRecord", "Target", "asan_runtime_loaded", "cache_dir",
           "default_target", "emulation_available", "launch", "record_launches", "requested_sanitizer",
           "sanitize_requested", "sanitizer_available", "sanitizer_env", "static_shared_arrays",
           "tsan_runtime_loaded"]

_CXX_FLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC", "-pthread")
#: Extra flags of a sanitized build (``sanitize=True``).
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined",
                  "-g")
#: Extra flags of a ThreadSanitizer build (``sanitize="thread"``).
TSAN_FLAGS = ("-fsanitize=thread", "-fno-omit-frame-pointer", "-g")
# Sanitizer kind -> (build flags, library name suffix, runtime library, entry symbol of that runtime).
_SANITIZERS = {"address": (SANITIZE_FLAGS, "-asan", "libasan.so", "__asan_init"),
               "thread": (TSAN_FLAGS, "-tsan", "libtsan.so", "__tsan_init")}
_KIND_WORDS = {"1": "address", "true": "address", "yes": "address", "on": "address", "address": "address",
               "asan": "address", "thread": "thread", "tsan": "thread"}
_CTYPES = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int, "f32": ctypes.c_float}
_CPP_TYPES = {"ptr": "void*", "i32": "int", "f32": "float"}
_SHARED_SECTION = "deprune_shared"  # where the header puts static __shared__ arrays
_LIBS: dict[tuple, tuple[ctypes.CDLL, dict[str, int]]] = {}
_LOCK = threading.Lock()
_DEFAULT_SMEM = 48 * 1024


@dataclass(frozen=True)
class Target:
    """Shared-memory limits of the GPU the emulation stands for (CUDA's grid and block limits are fixed).

    Attributes:
        smem_per_block: static + dynamic bytes a kernel may use without opting in (48 KB on every GPU).
        smem_per_block_optin: the most a launch that opted in may use (64 KB on sm_75, 99 KB on sm_86/89,
            163 KB on sm_80, 227 KB on sm_90). Equal to ``smem_per_block`` (the default): no opt-in, as
            :func:`.launch.dynamic_smem_limit` assumes for the emulation.
    """

    smem_per_block: int = _DEFAULT_SMEM
    smem_per_block_optin: int = _DEFAULT_SMEM

    def __post_init__(self) -> None:
        if not 0 <= self.smem_per_block <= self.smem_per_block_optin:
            raise ValueError(f"need 0 <= smem_per_block <= smem_per_block_optin, got {self}")


def default_target() -> Target:
    """``Target()`` with ``$DEPRUNE_EMU_SMEM_LIMIT`` / ``$DEPRUNE_EMU_SMEM_OPTIN`` (bytes) if set; read per call."""
    base = int(os.environ.get("DEPRUNE_EMU_SMEM_LIMIT", _DEFAULT_SMEM))
    return Target(base, max(base, int(os.environ.get("DEPRUNE_EMU_SMEM_OPTIN", base))))


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


# ---- sanitizers ------------------------------------------------------------------------------------

def requested_sanitizer() -> str | None:
    """The sanitizer ``$DEPRUNE_EMU_SANITIZE`` asks for: ``"address"`` (``1``, ``true``, ``yes``, ``on``,
    ``address``, ``asan``: ASan + UBSan), ``"thread"`` (``thread``, ``tsan``) or None."""
    return _KIND_WORDS.get(os.environ.get("DEPRUNE_EMU_SANITIZE", "").strip().lower())


def sanitize_requested() -> bool:
    """Whether ``$DEPRUNE_EMU_SANITIZE`` asks for sanitized builds (of either kind, see
    :func:`requested_sanitizer`)."""
    return requested_sanitizer() is not None


def _sanitizer_kind(sanitize: bool | str | None) -> str | None:
    """``launch``'s ``sanitize`` as a kind: None (default: the environment's), False, True (ASan), a kind."""
    if sanitize is None:
        return requested_sanitizer()
    if isinstance(sanitize, bool):
        return "address" if sanitize else None
    if sanitize not in _SANITIZERS:
        raise ValueError(f"unknown sanitizer {sanitize!r}; expected one of {sorted(_SANITIZERS)}")
    return sanitize


@lru_cache(maxsize=8)
def _compiler_file(cxx: str, name: str) -> str | None:
    """Absolute path of the compiler's runtime library ``name`` (``g++ -print-file-name=<name>``), or None."""
    try:
        out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return os.path.realpath(out) if out and os.path.isabs(out) and os.path.exists(out) else None


def _preload_libraries(kind: str = "address") -> tuple[list[str], str]:
    """``(libraries to LD_PRELOAD, "")`` for a process sanitized by ``kind``, or ``([], reason)``."""
    ok, cxx = emulation_available()
    if not ok:
        return [], cxx
    name = _SANITIZERS[kind][2]
    runtime = _compiler_file(cxx, name)
    if runtime is None:
        return [], f"{cxx} -print-file-name={name} names no library (install {name[:-3]} for this compiler)"
    stdcxx = _compiler_file(cxx, "libstdc++.so")
    return [runtime] + ([stdcxx] if stdcxx else []), ""


def sanitizer_available(kind: str = "address") -> tuple[bool, str]:
    """``(True, LD_PRELOAD value)`` if emulation builds sanitized by ``kind`` (``"address"``: ASan + UBSan,
    ``"thread"``: TSan) can run, else ``(False, reason)``."""
    libs, why = _preload_libraries(kind)
    return (True, " ".join(libs)) if libs else (False, why)


def asan_runtime_loaded() -> bool:
    """Whether this process runs with the AddressSanitizer runtime (e.g. under :func:`sanitizer_env`)."""
    return hasattr(ctypes.CDLL(None), "__asan_init")


def tsan_runtime_loaded() -> bool:
    """Whether this process runs with the ThreadSanitizer runtime (``sanitizer_env(kind="thread")``)."""
    return hasattr(ctypes.CDLL(None), "__tsan_init")


def sanitizer_env(env: Mapping[str, str] | None = None, kind: str = "address") -> dict[str, str]:
    """Environment for a subprocess that runs the emulation sanitized: ``env`` (default ``os.environ``) plus

    - ``LD_PRELOAD`` of the compiler's ``libasan.so`` and then ``libstdc++.so``: the ASan runtime must come
      first, and its ``__cxa_throw`` interceptor needs the real one already loaded (``python`` does not link
      libstdc++; without it the first C++ exception thrown by an extension module, e.g. triton's at import,
      fails an ASan CHECK);
    - ``ASAN_OPTIONS=detect_leaks=0`` (CPython and torch keep memory until exit on purpose),
      ``UBSAN_OPTIONS=print_stacktrace=1`` and ``DEPRUNE_EMU_SANITIZE=1``.

    With ``kind="thread"``: ``libtsan.so`` instead of ``libasan.so``, ``TSAN_OPTIONS=exitcode=66`` (a reported
    race makes the process exit with 66 once it ends; the emulation's threads are joined by then, so every
    race of a launch is reported) and ``DEPRUNE_EMU_SANITIZE=thread``.

    Raises RuntimeError when no sanitizer runtime is installed (see :func:`sanitizer_available`)."""
    ok, preload = sanitizer_available(kind)
    if not ok:
        raise RuntimeError(preload)
    out = dict(os.environ if env is None else env)
    out["LD_PRELOAD"] = " ".join(p for p in (preload, out.get("LD_PRELOAD", "")) if p)
    if kind == "thread":
        out["TSAN_OPTIONS"] = ":".join(p for p in ("exitcode=66", out.get("TSAN_OPTIONS", "")) if p)
        out["DEPRUNE_EMU_SANITIZE"] = "thread"
        return out
    out["ASAN_OPTIONS"] = ":".join(p for p in ("detect_leaks=0", out.get("ASAN_OPTIONS", "")) if p)
    out["UBSAN_OPTIONS"] = ":".join(p for p in ("print_stacktrace=1", out.get("UBSAN_OPTIONS", "")) if p)
    out["DEPRUNE_EMU_SANITIZE"] = "1"
    return out


# ---- static shared memory from the library's symbol table ---------------------------------------------

def _elf_shared_objects(path: Path) -> dict[str, int]:
    """``{symbol: size}`` of the data objects in the ``deprune_shared`` section of an ELF64 library: the
    kernel's static ``__shared__`` arrays (function-local statics: ``_ZZ<kernel>E<name>``)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise RuntimeError(f"{path} is not a little-endian ELF64 library")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]

    def cstr(offset: int) -> str:
        return data[offset:data.index(b"\0", offset)].decode()

    section_names = [cstr(names_off + s[0]) for s in sections]
    if _SHARED_SECTION not in section_names:
        return {}
    shared = section_names.index(_SHARED_SECTION)
    symtab = next((s for s in sections if s[1] == 2), None)  # SHT_SYMTAB (the library is never stripped)
    if symtab is None:
        raise RuntimeError(f"{path} has no symbol table")
    strtab_off = sections[symtab[6]][4]
    out: dict[str, int] = {}
    for off in range(symtab[4], symtab[4] + symtab[5], symtab[9]):
        st_name, st_info, _, st_shndx, _, st_size = struct.unpack_from("<IBBHQQ", data, off)
        if st_shndx == shared and st_info & 0xF == 1 and st_size > 0:  # STT_OBJECT
            out[cstr(strtab_off + st_name)] = st_size
    return out


_LOCAL_STATIC = re.compile(r"_ZZ(\d+)(\w+?)E(\d+)(\w+)")


def _enclosing_function(symbol: str) -> tuple[str, str] | None:
    """``(function, variable)`` of a static local of an ``extern "C"`` function (``_ZZ13deprune_dw_drE3s_w``
    -> ``("deprune_dw_dr", "s_w")``); None for other symbols (e.g. statics of C++ helper functions)."""
    m = _LOCAL_STATIC.fullmatch(symbol)
    if m and len(m.group(2)) == int(m.group(1)) and len(m.group(4)) >= int(m.group(3)):
        return m.group(2), m.group(4)[:int(m.group(3))]
    return None


def _kernel_shared_arrays(objects: Mapping[str, int], entry: str) -> dict[str, int]:
    """The static ``__shared__`` arrays a launch of ``entry`` owns, ``{"entry::name": bytes}``: those declared
    in its body, plus those of helper (C++) functions it may call; not those of other kernels in the file."""
    out: dict[str, int] = {}
    for symbol, size in objects.items():
        owner = _enclosing_function(symbol)
        if owner is None:
            out[symbol] = size
        elif owner[0] == entry:
            name = f"{owner[0]}::{owner[1]}"
            out[name if name not in out else symbol] = size
    return out


# ---- build and load ---------------------------------------------------------------------------------

def _wrapper(entry: str, kinds: Sequence[str]) -> str:
    """``extern "C"`` host function ``deprune_emu_<entry>(grid, block, smem, limits, args...)`` -> emu_launch."""
    params = ", ".join(f"{_CPP_TYPES[k]} a{i}" for i, k in enumerate(kinds))
    names = ", ".join(f"a{i}" for i in range(len(kinds)))
    return f"""
#include <cstdio>
#include <exception>
static char deprune_emu_error_[1024];
extern "C" const char* deprune_emu_last_error() {{ return deprune_emu_error_; }}
extern "C" unsigned long long deprune_emu_static_smem_span() {{ return deprune_emu::static_smem_span(); }}
extern "C" int deprune_emu_{entry}(unsigned gx, unsigned gy, unsigned gz,
                                   unsigned bx, unsigned by, unsigned bz, unsigned long long smem,
                                   unsigned long long smem_per_block, unsigned long long smem_per_block_optin,
                                   unsigned long long static_smem, {params}) {{
    try {{
        deprune_emu::LaunchLimits limits;
        limits.smem_per_block = smem_per_block;
        limits.smem_per_block_optin = smem_per_block_optin;
        limits.static_smem = static_smem;
        emu_launch(limits, {entry}, dim3(gx, gy, gz), dim3(bx, by, bz), static_cast<std::size_t>(smem), {names});
        return 0;
    }} catch (const std::exception& e) {{
        std::snprintf(deprune_emu_error_, sizeof deprune_emu_error_, "%s", e.what());
        return 1;
    }}
}}
"""


def _build(src: KernelSource, entry: str, kinds: tuple[str, ...], sanitize: str | None) -> Path:
    ok, cxx = emulation_available()
    if not ok:
        raise RuntimeError(cxx)
    flags = _CXX_FLAGS + (_SANITIZERS[sanitize][0] if sanitize else ())
    header = (src.directory / EMULATION_HEADER).read_text()
    code = src.code + _wrapper(entry, kinds)
    key = hashlib.sha256("\0".join([code, header, cxx, *flags]).encode()).hexdigest()[:24]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / f"{Path(src.name).stem}-{entry}-{key}{_SANITIZERS[sanitize][1] if sanitize else ''}.so"
    if not lib_path.exists():
        # Private build directory + atomic rename: concurrent processes never load a half-written library.
        # The specialised source is kept next to the library (sanitizer reports point at its lines).
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            # The specialised source includes "cuda_host_emulation.h" from the .cu file's directory.
            cpp = Path(tmp) / lib_path.with_suffix(".cpp").name
            cpp.write_text(code)
            tmp_lib = Path(tmp) / "lib.so"
            cmd = [cxx, *flags, f"-fdebug-prefix-map={tmp}={out_dir}", "-I", str(src.directory), "-o", str(tmp_lib),
                   str(cpp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"host emulation build of {src.name} failed:\n{' '.join(cmd)}\n"
                                   f"{proc.stderr[-4000:]}")
            os.replace(cpp, out_dir / cpp.name)
            os.replace(tmp_lib, lib_path)
    return lib_path


def _library(src: KernelSource, entry: str, kinds: tuple[str, ...], sanitize: str | None
             ) -> tuple[ctypes.CDLL, dict[str, int]]:
    key = (src.hash, str(src.directory), entry, kinds, sanitize)
    with _LOCK:
        hit = _LIBS.get(key)
        if hit is None:
            if sanitize == "address" and not asan_runtime_loaded():
                raise RuntimeError(
                    "a sanitized emulation build needs the AddressSanitizer runtime loaded first in the process: "
                    "run it in a subprocess with deprune_plugin.kernels.emulation.sanitizer_env() "
                    "(LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0)")
            if sanitize == "thread" and not tsan_runtime_loaded():
                raise RuntimeError(
                    "a ThreadSanitizer emulation build needs the TSan runtime loaded first in the process: run it "
                    "in a subprocess with deprune_plugin.kernels.emulation.sanitizer_env(kind=\"thread\") "
                    "(LD_PRELOAD=$(g++ -print-file-name=libtsan.so))")
            path = _build(src, entry, kinds, sanitize)
            hit = _LIBS[key] = (ctypes.CDLL(str(path)), _elf_shared_objects(path))
    return hit


def static_shared_arrays(src: KernelSource, entry: str, kinds: Sequence[str] = ()) -> dict[str, int]:
    """``{"kernel::array": bytes}`` of the static ``__shared__`` arrays kernel ``entry`` of ``src`` declares in
    its emulated build (``sizeof`` of each, from the library's symbol table); builds it if needed. ``kinds`` selects the
    wrapper (the argument kinds of a launch); the arrays do not depend on it."""
    _, objects = _library(src, entry, tuple(kinds), None)
    return _kernel_shared_arrays(objects, entry)


# ---- launch records -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchRecord:
    """One emulated launch: what was asked for and what the kernel declares.

    ``static_smem`` is the sum of the ``sizeof`` of the kernel's static ``__shared__`` arrays, listed by
    name in ``shared_arrays``."""

    source: str
    defines: tuple[tuple[str, str], ...]
    entry: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    dynamic_smem: int
    static_smem: int
    shared_arrays: Mapping[str, int] = field(default_factory=dict)


_RECORDERS: list[list[LaunchRecord]] = []


@contextlib.contextmanager
def record_launches() -> Iterator[list[LaunchRecord]]:
    """Collect a :class:`LaunchRecord` for every emulated launch (in any thread) inside the ``with`` block."""
    records: list[LaunchRecord] = []
    with _LOCK:
        _RECORDERS.append(records)
    try:
        yield records
    finally:
        with _LOCK:
            _RECORDERS.remove(records)


def launch(src: KernelSource, entry: str, grid: tuple[int, int, int], block: tuple[int, int, int],
           smem_bytes: int, args: Sequence[KernelArg], *, target: Target | None = None,
           sanitize: bool | str | None = None) -> None:
    """Run ``entry<<<grid, block, smem_bytes>>>(args)`` of ``src`` on the CPU, synchronously.

    ``target``: shared-memory limits (default :func:`default_target`); ``sanitize``: True or ``"address"`` for
    the ASan/UBSan build, ``"thread"`` for the TSan build, False for the plain one (default
    :func:`requested_sanitizer`; each needs its runtime in the process, see :func:`sanitizer_env`).
    Raises RuntimeError, before running anything, for a launch a GPU would refuse.
    Pointer arguments must address CPU memory that stays alive for the call (ctypes releases the GIL).
    """
    target = default_target() if target is None else target
    sanitize = _sanitizer_kind(sanitize)
    kinds = tuple(a.kind for a in args)
    lib, objects = _library(src, entry, kinds, sanitize)
    arrays = _kernel_shared_arrays(objects, entry)
    static_smem = sum(arrays.values())
    if _RECORDERS:
        record = LaunchRecord(src.name, src.defines, entry, tuple(grid), tuple(block), int(smem_bytes), static_smem,
                              arrays)
        with _LOCK:
            for records in _RECORDERS:
                records.append(record)
    fn = getattr(lib, f"deprune_emu_{entry}")
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_ulonglong] * 4 + [_CTYPES[k] for k in kinds]
    for name, dims in (("grid", grid), ("block", block)):
        if len(dims) != 3 or any(not 0 <= int(d) < 2**32 for d in dims):
            raise RuntimeError(f"emulated launch of {entry} failed: {name} {tuple(dims)} is not three "
                               "unsigned 32-bit dimensions")
    if smem_bytes < 0:
        raise RuntimeError(f"emulated launch of {entry} failed: negative dynamic shared memory {smem_bytes}")
    rc = fn(*grid, *block, int(smem_bytes), target.smem_per_block, target.smem_per_block_optin, static_smem,
            *(a.value for a in args))
    if rc != 0:
        lib.deprune_emu_last_error.restype = ctypes.c_char_p
        raise RuntimeError(f"emulated launch of {entry} failed: {lib.deprune_emu_last_error().decode()}")
