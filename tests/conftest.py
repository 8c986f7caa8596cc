"""Shared fixtures. Tests run on CPU; seeds are fixed so numbers are reproducible."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
