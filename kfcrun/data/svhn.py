"""SVHN, cropped digits (Netzer et al. 2011): 32x32 RGB house-number digits, 10 classes.

Official files, as torchvision downloads them into ``root`` (MATLAB v5 ``.mat``):
``train_32x32.mat`` (73,257 images), ``test_32x32.mat`` (26,032) and optionally
``extra_32x32.mat`` (531,131 easier images). In each, ``X`` is uint8 of shape
(32, 32, 3, N), i.e. (row, column, channel, image), and ``y`` is (N, 1) with labels
1..10 where 10 stands for the digit 0; we map it to 0 so that label == digit.

``use_extra=True`` appends the extra images to the training set, as Srivastava (2013) and
Srivastava et al. (JMLR 2014, appendix B.2) did for their SVHN results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from kfcrun.data import cache
from kfcrun.data.base import ImageData, dataset_error, fingerprint_files
from kfcrun.data.download import run_download
from kfcrun.errors import ConfigError

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
#: Label k is digit k after mapping the file's 10 to 0.
SVHN_CLASSES = tuple(str(d) for d in range(10))
FORMATS = ("auto", "official")


def _expected(use_extra: bool) -> str:
    names = [FILES["train"], FILES["test"]] + ([FILES["extra"]] if use_extra else [])
    return ", ".join(names) + " (official SVHN cropped digits, MATLAB .mat)"


def load_svhn(
    root: Path,
    *,
    format: str = "auto",
    download: bool = False,
    use_extra: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ImageData:
    """Load SVHN from the official ``.mat`` files in ``root`` through the decode-once cache."""
    if format not in FORMATS:
        raise ConfigError(f"dataset.format={format!r} is not an SVHN format; use one of {', '.join(FORMATS)}")
    splits = ["train", "test"] + (["extra"] if use_extra else [])
    missing = [s for s in splits if not (root / FILES[s]).is_file()]
    if missing and download:
        for split in missing:
            fetch_official(root, split)
        missing = [s for s in splits if not (root / FILES[s]).is_file()]
    if missing:
        problem = (
            "the dataset root does not exist"
            if not root.is_dir()
            else f"missing {', '.join(FILES[s] for s in missing)}"
        )
        raise dataset_error(f"SVHN: {problem}", root, _expected(use_extra))

    files = [root / FILES[s] for s in splits]
    key = {
        "dataset": "svhn",
        "format": "official",
        "source_path": str(root.resolve()),
        "use_extra": use_extra,
        "fingerprint": fingerprint_files(files, root),
    }
    return cache.cached(key, lambda: read_official(root, use_extra=use_extra, progress=progress), cache_dir)


def fetch_official(root: Path, split: str) -> None:
    """Download one official split file into ``root`` with torchvision's URL and MD5."""
    from torchvision.datasets import SVHN
    from torchvision.datasets.utils import download_url

    url, filename, md5 = SVHN.split_list[split]
    run_download(
        lambda: download_url(url, str(root), filename=filename, md5=md5),
        what=f"SVHN {split}",
        url=url,
        root=root,
        expected=filename,
        partial=root / filename,
    )


def read_official(root: Path, *, use_extra: bool = False, progress: bool = True) -> ImageData:
    """Read the official ``.mat`` files in ``root``; ``use_extra`` appends ``extra`` to the training set."""
    splits = ["train", "test"] + (["extra"] if use_extra else [])
    arrays: dict[str, tuple[Tensor, Tensor]] = {}
    for split in tqdm(splits, desc="reading SVHN", unit="file", disable=not progress):
        arrays[split] = read_mat(root / FILES[split], root, use_extra)
    train_images, train_labels = arrays["train"]
    if use_extra:
        train_images = torch.cat([train_images, arrays["extra"][0]])
        train_labels = torch.cat([train_labels, arrays["extra"][1]])
    parts = "train+extra" if use_extra else "train"
    return ImageData(
        train_images=train_images,
        train_labels=train_labels,
        test_images=arrays["test"][0],
        test_labels=arrays["test"][1],
        classes=SVHN_CLASSES,
        name="svhn",
        source=f"SVHN (official .mat files, {parts} / test) at {Path(root).resolve()}",
    )


def read_mat(path: Path, root: Path, use_extra: bool = False) -> tuple[Tensor, Tensor]:
    """One official file as (uint8 (N, 3, 32, 32), int64 (N,) with labels 0..9)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    except Exception as err:  # scipy raises ValueError, MatReadError, OSError, ... on damaged files
        raise _corrupted(path, root, use_extra, f"{type(err).__name__}: {err}") from err
    n = x.shape[-1] if x.ndim == 4 else -1
    if x.dtype != np.uint8 or x.shape[:3] != (32, 32, 3) or y.size != n:
        raise _corrupted(
            path,
            root,
            use_extra,
            f"X is {x.dtype} {x.shape} and y has {y.size} entries, expected "
            "uint8 (32, 32, 3, N) and N labels",
        )
    labels = y.reshape(-1).astype(np.int64)
    if n and not (labels.min() >= 1 and labels.max() <= 10):
        raise _corrupted(path, root, use_extra, f"labels span {labels.min()}..{labels.max()}, expected 1..10")
    labels[labels == 10] = 0  # the file writes digit 0 as class 10
    # (row, col, channel, image) -> (image, channel, row, col); copy to get a contiguous tensor.
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return torch.from_numpy(images), torch.from_numpy(labels)


def _corrupted(path: Path, root: Path, use_extra: bool, why: str) -> Exception:
    return dataset_error(
        f"SVHN: {path} is corrupted ({why})",
        root,
        _expected(use_extra),
        fixes="delete it and set dataset.download=true to fetch it again, "
        "or set dataset.root=<dir> to an intact copy",
    )
