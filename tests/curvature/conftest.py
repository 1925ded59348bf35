"""Fixtures shared by the curvature tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: 5 float64 images 2x7x7 and labels in 0..3."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 2, 7, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=g)
    return x, y
