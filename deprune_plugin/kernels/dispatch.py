"""Per-layer kernel selection, checked and measured on first use of each input signature.

No kernel wins everywhere (a dense cuDNN DW conv, the direct tap-sparse kernel and the DR GEMM trade
places with shape, dtype, layout and kept-tap count), so each layer owns a :class:`KernelDispatcher` over
its candidate callables. On the first call with a new input signature it

1. runs the **reference** candidate (the dense conv, listed first by default; with TF32 off, see
   :func:`deprune_plugin.core.precision.no_tf32`) and every other candidate, and compares each output with the
   reference (:func:`deprune_plugin.core.agreement.agreement`,
   dtype-aware). A candidate that raises or disagrees is **dropped** for that signature, warned about once
   per layer and candidate, and listed with its reason in :attr:`Choice.dropped`. A CUDA error is never
   treated as "this candidate cannot run": it is re-raised, since a sticky context error would make every
   later fallback fail too (or, worse, look like it worked);
2. times the survivors (:func:`deprune_plugin.core.timing.time_call`: device time of back-to-back calls with
   the GPU kept busy; the host time of issuing a call is kept separately) and caches the fastest.

Selection is thread-safe. Choices can be made ahead of time (:meth:`KernelDispatcher.select`) and restored
(:meth:`KernelDispatcher.restore`) so that a saved accelerated model does not re-time known signatures.
"""
from __future__ import annotations

import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping

import torch

from ..core.agreement import agreement
from ..core.precision import no_tf32
from ..core.timing import CallTime, time_call

__all__ = ["Choice", "KernelDispatcher", "Timer", "dispatch_key", "is_cuda_error"]

#: ``timer(fn, device) -> CallTime`` (or plain seconds) for ONE call of ``fn``.
Timer = Callable[[Callable[[], Any], torch.device], "CallTime | float"]

_CUDA_ERROR_TYPES = {"CUDARuntimeError", "CUDADriverError", "AcceleratorError", "CUDAError", "CudaAPIError"}
_CUDA_ERROR_TEXT = ("CUDA error", "cudaError", "CUDA_ERROR", "an illegal memory access", "device-side assert")


def is_cuda_error(exc: BaseException) -> bool:
    """True for errors of the CUDA runtime/driver (raised by CuPy or torch), also when chained."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ in _CUDA_ERROR_TYPES or any(t in str(seen) for t in _CUDA_ERROR_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _memory_format(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def dispatch_key(x: torch.Tensor) -> tuple[Hashable, ...]:
    """Cache key of an input: ``(shape, dtype, device, memory format)``."""
    return tuple(x.shape), x.dtype, x.device, _memory_format(x)


@dataclass
class Choice:
    """Outcome of one selection.

    Attributes:
        name: the chosen candidate.
        timings: median device seconds per call of every candidate that passed the check.
        host: median host seconds per call (Python + launch) of the same candidates.
        dropped: ``{candidate: reason}`` for candidates that raised or disagreed with the reference.
    """

    name: str
    timings: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (what a state dict or a JSON report can hold)."""
        return {"name": self.name, "timings": dict(self.timings), "host": dict(self.host),
                "dropped": dict(self.dropped)}


def _as_call_time(t: "CallTime | float") -> CallTime:
    return t if isinstance(t, CallTime) else CallTime(float(t), float(t))


class KernelDispatcher:
    """Pick the fastest correct candidate per input signature, checked and measured on first use.

    Args:
        candidates: ``{"dense": fn, "direct": fn, "dr": fn}``; each ``fn(x, *args, **kwargs)`` computes the
            same result. Iteration order breaks timing ties (the first listed wins).
        reference: the candidate the others are checked against (default: the first listed). It is never
            dropped; if it raises, selection raises.
        warmup: untimed calls per candidate (compilation, cuDNN autotuning, caches).
        reps: timed samples per candidate; the median is compared.
        calls_per_sample: back-to-back calls in one timed sample (one host sync per sample, not per call).
        timer: ``timer(fn, device) -> CallTime | seconds`` for one call; default
            :func:`deprune_plugin.core.timing.time_call`. Injectable for tests.
        check: compare candidates with the reference before timing them (default True).
        label: names the layer in warnings (e.g. ``"blocks.1.0.conv_dw"``).
        gap_s: idle seconds before each sample (CPU candidates: lets the previous one's threads stop
            spinning, see :func:`~deprune_plugin.core.timing.interleaved_medians`).
        margin: a candidate listed later must be faster than the best earlier one by more than this
            fraction to be chosen (0: the fastest wins). Candidates whose measured times differ by less than
            the measurement's noise then keep the listed preference instead of a coin flip.
        slack: ``slack(ref, x, *args, **kwargs) -> float``, called once per selection: an absolute error the
            reference output itself may carry (e.g. a whole model's fp32 rounding), added to the check's
            tolerance (:func:`~deprune_plugin.core.agreement.agreement`). Default: none.

    Calling the dispatcher runs the chosen candidate. :attr:`cache` maps :func:`dispatch_key` tuples to
    :class:`Choice`.
    """

    def __init__(self, candidates: Mapping[str, Callable[..., Any]], *, reference: str | None = None,
                 warmup: int = 2, reps: int = 5, calls_per_sample: int = 4, timer: Timer | None = None,
                 check: bool = True, label: str = "", gap_s: float = 0.0, margin: float = 0.0,
                 slack: Callable[..., float] | None = None) -> None:
        if not candidates:
            raise ValueError("candidates must name at least one callable")
        for name, fn in candidates.items():
            if not callable(fn):
                raise TypeError(f"candidate {name!r} is not callable")
        if warmup < 0 or reps < 1 or calls_per_sample < 1:
            raise ValueError(f"need warmup >= 0, reps >= 1 and calls_per_sample >= 1, got warmup={warmup}, "
                             f"reps={reps}, calls_per_sample={calls_per_sample}")
        self.candidates = dict(candidates)
        self.reference = reference if reference is not None else next(iter(self.candidates))
        if self.reference not in self.candidates:
            raise ValueError(f"reference {self.reference!r} is not a candidate ({sorted(self.candidates)})")
        self.warmup = warmup
        self.reps = reps
        self.calls_per_sample = calls_per_sample
        self.timer: Timer = timer or time_call
        self.check = check
        self.label = label
        self.gap_s = gap_s
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        self.margin = margin
        # slack(ref, x, *args, **kwargs) -> an absolute error the reference itself may carry (see agreement())
        self.slack = slack
        self.cache: dict[tuple[Hashable, ...], Choice] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def choice(self, key: tuple[Hashable, ...]) -> str | None:
        """Name of the candidate chosen for ``key`` (see :func:`dispatch_key`), or None if not selected yet."""
        c = self.cache.get(key)
        return None if c is None else c.name

    def restore(self, key: tuple[Hashable, ...], name: str) -> None:
        """Reuse an earlier selection (e.g. from a saved model) for ``key`` without re-timing."""
        if name not in self.candidates:
            raise ValueError(f"{name!r} is not a candidate ({sorted(self.candidates)})")
        self.cache[key] = Choice(name)

    def _drop(self, dropped: dict[str, str], name: str, reason: str) -> None:
        dropped[name] = reason
        if name not in self._warned:
            self._warned.add(name)
            where = f" for {self.label}" if self.label else ""
            warnings.warn(f"deprune_plugin: kernel {name!r}{where} dropped: {reason}", RuntimeWarning, stacklevel=4)

    def _sample(self, fn: Callable[[], Any], device: torch.device) -> CallTime:
        """One timed sample: ``calls_per_sample`` back-to-back calls, per-call times."""
        n = self.calls_per_sample
        if self.timer is time_call:
            # time_call queues its GPU sleep for all n calls, so the GPU stays busy through the whole sample
            # (a sleep sized for one call would let the GPU idle while Python issues the other n - 1)
            return time_call(fn, device, reps=n)

        def batch() -> None:
            for _ in range(n):
                fn()
        t = _as_call_time(self.timer(batch, device))
        return CallTime(t.device_s / n, t.host_s / n)

    def _time_all(self, calls: Mapping[str, Callable[[], Any]], device: torch.device) -> dict[str, CallTime]:
        """Median per-call time of each candidate, samples taken round-robin (A, B, C, A, B, C, ...) so that
        drift (clocks, caches, other load) hits every candidate alike."""
        for fn in calls.values():
            for _ in range(self.warmup):
                fn()
        samples: dict[str, list[CallTime]] = {name: [] for name in calls}
        for _ in range(self.reps):
            for name, fn in calls.items():
                if self.gap_s > 0:
                    time.sleep(self.gap_s)
                samples[name].append(self._sample(fn, device))
        return {name: CallTime(statistics.median(s.device_s for s in ss), statistics.median(s.host_s for s in ss))
                for name, ss in samples.items()}

    def select(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Choice:
        """Check and time every candidate on ``x`` (unless cached) and return the cached :class:`Choice`."""
        key = dispatch_key(x)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("KernelDispatcher: no choice cached for this input while a CUDA graph is being"
                               " captured; run one warm-up call with the same input signature before capture")
        with self._lock:
            cached = self.cache.get(key)  # another thread may have selected meanwhile
            if cached is not None:
                return cached
            choice = self._select(x, args, kwargs)
            self.cache[key] = choice
            return choice

    def _select(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Choice:
        dropped: dict[str, str] = {}
        # Without TF32: a cuDNN fp32 reference would otherwise carry ~1e-3 error, more than the fp32 check allows
        with no_tf32():
            ref = self.candidates[self.reference](x, *args, **kwargs)  # raises: nothing to fall back to
            slack = self.slack(ref, x, *args, **kwargs) if self.check and self.slack is not None else 0.0
        passed = [self.reference]
        for name, fn in self.candidates.items():
            if name == self.reference:
                continue
            try:
                out = fn(x, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot run this input is dropped, below
                if is_cuda_error(exc):
                    raise
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)  # surfaces a sticky error the candidate may have left
                self._drop(dropped, name, f"raised {type(exc).__name__}: {exc}")
                continue
            if self.check:
                agree = agreement(out, ref, x.dtype, slack=slack)
                if not agree.ok:
                    self._drop(dropped, name, f"disagrees with {self.reference}: {agree.reason}")
                    continue
            passed.append(name)
        calls = {name: (lambda fn=self.candidates[name]: fn(x, *args, **kwargs)) for name in passed}
        measured = self._time_all(calls, x.device)
        timings = {name: t.device_s for name, t in measured.items()}
        host = {name: t.host_s for name, t in measured.items()}
        best = None
        for name in self.candidates:  # listed order: the first of ties (and of near-ties, with a margin) wins
            if name in timings and (best is None or timings[name] < timings[best] * (1.0 - self.margin)):
                best = name
        return Choice(best, timings, host, dropped)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run the fastest correct candidate for ``x``'s signature (checking and timing them on first use)."""
        return self.candidates[self.select(x, *args, **kwargs).name](x, *args, **kwargs)
