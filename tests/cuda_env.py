"""Whether the real-GPU tests can run here: the marks every `cuda` test module carries."""
from __future__ import annotations

import pytest
import torch

from deprune_plugin.kernels import cupy_available


def cuda_skip_reason() -> str | None:
    """Why real CUDA kernels cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    ok, why = cupy_available()
    return None if ok else why


_REASON = cuda_skip_reason()
#: ``pytestmark = CUDA_MARKS`` in a module of real-GPU tests: marked ``cuda``, skipped cleanly elsewhere.
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]
