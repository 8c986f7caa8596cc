"""Latency measurement: interleaved medians, CPU or CUDA.

Candidates are run round-robin (A, B, C, A, B, C, ...) so that drift (thermal, other load) hits all of
them alike; each sample is one call. CUDA samples use events on the current stream.
"""
from __future__ import annotations

import statistics
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from .kernels.dispatch import default_timer


@torch.inference_mode()
def interleaved_medians(candidates: Mapping[str, Callable[[], object]], reps: int = 30, warmup: int = 3,
                        cuda: bool = False, quiet: bool = True, desc: str = "timing") -> dict[str, float]:
    """Median seconds per call of each candidate, measured interleaved.

    Args:
        candidates: name -> zero-argument callable.
        reps: timed rounds (each round calls every candidate once).
        warmup: untimed rounds first.
        cuda: time with CUDA events (callables launch on the current stream).
        quiet: hide the progress bar.
    """
    if reps <= 0 or warmup < 0:
        raise ValueError(f"reps must be > 0 and warmup >= 0, got {reps}, {warmup}")
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in tqdm(range(reps), desc=desc, disable=quiet, leave=False):
        for name, fn in candidates.items():
            samples[name].append(default_timer(fn, device))
    return {k: statistics.median(v) for k, v in samples.items()}
