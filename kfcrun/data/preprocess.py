"""Map uint8 image batches to the float network input, on the batch's device.

    out = (x.float() * pixel_scale - mean) / std

``pixel_scale`` multiplies the raw 0..255 values; ``mean`` and ``std`` are in the scaled units
and are fitted on the training images only (never on test data).

Choices and their sources:

* CIFAR-10 in Grosse & Martens (2016) uses cuda-convnet's pipeline: subtract the training
  set's per-pixel mean image (``data_mean`` in cuda-convnet's ``batches.meta``, applied in
  ``convdata.py``) and keep pixels on the 0..255 scale, no division by a standard deviation
  and no augmentation: ``mean="image", std="none", pixel_scale=1.0``.
* SVHN (Srivastava 2013; Srivastava et al., JMLR 2014, appendix B.2): the exact
  preprocessing could NOT be confirmed from the primary sources. A secondary source says the
  images were "normalized to have mean 0, variance 1 along each RGB channel", which is
  ``mean="channel", std="channel"``; treat it as unconfirmed.

See :data:`PAPER_PREPROCESSING`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfcrun.errors import ConfigError, DatasetError

MEANS = ("image", "channel", "none")
STDS = ("none", "channel")

#: Keyword arguments of :meth:`Preprocessor.fit` per dataset, with the source of each choice.
PAPER_PREPROCESSING: dict[str, dict[str, Any]] = {
    # cuda-convnet: mean image subtracted (batches.meta data_mean, convdata.py), 0..255 scale.
    "cifar10": {"mean": "image", "std": "none", "pixel_scale": 1.0},
    # UNCONFIRMED (secondary source on Srivastava 2013 / JMLR 2014 B.2): per-channel mean 0, variance 1.
    "svhn": {"mean": "channel", "std": "channel", "pixel_scale": 1.0},
    # Synthetic data has no paper; use the CIFAR-10 pipeline it imitates.
    "synthetic": {"mean": "image", "std": "none", "pixel_scale": 1.0},
}

_FIT_CHUNK = 4096  # images reduced at once in fit(); bounds the float64 temporary (100 MB for CIFAR)


class Preprocessor:
    """``x_uint8 -> (x.float() * pixel_scale - mean) / std`` as float32.

    Args:
        mean: float32 tensor broadcastable to one image (C, H, W): the per-pixel mean image
            (C, H, W) or the per-channel mean (C, 1, 1), in scaled units; ``None`` subtracts nothing.
        std: float32 tensor (C, 1, 1), in scaled units; ``None`` divides by nothing.
        pixel_scale: factor applied to the raw 0..255 values; 1.0 keeps cuda-convnet's scale.
    """

    def __init__(self, mean: Tensor | None, std: Tensor | None, pixel_scale: float) -> None:
        self.mean = None if mean is None else mean.detach().to(torch.float32)
        self.std = None if std is None else std.detach().to(torch.float32)
        self.pixel_scale = float(pixel_scale)
        if self.std is not None and not bool((self.std > 0).all()):
            raise ValueError("std must be positive")

    @classmethod
    def fit(
        cls, train_images_uint8: Tensor, *, mean: str = "image", std: str = "none", pixel_scale: float = 1.0
    ) -> Preprocessor:
        """Fit the statistics on the training images (uint8 (N, C, H, W)).

        Args:
            train_images_uint8: the training images, uint8 of shape (N, C, H, W).
            mean: ``"image"``: per-pixel mean image over the training set, shape (C, H, W)
                (cuda-convnet's ``data_mean``); ``"channel"``: one mean per channel, shape
                (C, 1, 1); ``"none"``: no centring.
            std: ``"none"``, or ``"channel"``: divide by each channel's standard deviation over
                all training pixels (population, ddof=0), after scaling. With ``mean="channel"``
                the training output has mean 0 and variance 1 per channel.
            pixel_scale: multiplies the raw 0..255 values before centring, e.g. 1/255.

        The sums are accumulated in float64 in chunks, so the result is exact to float32
        precision and the memory stays bounded for large sets.
        """
        if mean not in MEANS:
            raise ConfigError(f"preprocessing mean={mean!r} is unknown; use one of {', '.join(MEANS)}")
        if std not in STDS:
            raise ConfigError(f"preprocessing std={std!r} is unknown; use one of {', '.join(STDS)}")
        x = train_images_uint8
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(
                f"fit expects non-empty uint8 (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}"
            )
        n = x.shape[0]
        pixel_sum = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
        square_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for start in range(0, n, _FIT_CHUNK):
            chunk = x[start : start + _FIT_CHUNK].to(torch.float64)
            pixel_sum += chunk.sum(dim=0)
            if std == "channel":
                square_sum += chunk.square().sum(dim=(0, 2, 3))
        mean_image = pixel_sum / n  # raw units
        mean_t: Tensor | None = {
            "image": mean_image,
            "channel": mean_image.mean(dim=(1, 2), keepdim=True),
            "none": None,
        }[mean]
        std_t: Tensor | None = None
        if std == "channel":
            pixels = n * x.shape[2] * x.shape[3]
            channel_mean = mean_image.mean(dim=(1, 2))
            variance = (square_sum / pixels - channel_mean.square()).clamp_min(0)
            if not bool((variance > 0).all()):
                raise DatasetError(
                    "preprocessing std='channel': a channel of the training images is constant "
                    "(zero variance); use std=none"
                )
            std_t = (variance.sqrt() * pixel_scale).view(-1, 1, 1)
        if mean_t is not None:
            mean_t = mean_t * pixel_scale
        return cls(
            None if mean_t is None else mean_t.float().cpu(),
            None if std_t is None else std_t.float().cpu(),
            pixel_scale,
        )

    def __call__(self, x_uint8: Tensor) -> Tensor:
        """Float32 network input for a uint8 batch (N, C, H, W), on the batch's device."""
        if x_uint8.dtype != torch.uint8:
            raise TypeError(f"Preprocessor expects uint8 images, got {x_uint8.dtype}")
        stats = self.mean if self.mean is not None else self.std
        if stats is not None and stats.device != x_uint8.device:
            self.to(x_uint8.device)  # moved once, then reused for every batch on that device
        x = x_uint8.float()
        if self.pixel_scale != 1.0:
            x = x * self.pixel_scale
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return x

    def to(self, device: torch.device | str) -> Preprocessor:
        """Move the statistics to ``device`` in place; returns ``self``."""
        if self.mean is not None:
            self.mean = self.mean.to(device)
        if self.std is not None:
            self.std = self.std.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """``{"mean": Tensor | None, "std": Tensor | None, "pixel_scale": float}`` with CPU tensors."""
        return {
            "mean": None if self.mean is None else self.mean.cpu(),
            "std": None if self.std is None else self.std.cpu(),
            "pixel_scale": self.pixel_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the tensors stay on the current device of ``self.mean``."""
        device = self.mean.device if self.mean is not None else None
        restored = Preprocessor(state["mean"], state["std"], state["pixel_scale"])
        self.mean, self.std, self.pixel_scale = restored.mean, restored.std, restored.pixel_scale
        if device is not None:
            self.to(device)

    def __repr__(self) -> str:
        mean = "none" if self.mean is None else f"tensor{tuple(self.mean.shape)}"
        std = "none" if self.std is None else f"tensor{tuple(self.std.shape)}"
        return f"Preprocessor(mean={mean}, std={std}, pixel_scale={self.pixel_scale})"
