"""Random shapes through both kernels' host emulation, against F.conv2d on the masked weight.

One generator (tests/kernel_cases.py: ``fuzz_shapes``) draws kernel 3/5/7 (sometimes non-square), stride and
dilation 1/2 per axis, mostly odd channel counts, batch 1-3, NCHW / NHWC, fp32 / fp16 / bf16, every
activation, random tap density with all-pruned channels, and padding that is symmetric, TensorFlow "SAME"
(asymmetric ``(top, bottom, left, right)`` computed from the input size) or arbitrary asymmetric; dw_dr also
draws group-size / K-tile variants. Shapes are grouped by specialisation, so each emulation library is built
and loaded once and then serves all its shapes.

- default run: a fixed sample, the first ``CI_SHAPES`` shapes of each kernel's stream;
- ``pytest -m fuzz tests/test_emulation_fuzz.py``: the first ``$DEPRUNE_FUZZ_SHAPES`` (default 1000) shapes.
"""
from __future__ import annotations

import os
import shutil
from collections import Counter

import pytest
from kernel_cases import FUZZ_KERNELS, KERNELS, MUTATIONS, fuzz_shapes, run_fuzz

from deprune_plugin.kernels import emulation_available
from deprune_plugin.kernels.sources import cuda_dir

_OK, _WHY = emulation_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"host emulation unavailable: {_WHY}")

CI_SHAPES = 40
FUZZ_SHAPES = int(os.environ.get("DEPRUNE_FUZZ_SHAPES", 1000))


def check(kernel: str, count: int) -> None:
    shapes = fuzz_shapes(kernel, count)
    failures = run_fuzz(kernel, shapes)
    modes = Counter(s.padding_mode for s in shapes)
    print(f"{kernel}: {len(shapes)} shapes, {len({s.specialisation for s in shapes})} specialisations, "
          f"padding {dict(modes)}, {len(failures)} failures")
    assert not failures, f"{len(failures)} of {len(shapes)} shapes failed:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("kernel", FUZZ_KERNELS)
def test_fixed_sample(kernel):
    check(kernel, CI_SHAPES)


@pytest.mark.fuzz
@pytest.mark.parametrize("kernel", FUZZ_KERNELS)
def test_fuzz(kernel):
    assert FUZZ_SHAPES >= 1000 or "DEPRUNE_FUZZ_SHAPES" in os.environ
    check(kernel, FUZZ_SHAPES)


def test_sample_covers_the_space():
    """The fixed sample is a prefix of the fuzz stream and already spans every axis the fuzz varies."""
    for kernel in FUZZ_KERNELS:
        sample, longer = fuzz_shapes(kernel, CI_SHAPES), fuzz_shapes(kernel, 3 * CI_SHAPES)
        assert sample == longer[:CI_SHAPES]
        assert {s.dtype for s in sample} == {"fp32", "fp16", "bf16"}
        assert {s.layout for s in sample} == {"nchw", "nhwc"}
        assert {s.padding_mode for s in sample} == {"symmetric", "same", "asymmetric"}
        assert {s.case.kernel[0] for s in sample} == {3, 5, 7}
        assert {s.case.stride for s in sample} >= {(1, 1), (2, 2)}
        assert {s.case.dilation for s in sample} >= {(1, 1), (2, 2)}
        assert any(s.case.c % 2 for s in sample)
        same = [s for s in sample if s.padding_mode == "same"]
        assert any(p[0] != p[1] or p[2] != p[3] for p in (s.case.padding for s in same)), "no uneven SAME pads"


@pytest.mark.parametrize("kernel", FUZZ_KERNELS)
def test_fuzz_catches_a_planted_bug(tmp_path, monkeypatch, kernel):
    """The fuzz comparison can fail: with the top padding dropped from the kernel source, the sample's fp32
    NCHW shapes (one specialisation to build) report mismatches."""
    cu_file = KERNELS[kernel].cu_file
    (mutation,) = [m for m in MUTATIONS if m.cu_file == cu_file and m.why == "top padding dropped"]
    mutated = tmp_path / "cuda"
    shutil.copytree(cuda_dir(), mutated)
    source = (mutated / cu_file).read_text()
    assert source.count(mutation.old) == mutation.count
    (mutated / cu_file).write_text(source.replace(mutation.old, mutation.new))
    monkeypatch.setenv("DEPRUNE_CUDA_DIR", str(mutated))
    shapes = [s for s in fuzz_shapes(kernel, CI_SHAPES) if s.specialisation == ("fp32", "nchw", 32, 32)]
    padded = [s for s in shapes if s.case.pads[0] > 0]
    assert padded, "the sample has no fp32 NCHW shape with top padding"
    assert len(run_fuzz(kernel, shapes)) >= len(padded) // 2
