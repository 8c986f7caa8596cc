"""The one tolerance rule of every self-check, on hand-checkable numbers."""
from __future__ import annotations

import torch

from deprune_plugin.core.agreement import RTOL, agreement


def test_fp32_bound_is_relative_plus_scale():
    ref = torch.tensor([100.0, 1.0, 0.0])
    # bound per element: 1e-4 * (|ref| + 100) = 0.02, 0.0101, 0.01
    assert agreement(ref + torch.tensor([0.019, 0.0100, 0.0099]), ref).ok
    bad = agreement(ref + torch.tensor([0.0, 0.0, 0.0101]), ref)
    assert not bad.ok and abs(bad.max_err - 0.0101) < 1e-6 and bad.scale == 100.0 and "rtol 0.0001" in bad.reason


def test_tolerance_follows_the_storage_dtype():
    ref = torch.ones(4, dtype=torch.float16)
    got = ref + 0.015  # 1.5% off: fine for fp16 (rtol 1e-2 on |ref| + scale = 0.02), not for fp32
    assert agreement(got, ref).ok and not agreement(got.float(), ref.float()).ok
    assert RTOL[torch.bfloat16] > RTOL[torch.float16] > RTOL[torch.float32]


def test_shapes_and_non_finite_positions_must_match():
    assert "shape" in agreement(torch.zeros(2, 3), torch.zeros(3, 2)).reason
    nan = torch.tensor([float("nan"), 1.0])
    assert agreement(nan.clone(), nan).ok
    assert not agreement(torch.tensor([0.0, 1.0]), nan).ok
    assert not agreement(torch.tensor([float("inf")]), torch.tensor([float("-inf")])).ok
    assert not agreement("x", torch.zeros(1)).ok
