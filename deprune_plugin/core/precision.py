"""Full-precision fp32 for reference computations.

PyTorch lets cuDNN convolutions use TF32 by default (``torch.backends.cudnn.allow_tf32 = True``): on Ampere and
later an fp32 conv then rounds its inputs to a 10-bit mantissa, ~1e-3 relative error. A reference that a
kernel's output is compared with must not carry that error, or an fp32 check either fails a correct kernel or
needs a tolerance wide enough to pass a wrong one. :func:`no_tf32` turns TF32 off for cuDNN and for CUDA
matmuls around such a computation and restores both flags afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["no_tf32"]


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Inside the ``with`` block ``torch.backends.cudnn.allow_tf32`` and ``torch.backends.cuda.matmul.allow_tf32``
    are False (fp32 convolutions and matmuls in full fp32); on leaving it, also by an exception, both hold the
    values they had on entry. Nests; not thread-isolated (the flags are process-wide)."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul
