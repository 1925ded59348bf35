"""A deterministic, learnable stand-in for CIFAR-10, generated in memory (no files, no cache).

For smoke tests, CI and debugging without real data. Each class ``k`` has a fixed random
low-frequency template ``T_k`` (a 4x4 Gaussian grid per channel, bilinearly upsampled to
the image size and normalised to zero mean and unit standard deviation). An image of class
``k`` is, in pixel units 0..255,

    x = 128 + a * AMPLITUDE * T_k + DISTRACTOR * D + NOISE * e,     rounded and clamped to uint8,

with per-image contrast ``a ~ U(0.5, 1.5)``, a per-image low-frequency random field ``D``
(same construction as a template, drawn afresh for every image) and white noise
``e ~ N(0, 1)`` per pixel. The distractor and the noise make it a real learning problem:
measured with a 2-conv-layer net, SGD (lr 0.02, momentum 0.9, batch 64) on 2,000 training
images takes the test error from 90 % (chance) to about 65 % after 50 iterations and about
20 % after 300, instead of solving it in a few steps (tests/data/test_synthetic.py).

Everything is a pure function of the parameters: templates, training set and test set each
use their own generator seeded from ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kfcrun.data.base import ImageData, derive_seed
from kfcrun.errors import ConfigError

#: Defaults: CIFAR-10's image shape and class count, a tenth of its size (fast to generate).
DEFAULTS: dict[str, int] = {
    "num_train": 5000,
    "num_test": 1000,
    "num_classes": 10,
    "channels": 3,
    "image_size": 32,
    "seed": 0,
}
TEMPLATE_GRID = 4  # template resolution before upsampling: lower means smoother, easier classes
AMPLITUDE = 24.0  # pixel units: standard deviation of the class template at contrast a = 1
DISTRACTOR = 40.0  # pixel units: standard deviation of the per-image low-frequency field
NOISE = 64.0  # pixel units: standard deviation of the per-pixel white noise
_CHUNK = 4096  # images generated at once; bounds float32 memory (CIFAR size: 48 MB per chunk)


def make_synthetic(params: Mapping[str, Any] | None = None) -> ImageData:
    """Generate the dataset; ``params`` overrides :data:`DEFAULTS` (unknown keys raise ``ConfigError``)."""
    p = resolve_params(params)
    k, c, s = p["num_classes"], p["channels"], p["image_size"]
    g = torch.Generator().manual_seed(derive_seed(p["seed"], "templates"))
    templates = _smooth_fields(k, c, s, g)
    train_images, train_labels = _split(templates, p["num_train"], derive_seed(p["seed"], "train"))
    test_images, test_labels = _split(templates, p["num_test"], derive_seed(p["seed"], "test"))
    return ImageData(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        classes=tuple(f"class{i}" for i in range(k)),
        name="synthetic",
        source=(
            f"synthetic (seed={p['seed']}, {p['num_train']} train / {p['num_test']} test, "
            f"{k} classes, {c}x{s}x{s})"
        ),
    )


def resolve_params(params: Mapping[str, Any] | None) -> dict[str, int]:
    """Merge ``params`` into :data:`DEFAULTS` and check them."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown dataset.synthetic keys {', '.join(unknown)}; known: {', '.join(DEFAULTS)}"
        )
    p = {**DEFAULTS, **params}
    for name, value in p.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"dataset.synthetic.{name} must be an integer, got {value!r}")
        low = {"num_classes": 2, "seed": 0}.get(name, 1)
        if value < low:
            raise ConfigError(f"dataset.synthetic.{name} must be >= {low}, got {value}")
    return p


def _smooth_fields(n: int, channels: int, size: int, g: torch.Generator) -> Tensor:
    """``n`` random low-frequency images (n, C, size, size), each with zero mean and unit std."""
    grid = torch.randn(n, channels, TEMPLATE_GRID, TEMPLATE_GRID, generator=g)
    fields = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    fields = fields - fields.mean(dim=(1, 2, 3), keepdim=True)
    return fields / fields.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def _split(templates: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = templates.shape[0]
    # Exactly balanced (counts differ by at most one), in random order.
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    images = torch.empty((n, *templates.shape[1:]), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        y = labels[start : start + _CHUNK]
        m = y.numel()
        contrast = torch.rand(m, 1, 1, 1, generator=g) + 0.5
        distractor = DISTRACTOR * _smooth_fields(m, templates.shape[1], templates.shape[2], g)
        noise = NOISE * torch.randn(m, *templates.shape[1:], generator=g)
        x = 128.0 + contrast * AMPLITUDE * templates[y] + distractor + noise
        images[start : start + m] = x.round_().clamp_(0, 255).to(torch.uint8)
    return images, labels
