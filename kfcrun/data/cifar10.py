"""CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test 32x32 RGB images, 10 classes.

Two on-disk layouts are read (``format``):

* ``"official"``: the "CIFAR-10 python version" that torchvision downloads,
  ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``. Each batch is a
  pickled dict with ``b"data"``, a (10000, 3072) uint8 array whose rows are the R, G and B
  planes of one image, each 32x32 row-major, and ``b"labels"``, a list of ints 0..9.
  ``root`` may be the folder that contains ``cifar-10-batches-py`` or that folder itself.
* ``"image_folder"``: ``root/{train,test}/<class>/<image>.jpg|png`` with the class folders
  named as in the official release; sorted alphabetically they are in the official label
  order 0..9 (airplane .. truck). A JPEG export re-encodes the pixels (lossy), so results on
  it are close to, not identical with, results on the official files; its ``source`` says
  "(JPEG export)" so run records show it.

``"auto"`` prefers the official files when both are present, because their pixels are exact.
``download=True`` fetches the official files with torchvision's downloader into ``root``.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kfcrun.data import cache, image_folder
from kfcrun.data.base import ImageData, dataset_error, fingerprint_files
from kfcrun.data.download import run_download
from kfcrun.errors import ConfigError, DatasetError

#: Official label order (batches.meta ``label_names``); also the alphabetical order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
OFFICIAL_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
OFFICIAL_FILES = (*TRAIN_BATCHES, "test_batch", "batches.meta")
IMAGE_SHAPE = (3, 32, 32)
NUM_TRAIN, NUM_TEST = 50_000, 10_000
FORMATS = ("auto", "official", "image_folder")

_EXPECT_OFFICIAL = f"{OFFICIAL_DIR}/{{data_batch_1..5, test_batch, batches.meta}} (official python version)"
_EXPECT_FOLDER = "train/<class>/*.jpg|png and test/<class>/*.jpg|png with the 10 CIFAR-10 class folders"
_EXPECT = {
    "official": _EXPECT_OFFICIAL,
    "image_folder": _EXPECT_FOLDER,
    "auto": f"{_EXPECT_OFFICIAL} or {_EXPECT_FOLDER}",
}


@dataclass(frozen=True)
class Layout:
    """What :func:`find_layout` found: the format and the folder holding the files."""

    format: str  # "official" | "image_folder"
    path: Path  # the cifar-10-batches-py folder, or the image-folder root


def find_layout(root: Path, format: str = "auto") -> Layout:
    """Locate CIFAR-10 under ``root`` in the requested ``format``; raise ``DatasetError`` if absent."""
    expected = _EXPECT[format]
    if not root.is_dir():
        raise dataset_error("CIFAR-10: the dataset root does not exist", root, expected)
    if format in ("auto", "official"):
        for folder in (root / OFFICIAL_DIR, root):
            present = [f for f in OFFICIAL_FILES if (folder / f).is_file()]
            if len(present) == len(OFFICIAL_FILES):
                return Layout("official", folder)
            if present or (folder.name == OFFICIAL_DIR and folder.is_dir()):
                missing = ", ".join(f for f in OFFICIAL_FILES if f not in present)
                raise dataset_error(
                    f"CIFAR-10: {folder} is incomplete, missing {missing}", root, _EXPECT_OFFICIAL
                )
    if format in ("auto", "image_folder"):
        splits = [s for s in ("train", "test") if (root / s).is_dir()]
        if len(splits) == 2:
            return Layout("image_folder", root)
        if splits:
            raise dataset_error(
                f"CIFAR-10: image folder has {splits[0]}/ but no "
                f"{'test' if splits[0] == 'train' else 'train'}/",
                root,
                _EXPECT_FOLDER,
            )
    raise dataset_error("CIFAR-10: no dataset files found", root, expected)


def load_cifar10(
    root: Path,
    *,
    format: str = "auto",
    download: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ImageData:
    """Load CIFAR-10 from ``root`` (see the module docstring), through the decode-once cache."""
    if format not in FORMATS:
        raise ConfigError(
            f"dataset.format={format!r} is not a CIFAR-10 format; use one of {', '.join(FORMATS)}"
        )
    try:
        layout = find_layout(root, format)
    except DatasetError:
        if not download:
            raise
        if format == "image_folder":
            raise dataset_error(
                "CIFAR-10: no image folder found, and dataset.download=true fetches only the official files",
                root,
                _EXPECT_FOLDER,
                fixes="set dataset.format=auto to download the official files, "
                "or set dataset.root=<dir> to an image folder",
            ) from None
        fetch_official(root)
        layout = find_layout(root, "official")

    if layout.format == "official":
        files = [layout.path / f for f in OFFICIAL_FILES]
        key = {
            "dataset": "cifar10",
            "format": "official",
            "source_path": str(layout.path.resolve()),
            "fingerprint": fingerprint_files(files, layout.path),
        }
        return cache.cached(key, lambda: read_official(layout.path, root), cache_dir)

    train = image_folder.list_split(root / "train")
    test = image_folder.list_split(root / "test")
    key = {
        "dataset": "cifar10",
        "format": "image_folder",
        "source_path": str(root.resolve()),
        "fingerprint": fingerprint_files([*train[1], *test[1]], root),
    }
    return cache.cached(key, lambda: read_image_folder(root, train, test, progress=progress), cache_dir)


def fetch_official(root: Path) -> None:
    """Download and extract the official python version into ``root/cifar-10-batches-py``."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    run_download(
        lambda: download_and_extract_archive(
            CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
        ),
        what="CIFAR-10",
        url=CIFAR10.url,
        root=root,
        expected=f"{OFFICIAL_DIR}/ (extracted from {CIFAR10.filename})",
    )


def read_official(folder: Path, root: Path) -> ImageData:
    """Read the official python batches in ``folder``; ``root`` is only quoted in error messages."""
    parts = [_read_batch(folder / name, root) for name in TRAIN_BATCHES]
    test_images, test_labels = _read_batch(folder / "test_batch", root)
    meta = _unpickle(folder / "batches.meta", root)
    try:
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"])
    except (KeyError, TypeError) as err:
        raise _corrupted(folder / "batches.meta", root, "no label_names") from err
    if len(classes) != len(CIFAR10_CLASSES):
        raise _corrupted(folder / "batches.meta", root, f"{len(classes)} label_names, expected 10")
    return ImageData(
        train_images=torch.cat([p[0] for p in parts]),
        train_labels=torch.cat([p[1] for p in parts]),
        test_images=test_images,
        test_labels=test_labels,
        classes=classes,
        name="cifar10",
        source=f"CIFAR-10 (official python batches) at {Path(folder).resolve()}",
    )


def read_image_folder(
    root: Path,
    train: tuple[list[str], list[str], list[int]],
    test: tuple[list[str], list[str], list[int]],
    *,
    progress: bool = True,
) -> ImageData:
    """Decode an image-folder CIFAR-10 whose splits were listed by :func:`image_folder.list_split`."""
    tensors: dict[str, Tensor] = {}
    for split, (classes, files, labels) in (("train", train), ("test", test)):
        if tuple(classes) != CIFAR10_CLASSES:
            raise dataset_error(
                f"CIFAR-10: the class folders in {root / split} are {', '.join(classes) or 'none'}",
                root,
                f"the folders {', '.join(CIFAR10_CLASSES)}",
            )
        if not files:
            raise dataset_error(f"CIFAR-10: no .jpg/.png images in {root / split}", root, _EXPECT_FOLDER)
        # A class with no examples would train a 10-way classifier on 9 classes without a word.
        present = set(labels)
        empty = [name for label, name in enumerate(classes) if label not in present]
        if empty:
            raise dataset_error(
                f"CIFAR-10: the class folder {root / split / empty[0]} holds no .jpg/.png images"
                + (f" (nor do {', '.join(empty[1:])})" if len(empty) > 1 else ""),
                root,
                _EXPECT_FOLDER,
                fixes="restore the class's images, or set dataset.root=<dir> to a complete copy",
            )
        try:
            tensors[f"{split}_images"] = image_folder.decode_images(
                files, IMAGE_SHAPE, progress=progress, desc=f"decoding CIFAR-10 {split}", bad_file="image"
            )
        except DatasetError as err:
            raise dataset_error(
                f"CIFAR-10: {err}",
                root,
                f"32x32 RGB images ({_EXPECT_FOLDER})",
                fixes="replace the file, or set dataset.root=<dir> to an intact copy, "
                "or set dataset.download=true with an empty root",
            ) from err
        tensors[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
    counts = (len(train[1]), len(test[1]))
    if counts != (NUM_TRAIN, NUM_TEST):
        warnings.warn(
            f"CIFAR-10 image folder {root} holds {counts[0]} train / {counts[1]} test images, "
            f"not the official {NUM_TRAIN} / {NUM_TEST}",
            RuntimeWarning,
            stacklevel=2,
        )
    suffixes = {os.path.splitext(p)[1].lower() for p in [*train[1], *test[1]]}
    kind = "(JPEG export) image folder" if suffixes <= {".jpg", ".jpeg"} else "image folder"
    return ImageData(
        **tensors,
        classes=CIFAR10_CLASSES,
        name="cifar10",
        source=f"CIFAR-10 {kind} at {Path(root).resolve()}",
    )


def _unpickle(path: Path, root: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the files were pickled by Python 2; keys come back as bytes.
            blob = pickle.load(f, encoding="bytes")
    except Exception as err:  # truncated or foreign files raise many types (EOFError, UnpicklingError, ...)
        raise _corrupted(path, root, f"{type(err).__name__}: {err}") from err
    if not isinstance(blob, dict):
        raise _corrupted(path, root, f"holds a {type(blob).__name__}, not a dict")
    return blob


def _read_batch(path: Path, root: Path) -> tuple[Tensor, Tensor]:
    """One official batch as (uint8 (N, 3, 32, 32), int64 (N,))."""
    blob = _unpickle(path, root)
    try:
        data = np.asarray(blob[b"data"])
        labels = np.asarray(blob[b"labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise _corrupted(path, root, f"no usable data/labels ({err})") from err
    n = data.shape[0] if data.ndim == 2 else -1
    if data.dtype != np.uint8 or data.shape != (n, 3 * 32 * 32) or labels.shape != (n,):
        raise _corrupted(
            path,
            root,
            f"data {data.dtype} {data.shape} and {labels.shape[0]} labels, expected "
            "uint8 (N, 3072) and N labels",
        )
    if n and not (labels.min() >= 0 and labels.max() < len(CIFAR10_CLASSES)):
        raise _corrupted(path, root, "labels outside 0..9")
    # Rows are R, G, B planes of 32x32 row-major pixels, i.e. already (C, H, W) order.
    return torch.from_numpy(data.reshape(n, *IMAGE_SHAPE).copy()), torch.from_numpy(labels)


def _corrupted(path: Path, root: Path, why: str) -> DatasetError:
    return dataset_error(
        f"CIFAR-10: {path} is corrupted ({why})",
        root,
        _EXPECT_OFFICIAL,
        fixes="delete it and set dataset.download=true to fetch it again, "
        "or set dataset.root=<dir> to an intact copy",
    )
