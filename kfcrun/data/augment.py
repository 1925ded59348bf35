"""On-device data augmentation: random crop with zero padding and horizontal flip (standard CIFAR).

Applied to the raw uint8 training batch before preprocessing, like torchvision's
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` on the PIL image: every image
is padded with ``padding`` black pixels on each side, a window of the original size is cut
at an independent uniformly random offset, and the result is mirrored left-right with
probability 1/2.

Determinism and resuming: the draws of iteration ``k`` come from a generator seeded with
:func:`~kfcrun.data.base.derive_seed` of ``(seed, k)``, so they are a pure function of the
run's seed and the iteration; a resumed run augments exactly as the uninterrupted one.
The generator lives on the images' device (CUDA and CPU draw different numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kfcrun.data.base import derive_seed

__all__ = ["CropFlip"]


class CropFlip:
    """Random crop (zero padding ``padding``) and horizontal flip of a batch, seeded per iteration.

    Args:
        seed: the run's seed.
        padding: pixels of zero padding on each side before cropping back to the input size.
    """

    def __init__(self, seed: int, padding: int = 4) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.seed, self.padding = int(seed), int(padding)

    def generator(self, iteration: int, device: torch.device) -> torch.Generator:
        """The generator of iteration ``iteration``'s draws."""
        return torch.Generator(device=device).manual_seed(derive_seed("CropFlip", self.seed, int(iteration)))

    def __call__(self, images: Tensor, iteration: int) -> Tensor:
        """``images`` ``(B, C, H, W)`` (any dtype) cropped and flipped with this iteration's draws."""
        b, _, h, w = images.shape
        p = self.padding
        gen = self.generator(iteration, images.device)
        offsets = torch.randint(0, 2 * p + 1, (2, b), generator=gen, device=images.device)
        flips = torch.rand(b, generator=gen, device=images.device) < 0.5
        padded = F.pad(images, (p, p, p, p)) if p else images
        rows = offsets[0][:, None] + torch.arange(h, device=images.device)  # (B, H)
        cols = offsets[1][:, None] + torch.arange(w, device=images.device)  # (B, W)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        batch = torch.arange(b, device=images.device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
