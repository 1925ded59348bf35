"""Minibatches drawn from a dataset that lives whole on the training device.

As in airbench and nanoGPT: no DataLoader, no worker processes. The images (uint8) and
labels sit on the device once; a batch is one gather with a permutation slice. CIFAR-10
takes 184 MB of device memory this way.

Order: epoch ``e`` visits the examples in the order ``torch.randperm(N, generator=
torch.Generator().manual_seed(epoch_seed(seed, e)))``, computed on the CPU (so it is the
same on every device and machine) and then moved to the images' device. The order is
therefore a pure function of ``(seed, epoch)``, and resuming needs only ``(epoch, position)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfcrun.data.base import derive_seed
from kfcrun.errors import CheckpointError, ConfigError


class DeviceBatches:
    """An infinite iterator of ``(uint8 images (B, C, H, W), int64 labels (B,))`` batches across epochs.

    Args:
        images: uint8 (N, C, H, W), already on the training device.
        labels: int64 (N,), on the same device.
        batch_size: examples per batch, B.
        seed: with the epoch number, determines each epoch's permutation.
        drop_last: drop the last ``N % B`` examples of each epoch's permutation (which ones
            varies by epoch), so every batch has exactly B examples; otherwise the last batch
            of an epoch is smaller.

    Attributes:
        epoch: the epoch the next batch belongs to (0-based); equals the number of completed epochs.
        position: index of the next batch within that epoch, ``0 <= position < batches_per_epoch``.
        batches_per_epoch: ``N // B`` with ``drop_last``, else ``ceil(N / B)``.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, batch_size: int, *, seed: int, drop_last: bool = True
    ) -> None:
        if images.shape[:1] != labels.shape or images.device != labels.device:
            raise ValueError(
                f"images {tuple(images.shape)} on {images.device} and labels {tuple(labels.shape)} "
                f"on {labels.device} must have the same length and device"
            )
        n = images.shape[0]
        if batch_size < 1 or (drop_last and batch_size > n):
            raise ConfigError(f"batch size {batch_size} must be between 1 and the number of examples {n}")
        self.images = images
        self.labels = labels
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.batches_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self.epoch = 0
        self.position = 0
        self._order: Tensor | None = None  # the current epoch's permutation, on the images' device
        self._order_epoch = -1

    @staticmethod
    def epoch_seed(seed: int, epoch: int) -> int:
        """Seed of epoch ``epoch``'s permutation: a hash of (seed, epoch), so no two pairs share a stream."""
        return derive_seed("DeviceBatches", int(seed), int(epoch))

    def permutation(self, epoch: int) -> Tensor:
        """The visiting order of epoch ``epoch`` as a CPU int64 tensor of length N."""
        g = torch.Generator().manual_seed(self.epoch_seed(self.seed, epoch))
        return torch.randperm(self.images.shape[0], generator=g)

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self._order_epoch != self.epoch:
            self._order = self.permutation(self.epoch).to(self.images.device)
            self._order_epoch = self.epoch
        assert self._order is not None
        start = self.position * self.batch_size
        index = self._order[start : start + self.batch_size]
        batch = self.images[index], self.labels[index]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": int, "position": int}``, all that resuming needs; the order follows from the seed."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; the next batch is the one that followed when it was taken."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise CheckpointError(
                f"batch position (epoch={epoch}, position={position}) does not fit "
                f"{self.batches_per_epoch} batches per epoch; resume with the batch size "
                "and dataset the checkpoint was trained with"
            )
        self.epoch, self.position = epoch, position
