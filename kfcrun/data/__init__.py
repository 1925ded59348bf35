"""Datasets as whole uint8 tensors, decoded once and cached; preprocessing; device-resident batches.

* :class:`DatasetConfig`: the ``dataset`` config section (loads the data, fits the preprocessing).
* :func:`load_dataset` -> :class:`ImageData` (CIFAR-10 official or image folder, SVHN, synthetic).
* :class:`Preprocessor`: uint8 batch -> float network input (cuda-convnet's mean-image subtraction
  for CIFAR-10; see :mod:`kfcrun.data.preprocess` for sources).
* :class:`DeviceBatches`: an infinite, resumable batch iterator whose order is a pure function of
  (seed, epoch).
"""

from kfcrun.data.base import ImageData
from kfcrun.data.batches import DeviceBatches
from kfcrun.data.config import DatasetConfig
from kfcrun.data.load import DATASETS, default_root, load_dataset
from kfcrun.data.preprocess import PAPER_PREPROCESSING, Preprocessor

__all__ = [
    "DATASETS",
    "PAPER_PREPROCESSING",
    "DatasetConfig",
    "DeviceBatches",
    "ImageData",
    "Preprocessor",
    "default_root",
    "load_dataset",
]
