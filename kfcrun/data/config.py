"""The ``dataset`` config section as a typed structured config.

:class:`DatasetConfig` is the one place the dataset knobs are declared (each field with
its rule, :mod:`kfcrun.schema`); ``configs/dataset/*.yaml`` give the values. It loads the
data (:func:`~kfcrun.data.load.load_dataset`) and fits the preprocessing
(:class:`~kfcrun.data.preprocess.Preprocessor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from torch import Tensor

from kfcrun.data.augment import CropFlip
from kfcrun.data.base import ImageData
from kfcrun.data.load import load_dataset
from kfcrun.data.preprocess import Preprocessor
from kfcrun.schema import boolean, choice, integer, number, text

__all__ = ["DatasetConfig"]


@dataclass(frozen=True)
class DatasetConfig:
    """Which data, where it is, and how it is preprocessed.

    Attributes:
        name: ``cifar10``, ``svhn`` or ``synthetic`` (generated, for smoke runs and tests).
        root: the folder with the files (see :mod:`kfcrun.data.cifar10`, :mod:`kfcrun.data.svhn`).
        download: fetch the official files into ``root`` when missing (needs internet).
        format: CIFAR-10 ``auto | official | image_folder``; SVHN ``auto | official``.
        cache_dir: where decoded uint8 tensors are cached (``None``: ``$KFCRUN_CACHE_DIR`` or
            ``~/.cache/kfcrun``).
        num_classes, image_size, channels: the data's shape, which the network is built for.
        pixel_scale, mean, std: network input = ``(pixels * pixel_scale - mean) / std``
            (:class:`~kfcrun.data.preprocess.Preprocessor`).
        use_extra: SVHN only, append the ``extra`` split to the training set.
        augment: random crop (zero padding 4) and horizontal flip of every training batch,
            on the device, seeded per iteration (:class:`~kfcrun.data.augment.CropFlip`).
            Off for the paper's experiments (the paper trains without augmentation).
        num_train, num_test: synthetic data only, the number of examples.
    """

    name: Annotated[str, choice("cifar10", "svhn", "synthetic")]
    root: Annotated[str | None, text("../shared/data/cifar10", optional=True)] = None
    download: Annotated[bool, boolean()] = False
    format: Annotated[str, choice("auto", "official", "image_folder")] = "auto"
    cache_dir: Annotated[str | None, text("~/.cache/kfcrun", optional=True)] = None
    num_classes: Annotated[int, integer(2, "10")] = 10
    image_size: Annotated[int, integer(8, "32")] = 32
    channels: Annotated[int, integer(1, "3")] = 3
    pixel_scale: Annotated[float, number("1.0", gt=0)] = 1.0
    mean: Annotated[str, choice("image", "channel", "none")] = "image"
    std: Annotated[str, choice("none", "channel")] = "none"
    use_extra: Annotated[bool, boolean()] = False
    augment: Annotated[bool, boolean()] = False
    num_train: Annotated[int, integer(1, "2048")] = 2048
    num_test: Annotated[int, integer(1, "512")] = 512

    #: Fields only the synthetic dataset has; other datasets' YAML files leave them out.
    SYNTHETIC_ONLY = ("num_train", "num_test")

    def load(self, *, seed: int, progress: bool) -> ImageData:
        """The whole dataset as uint8 tensors (decoded once, then cached)."""
        synthetic = None
        if self.name == "synthetic":
            synthetic = {
                "num_train": self.num_train,
                "num_test": self.num_test,
                "num_classes": self.num_classes,
                "channels": self.channels,
                "image_size": self.image_size,
                "seed": seed,
            }
        return load_dataset(
            self.name,
            self.root,
            download=self.download,
            cache_dir=Path(self.cache_dir).expanduser() if self.cache_dir else None,
            format=self.format,
            use_extra=self.use_extra,
            synthetic=synthetic,
            progress=progress,
        )

    def augmentation(self, seed: int) -> CropFlip | None:
        """The training-batch augmentation, or ``None`` when ``augment`` is off."""
        return CropFlip(seed) if self.augment else None

    def preprocessor(self, train_images: Tensor) -> Preprocessor:
        """The preprocessing fitted on the training images (uint8 ``(N, C, H, W)``)."""
        return Preprocessor.fit(train_images, mean=self.mean, std=self.std, pixel_scale=self.pixel_scale)
