"""The one timer of the package: what one call of a callable costs, on the CPU or on a CUDA device.

What is measured:

- CPU: wall time of ``reps`` back-to-back calls (``time.perf_counter``), divided by ``reps``.
- CUDA, ``clock="device"`` (kernel selection): **device time**, free of host launch overhead. The current
  stream is first given a sleep kernel
  long enough that the ``reps`` calls are all queued behind it; events recorded after the sleep and after
  the last call then bracket kernels that run back to back with the GPU kept busy (an idle GPU between
  synchronised calls would otherwise count the Python launch cost as kernel time). The host time of
  queueing the calls is measured separately (``host_s``): on the CPU side that is what a call costs.

:func:`interleaved_medians` runs several candidates round-robin (A, B, C, A, B, C, ...) so that drift
(thermal, other load) hits all of them alike, and reports medians.

- CUDA, ``clock="wall"`` (end-to-end latency, what a caller waits): synchronise, call, synchronise;
  launch overhead included, as a batch-1 user sees it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

__all__ = ["CLOCKS", "CallTime", "L2_FLUSH_BYTES", "flush_l2", "time_call", "interleaved_medians"]

_SLEEP_CYCLES_PER_CALL = 200_000  # ~100 us at 2 GHz per queued call: enough to queue Python launches


@dataclass(frozen=True)
class CallTime:
    """Seconds per call: ``device_s`` (kernel time on CUDA, wall time on CPU) and ``host_s`` (time the
    calling thread spent issuing the call; equal to ``device_s`` on the CPU)."""

    device_s: float
    host_s: float


CLOCKS = ("device", "wall")

#: bytes written to evict the L2 cache before a cold-cache sample: 5x an H100/H200's 50 MB L2
L2_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buffers: dict[torch.device, torch.Tensor] = {}


def flush_l2(device: torch.device) -> None:
    """Evict the GPU's L2 cache by writing :data:`L2_FLUSH_BYTES` (queued on the current stream; the buffer
    is allocated once per device). A layer whose input fits in L2 (50 MB on an H100) is otherwise timed
    from L2 when it runs back to back, faster than inside a network where other layers' data passes
    through in between."""
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    buf.zero_()


def time_call(fn: Callable[[], Any], device: torch.device | str = "cpu", reps: int = 1,
              clock: str = "device", cold_l2: bool = False) -> CallTime:
    """Time ``reps`` back-to-back calls of ``fn`` (see the module doc for what is measured).

    ``cold_l2`` (CUDA, device clock): :func:`flush_l2` before every call, each call timed between its own
    events so the flush is not counted; the per-call device time is then the cold-cache one."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    device = torch.device(device)
    if device.type == "cuda" and clock == "wall":
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(device)
        t = (time.perf_counter() - t0) / reps
        return CallTime(t, t)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t = (time.perf_counter() - t0) / reps
        return CallTime(t, t)
    if cold_l2:
        return _time_cold(fn, device, reps)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    with torch.cuda.device(device):
        torch.cuda._sleep(_SLEEP_CYCLES_PER_CALL * reps)  # the GPU is busy while the calls are queued
        start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host = (time.perf_counter() - t0) / reps
        end.record()
        end.synchronize()
    return CallTime(start.elapsed_time(end) / 1e3 / reps, host)


def _time_cold(fn: Callable[[], Any], device: torch.device, reps: int) -> CallTime:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    host = 0.0
    with torch.cuda.device(device):
        torch.cuda._sleep(_SLEEP_CYCLES_PER_CALL * reps)
        for start, end in events:
            flush_l2(device)
            start.record()
            t0 = time.perf_counter()
            fn()
            host += time.perf_counter() - t0
            end.record()
        events[-1][1].synchronize()
    return CallTime(sum(s.elapsed_time(e) for s, e in events) / 1e3 / reps, host / reps)


@torch.inference_mode()
def interleaved_medians(candidates: Mapping[str, Callable[[], object]], reps: int = 30, warmup: int = 3,
                        device: torch.device | str = "cpu", quiet: bool = True,
                        desc: str = "timing", clock: str = "wall", gap_s: float = 0.0,
                        cold_l2: bool = False) -> dict[str, float]:
    """Median seconds per call (``device_s``) of each candidate, measured interleaved.

    Args:
        candidates: name -> zero-argument callable.
        reps: timed rounds (each round calls every candidate once; round ``r`` starts at candidate
            ``r mod n``, so no candidate always runs right after the same other one: on a CPU the one
            before leaves caches and thread pools in its state, which biases a fixed order by several %).
        warmup: untimed rounds first.
        device: where the callables run.
        clock: ``"wall"`` (default: end-to-end latency) or ``"device"`` (CUDA kernel time).
        quiet: hide the progress bar.
        gap_s: idle seconds before each timed call (not timed). On a CPU the threads of the previous
            candidate keep spinning for a while after it returns (OpenMP wait policy, runtime thread pools)
            and slow the next one down: a gap of a few ms lets them go to sleep, so no candidate pays for
            the one timed before it.
        cold_l2: on CUDA with the device clock, flush the L2 cache before every timed call
            (:func:`flush_l2`): candidates that read the same input otherwise find it in L2.
    """
    from tqdm.auto import tqdm

    if reps <= 0 or warmup < 0:
        raise ValueError(f"reps must be > 0 and warmup >= 0, got {reps}, {warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    # disable=None: no bar unless stderr is a terminal (in a log, its \r updates pile up into one line)
    items = list(candidates.items())
    for r in tqdm(range(reps), desc=desc, disable=quiet or None, leave=False):
        k = r % len(items)
        for name, fn in items[k:] + items[:k]:
            if gap_s > 0:
                time.sleep(gap_s)
            samples[name].append(time_call(fn, device, clock=clock, cold_l2=cold_l2).device_s)
    return {k: statistics.median(v) for k, v in samples.items()}
