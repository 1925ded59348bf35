"""The in-memory dataset record and the helpers every loader shares.

A dataset is small enough (CIFAR-10: 60,000 x 3 x 32 x 32 bytes = 184 MB) to
live as whole uint8 tensors, decoded once; see :mod:`kfcrun.data.cache`.
Every problem the user can fix is raised as :class:`kfcrun.errors.DatasetError`
with a one-line message built by :func:`dataset_error`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kfcrun.errors import DatasetError

#: The two fixes every "data not found" message offers, in the Hydra config's key names.
FIXES = "put the files there and set dataset.root=<dir>, or set dataset.download=true to fetch them"


@dataclass(frozen=True, eq=False)
class ImageData:
    """A whole image-classification dataset as tensors, decoded once.

    ``eq=False`` because elementwise tensor comparison has no single truth value;
    compare the fields with ``torch.equal`` instead.

    Attributes:
        train_images: uint8, shape (N_train, C, H, W), raw pixel values 0..255.
        train_labels: int64, shape (N_train,), values in 0..len(classes)-1.
        test_images: uint8, shape (N_test, C, H, W).
        test_labels: int64, shape (N_test,).
        classes: class names; ``classes[k]`` is the name of label ``k``.
        name: ``"cifar10"``, ``"svhn"`` or ``"synthetic"``.
        source: human-readable provenance, e.g.
            ``"CIFAR-10 (JPEG export) image folder at /data/cifar10"``; put it in run records.
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]
    name: str
    source: str

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0 .. num_classes - 1``)."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_images.shape[1:]
        return int(c), int(h), int(w)

    def validate(self) -> None:
        """Raise ``ValueError`` if the fields break the documented dtypes, shapes or label range.

        A programming-error check, used on freshly built data and on data read back from the cache.
        """
        for split in ("train", "test"):
            images: Tensor = getattr(self, f"{split}_images")
            labels: Tensor = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(
                    f"{split}_images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{split}_labels must be int64 ({images.shape[0]},), got {labels.dtype} "
                    f"{tuple(labels.shape)}"
                )
            if labels.numel() and not (int(labels.min()) >= 0 and int(labels.max()) < len(self.classes)):
                raise ValueError(f"{split}_labels outside 0..{len(self.classes) - 1}")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError("train and test images differ in shape")


def dataset_error(problem: str, root: str | Path, expected: str, *, fixes: str = FIXES) -> DatasetError:
    """Build the one-line :class:`DatasetError`: what is wrong, where we looked, what we expected, the fixes.

    Example: ``SVHN: test_32x32.mat is missing; looked in /data/svhn, expected train_32x32.mat and
    test_32x32.mat; fix: put the files there and set dataset.root=<dir>, or set dataset.download=true
    to fetch them``.
    """
    return DatasetError(f"{problem}; looked in {root}, expected {expected}; fix: {fixes}")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and Python versions).

    Used where a stream must depend on several integers, e.g. (seed, epoch), without the
    collisions of ad-hoc arithmetic such as ``seed * 1000 + epoch``.
    """
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fingerprint_files(paths: Iterable[str | Path], base: str | Path) -> str:
    """Cheap fingerprint of files: a hash of (path relative to ``base``, size, mtime_ns) for each one.

    It changes when a file is added, removed, renamed, resized or rewritten, without reading
    contents; 60,000 files take about 0.15 s (one ``stat`` each).
    """
    prefix = os.path.join(os.fspath(base), "")
    h = hashlib.sha256()
    for path in paths:
        p = os.fspath(path)
        st = os.stat(p)
        rel = p[len(prefix) :] if p.startswith(prefix) else p
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
