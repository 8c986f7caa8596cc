"""Per-layer kernel selection by measurement: time every candidate on first use, keep the fastest.

No kernel wins everywhere (a dense cuDNN DW conv, the direct tap-sparse kernel and the DR GEMM trade
places with shape, dtype, layout and kept-tap count), so each layer owns a :class:`KernelDispatcher`
over its candidate callables and caches the winner per input signature.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping

import torch

from ..core.timing import time_call

__all__ = ["Choice", "KernelDispatcher", "Timer", "default_timer", "dispatch_key"]

#: ``timer(fn, device) -> seconds`` for ONE call of ``fn``.
Timer = Callable[[Callable[[], Any], torch.device], float]


def default_timer(fn: Callable[[], Any], device: torch.device) -> float:
    """Device seconds of one ``fn()`` call (:func:`deprune_plugin.core.timing.time_call`)."""
    return time_call(fn, device).device_s


def _memory_format(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def dispatch_key(x: torch.Tensor) -> tuple[Hashable, ...]:
    """Cache key of an input: ``(shape, dtype, device, memory format)``."""
    return tuple(x.shape), x.dtype, str(x.device), _memory_format(x)


@dataclass
class Choice:
    """Outcome of one selection: the winner, the median seconds of every candidate that ran, and the
    ``"ExceptionType: message"`` of every candidate that raised (and was skipped)."""

    name: str
    timings: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class KernelDispatcher:
    """Pick the fastest of ``candidates`` per input signature, measured on first use.

    Args:
        candidates: ``{"dense": fn, "direct": fn, "dr": fn}``; each ``fn(x, *args, **kwargs)`` computes the
            same result. Iteration order breaks ties (the first listed wins).
        warmup: untimed calls per candidate (compilation, cuDNN autotuning, caches).
        reps: timed calls per candidate; the median is compared.
        timer: ``timer(fn, device) -> seconds`` of one call; default :func:`default_timer`. Injectable for
            tests.

    Calling the dispatcher runs the chosen candidate. :attr:`cache` maps :func:`dispatch_key` tuples to
    :class:`Choice`; :meth:`choice` reads it.
    """

    def __init__(self, candidates: Mapping[str, Callable[..., Any]], *, warmup: int = 3, reps: int = 10,
                 timer: Timer | None = None) -> None:
        if not candidates:
            raise ValueError("candidates must name at least one callable")
        for name, fn in candidates.items():
            if not callable(fn):
                raise TypeError(f"candidate {name!r} is not callable")
        if warmup < 0 or reps < 1:
            raise ValueError(f"need warmup >= 0 and reps >= 1, got warmup={warmup}, reps={reps}")
        self.candidates = dict(candidates)
        self.warmup = warmup
        self.reps = reps
        self.timer: Timer = timer or default_timer
        self.cache: dict[tuple[Hashable, ...], Choice] = {}

    def choice(self, key: tuple[Hashable, ...]) -> str | None:
        """Name of the candidate chosen for ``key`` (see :func:`dispatch_key`), or None if not timed yet."""
        c = self.cache.get(key)
        return None if c is None else c.name

    def select(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Choice:
        """Time every candidate on ``x`` (unless cached) and return the cached :class:`Choice`."""
        key = dispatch_key(x)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("KernelDispatcher: no choice cached for this input while a CUDA graph is being"
                               " captured; run one warm-up call with the same input signature before capture")
        timings: dict[str, float] = {}
        errors: dict[str, str] = {}
        for name, fn in self.candidates.items():
            def call(fn=fn):
                return fn(x, *args, **kwargs)
            try:
                for _ in range(self.warmup):
                    call()
                timings[name] = statistics.median(self.timer(call, x.device) for _ in range(self.reps))
            except Exception as exc:  # a candidate that cannot run this input is skipped, reason kept
                errors[name] = f"{type(exc).__name__}: {exc}"
        if not timings:
            detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
            raise RuntimeError(f"KernelDispatcher: every candidate failed for input {key}: {detail}")
        best = min(timings, key=timings.__getitem__)  # min keeps the first of equal times
        choice = self.cache[key] = Choice(best, timings, errors)
        return choice

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run the fastest candidate for ``x``'s signature (timing all of them on first use)."""
        return self.candidates[self.select(x, *args, **kwargs).name](x, *args, **kwargs)
