"""``load_dataset``: one entry point from the config's ``dataset`` group to an :class:`ImageData`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kfcrun.data.base import ImageData
from kfcrun.data.cache import resolve_cache_dir
from kfcrun.data.cifar10 import load_cifar10
from kfcrun.data.svhn import load_svhn
from kfcrun.data.synthetic import make_synthetic
from kfcrun.errors import ConfigError

DATASETS = ("cifar10", "svhn", "synthetic")


def default_root(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where a dataset lives when ``root`` is not given: ``<cache dir>/datasets/<name>``.

    Gives ``dataset.download=true`` a writable place to put the files without further settings.
    """
    return resolve_cache_dir(cache_dir) / "datasets" / name


def load_dataset(
    name: str,
    root: str | Path | None,
    *,
    download: bool = False,
    cache_dir: str | Path | None = None,
    format: str = "auto",
    use_extra: bool = False,
    synthetic: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> ImageData:
    """Load a whole dataset as uint8 tensors, decoding it at most once per source (then cached).

    Args:
        name: ``"cifar10"``, ``"svhn"`` or ``"synthetic"``.
        root: folder holding the files (see :mod:`kfcrun.data.cifar10`, :mod:`kfcrun.data.svhn`);
            ``None`` means :func:`default_root`. Only read, never written, unless ``download``.
            Ignored for ``synthetic``.
        download: fetch the official files into ``root`` when they are missing (needs internet).
        cache_dir: where decoded tensors are cached; ``None`` means ``$KFCRUN_CACHE_DIR`` or
            ``~/.cache/kfcrun`` (see :mod:`kfcrun.data.cache`).
        format: CIFAR-10: ``"auto"``, ``"official"`` or ``"image_folder"``;
            SVHN: ``"auto"`` or ``"official"``.
        use_extra: SVHN only: append ``extra_32x32.mat`` to the training set.
        synthetic: overrides of :data:`kfcrun.data.synthetic.DEFAULTS`, for ``name="synthetic"``.
        progress: show progress bars while decoding.

    Raises:
        DatasetError: files missing, corrupted or not downloadable (one line: where it looked,
            what it expected, how to fix it).
        ConfigError: unknown dataset, format or synthetic option.
    """
    if name not in DATASETS:
        raise ConfigError(f"dataset.name={name!r} is unknown; use one of {', '.join(DATASETS)}")
    if use_extra and name != "svhn":
        raise ConfigError(f"dataset.use_extra=true applies only to svhn, not {name}; set it to false")
    if name == "synthetic":
        return make_synthetic(synthetic)
    path = Path(root).expanduser() if root is not None else default_root(name, cache_dir)
    if name == "cifar10":
        return load_cifar10(path, format=format, download=download, cache_dir=cache_dir, progress=progress)
    return load_svhn(
        path, format=format, download=download, use_extra=use_extra, cache_dir=cache_dir, progress=progress
    )
