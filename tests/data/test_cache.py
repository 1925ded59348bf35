"""The decode-once cache: location, corrupted entries, unwritable directories, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kfcrun.data import cache, load_dataset
from kfcrun.data import svhn as svhn_module

from .fakes import write_svhn_mat


@pytest.fixture
def svhn_root(tmp_path: Path) -> Path:
    root = tmp_path / "svhn"
    write_svhn_mat(root, "train", 12, seed=1)
    write_svhn_mat(root, "test", 8, seed=2)
    return root


def entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "data").iterdir())


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    assert cache.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert cache.resolve_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.resolve_cache_dir(None) == tmp_path / "home" / ".cache" / "kfcrun"


def test_env_cache_dir_is_used(svhn_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    load_dataset("svhn", svhn_root, progress=False)
    assert [p.suffix for p in entries(tmp_path / "env")] == [".pt"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_contents"])
def test_corrupted_entry_is_rebuilt_with_a_warning(svhn_root: Path, tmp_path: Path, damage: str) -> None:
    cache_dir = tmp_path / "cache"
    good = load_dataset("svhn", svhn_root, cache_dir=cache_dir, progress=False)
    (entry,) = entries(cache_dir)
    if damage == "garbage":
        entry.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:2000])
    else:
        torch.save({"train_images": torch.zeros(3)}, entry)
    with pytest.warns(RuntimeWarning, match="ignoring unreadable dataset cache"):
        again = load_dataset("svhn", svhn_root, cache_dir=cache_dir, progress=False)
    assert torch.equal(again.train_images, good.train_images)
    assert cache.load(entry) is not None, "the entry should have been rewritten"


def test_unwritable_cache_warns_and_still_loads(svhn_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    with pytest.warns(RuntimeWarning, match="could not write dataset cache"):
        d = load_dataset("svhn", svhn_root, cache_dir=blocker, progress=False)
    assert d.train_images.shape == (12, 3, 32, 32)


def test_write_is_atomic(svhn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while writing leaves neither a partial entry nor a temporary file."""
    cache_dir = tmp_path / "cache"

    def crash(obj: object, f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.warns(RuntimeWarning, match="No space left"):
        load_dataset("svhn", svhn_root, cache_dir=cache_dir, progress=False)
    assert entries(cache_dir) == []
    monkeypatch.undo()
    load_dataset("svhn", svhn_root, cache_dir=cache_dir, progress=False)
    (entry,) = entries(cache_dir)
    assert entry.suffix == ".pt" and oct(entry.stat().st_mode & 0o777) == oct(0o644)


def test_key_depends_on_path(svhn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the files at another path is another source: built again, cached separately."""
    cache_dir = tmp_path / "cache"
    load_dataset("svhn", svhn_root, cache_dir=cache_dir, progress=False)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in svhn_root.iterdir():
        os.link(f, copy / f.name)
    calls = []
    real = svhn_module.read_official
    monkeypatch.setattr(svhn_module, "read_official", lambda *a, **k: calls.append(1) or real(*a, **k))
    load_dataset("svhn", copy, cache_dir=cache_dir, progress=False)
    assert calls == [1] and len(entries(cache_dir)) == 2
