"""One-line, actionable errors for missing data and bad options."""

from __future__ import annotations

from pathlib import Path

import pytest

from kfcrun.data import default_root, load_dataset
from kfcrun.errors import ConfigError, DatasetError


def assert_actionable(message: str, root: Path, *expected: str) -> None:
    assert "\n" not in message
    assert f"looked in {root}" in message
    for text in expected:
        assert text in message, f"{text!r} missing from: {message}"
    assert "dataset.root=<dir>" in message and "dataset.download=true" in message


def test_missing_cifar10_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", root)
    assert_actionable(
        str(err.value),
        root,
        "the dataset root does not exist",
        "cifar-10-batches-py/",
        "data_batch_1..5",
        "train/<class>/*.jpg|png",
    )


def test_empty_cifar10_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="CIFAR-10: no dataset files found") as err:
        load_dataset("cifar10", tmp_path, format="official")
    assert_actionable(str(err.value), tmp_path, "official python version")
    assert "train/<class>" not in str(err.value)  # only the layout that was asked for


def test_missing_svhn_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        load_dataset("svhn", root)
    assert_actionable(
        str(err.value), root, "SVHN: the dataset root does not exist", "train_32x32.mat", "test_32x32.mat"
    )


def test_default_root_is_under_the_cache(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset("svhn", None, cache_dir=tmp_path)
    assert f"looked in {tmp_path / 'datasets' / 'svhn'}" in str(err.value)
    assert default_root("cifar10", tmp_path) == tmp_path / "datasets" / "cifar10"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mnist"}, "dataset.name='mnist' is unknown"),
        ({"name": "cifar10", "format": "lmdb"}, "dataset.format='lmdb'"),
        ({"name": "svhn", "format": "image_folder"}, "not an SVHN format"),
        ({"name": "cifar10", "use_extra": True}, "use_extra=true applies only to svhn"),
    ],
)
def test_bad_options_are_config_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_dataset(root=tmp_path, **kwargs)
