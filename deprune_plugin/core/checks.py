"""Argument checks shared by every layer: one wording for one mistake.

Each check raises before anything is changed and names the argument, so a failing call leaves the
user's model untouched.
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Sequence


def check_ratio(value: Any, name: str = "ratio") -> float:
    """A pruning ratio: a real number (Python, NumPy or a 0-d tensor value) in ``[0, 1)``, not a bool.

    Returns:
        the ratio as a Python float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_positive_int(value: Any, name: str) -> int:
    """A positive Python/NumPy integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """A real bool: ``"yes"`` or ``1`` are refused (a truthy string would silently mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def pair(value: int | Sequence[int], name: str, minimum: int) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair of ints, each ``>= minimum``."""
    vals = (value, value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else tuple(value)
    if len(vals) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in vals):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(vals) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(vals[0]), int(vals[1])


#: How every file ``torch.save`` writes begins: a zip archive (the default since torch 1.6) or a pickle
#: (the legacy format; protocol 2 and later open with the PROTO opcode).
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


def torch_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a file ``torch.save`` wrote, judged by its first bytes, or ``None`` if it could be.

    Meant for after ``torch.load`` failed: a text or foreign file otherwise surfaces as torch's unpickling
    error, which reads as if full unpickling (``weights_only=False``) would help. Returns e.g. ``"not a
    PyTorch file: it is empty"``, for the caller to put after the file's name.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None  # unreadable is another problem, reported by whoever opens it
    if head.startswith(TORCH_FILE_MAGIC):
        return None
    if not head:
        return "not a PyTorch file: it is empty"
    return (f"not a PyTorch file: it starts with {head!r}, while torch.save writes a zip archive "
            f"({TORCH_FILE_MAGIC[0]!r}) or a pickle ({TORCH_FILE_MAGIC[1]!r})")
