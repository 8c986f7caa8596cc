"""Kernel sources: locate ``cuda/*.cu``, specialise them with ``#define``s, hash them for caching.

The sources live in the repository's top-level ``cuda/`` folder; the wheel ships them inside the package
as ``deprune_plugin/_cuda/`` (pyproject.toml maps that data-only package to ``cuda/``), found through
:mod:`importlib.resources`. An editable install or a source checkout has no ``_cuda/`` folder and reads
``cuda/`` next to the package instead (see :func:`cuda_dir`).

The same specialised text is compiled by NVRTC (:mod:`.cupy_launch`) and by g++ against
``cuda/cuda_host_emulation.h`` (:mod:`.emulation`). Kernel arguments are described backend-neutrally
with :class:`KernelArg` so that both backends marshal them identically.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, NamedTuple

import torch

__all__ = ["EMULATION_HEADER", "PACKAGED_DIR", "KernelArg", "KernelSource", "arg_f32", "arg_i32", "arg_ptr",
           "cuda_dir", "scalar_define", "specialize"]

#: Header the host emulation needs next to the ``.cu`` files (never used by NVRTC/nvcc builds).
EMULATION_HEADER = "cuda_host_emulation.h"

_SCALAR_DEFINES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


#: Folder, inside the installed package, where the wheel puts the ``cuda/`` files.
PACKAGED_DIR = "_cuda"
_PACKAGE = __name__.split(".")[0]
_EXTRACTED: dict[str, Path] = {}
_EXTRACT_LOCK = threading.Lock()


def _packaged_dir() -> Path | None:
    """The sources shipped inside the installed package (``deprune_plugin/_cuda``), or None when the
    package has none (editable install, source checkout). A package imported from a zip is unpacked once
    into a temporary folder: the builds need real files and an include directory."""
    try:
        root = importlib.resources.files(_PACKAGE).joinpath(PACKAGED_DIR)
        if not root.is_dir():
            return None
    except (ModuleNotFoundError, OSError):
        return None
    if isinstance(root, Path):
        return root
    with _EXTRACT_LOCK:
        key = str(root)
        if key not in _EXTRACTED:
            out = Path(tempfile.mkdtemp(prefix="deprune_cuda_"))
            for item in root.iterdir():
                if item.is_file():
                    (out / item.name).write_bytes(item.read_bytes())
            _EXTRACTED[key] = out
        return _EXTRACTED[key]


def cuda_dir() -> Path:
    """Directory holding the ``.cu`` sources, the first of:

    1. ``$DEPRUNE_CUDA_DIR`` if set (read on every call, so tests can redirect it);
    2. the copy shipped in the installed package, ``importlib.resources.files("deprune_plugin") / "_cuda"``
       (a wheel install);
    3. ``<repo root>/cuda``, the parent of the ``deprune_plugin`` package (editable install, checkout).
    """
    env = os.environ.get("DEPRUNE_CUDA_DIR")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"CUDA source directory {path} (from $DEPRUNE_CUDA_DIR) not found")
        return path
    packaged = _packaged_dir()
    if packaged is not None:
        return packaged
    path = Path(__file__).resolve().parents[2] / "cuda"
    if not path.is_dir():
        raise FileNotFoundError(
            f"CUDA kernel sources not found: neither {_PACKAGE}/{PACKAGED_DIR} in the installed package nor "
            f"{path} (a source checkout). Reinstall the package from a wheel or with `pip install -e .` from "
            "the repository, or set DEPRUNE_CUDA_DIR to the repository's cuda/ directory")
    return path


def scalar_define(dtype: torch.dtype) -> str:
    """The ``DEPRUNE_SCALAR`` value for a storage dtype (float32, float16 or bfloat16)."""
    try:
        return _SCALAR_DEFINES[dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {dtype}; expected float32, float16 or bfloat16") from None


@dataclass(frozen=True)
class KernelSource:
    """One specialisation of one ``.cu`` file.

    Attributes:
        name: file name, e.g. ``"dw_direct.cu"``.
        directory: where it was read from (the emulation build adds it to the include path).
        defines: ``((NAME, value), ...)`` sorted, prepended as ``#define NAME value``.
        code: the full specialised source.
        hash: sha256 hex digest of ``code``; the compile-cache key of both backends.
    """

    name: str
    directory: Path
    defines: tuple[tuple[str, str], ...]
    code: str
    hash: str


_LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"[ \t]*$', re.M)


def _inline_headers(text: str, directory: Path, seen: set[str]) -> str:
    """Replace ``#include "x.cuh"`` of the project's own headers with their text (once each), so the
    specialised source is self-contained for NVRTC and nvcc. The emulation header stays an include: the
    GPU builds never reach it, and the emulation build passes ``-I`` for it."""
    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name == EMULATION_HEADER:
            return m.group(0)
        if name in seen:
            return f"// {name} already inlined"
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"kernel header {path} (included by a .cu file) not found")
        seen.add(name)
        return f"// ---- begin {name}\n{_inline_headers(path.read_text(), directory, seen)}// ---- end {name}"
    return _LOCAL_INCLUDE.sub(repl, text)


def _mtimes(directory: Path) -> tuple[int, ...]:
    return tuple(p.stat().st_mtime_ns for p in sorted(directory.glob("*.cu*")))


@lru_cache(maxsize=256)
def _specialize_cached(path: str, mtimes: tuple[int, ...], defines: tuple[tuple[str, str], ...]) -> KernelSource:
    text = _inline_headers(Path(path).read_text(), Path(path).parent, set())
    header = "".join(f"#define {k} {v}\n" for k, v in defines)
    code = f"// specialisation of {Path(path).name}\n{header}{text}"
    digest = hashlib.sha256(code.encode()).hexdigest()
    return KernelSource(Path(path).name, Path(path).parent, defines, code, digest)


def specialize(name: str, defines: Mapping[str, object]) -> KernelSource:
    """Read ``cuda_dir() / name``, inline the project headers it includes and prepend ``#define``s; cached
    per (path, modification times of the sources, defines)."""
    path = cuda_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} not found")
    for k in defines:
        if not k.isidentifier():
            raise ValueError(f"invalid define name {k!r}")
    items = tuple(sorted((str(k), str(v)) for k, v in defines.items()))
    return _specialize_cached(str(path), _mtimes(path.parent), items)


class KernelArg(NamedTuple):
    """One kernel argument: ``kind`` is ``"ptr"`` (address, 0 for nullptr), ``"i32"`` or ``"f32"``."""

    kind: str
    value: int | float


def arg_ptr(t: torch.Tensor | None) -> KernelArg:
    """Pointer argument from a (contiguous) tensor, or nullptr for ``None``."""
    return KernelArg("ptr", 0 if t is None else int(t.data_ptr()))


def arg_i32(v: int) -> KernelArg:
    """``int`` argument; raises ValueError if it does not fit in 32 bits."""
    v = int(v)
    if not -(2**31) <= v < 2**31:
        raise ValueError(f"kernel int argument {v} does not fit in int32")
    return KernelArg("i32", v)


def arg_f32(v: float) -> KernelArg:
    """``float`` argument."""
    return KernelArg("f32", float(v))
