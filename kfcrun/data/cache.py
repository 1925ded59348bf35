"""Decode once: keep decoded datasets as uint8 tensors in a writable cache directory.

Decoding CIFAR-10's 60,000 JPEGs takes seconds; reading the cached tensors back takes
a fraction of a second. The data root itself may be read-only (it is in CI), so the
cache lives elsewhere:

1. the ``cache_dir`` argument, else
2. the environment variable ``KFCRUN_CACHE_DIR``, else
3. ``~/.cache/kfcrun``.

An entry is keyed by a hash of everything that determines its contents: dataset, format,
resolved source path, a cheap fingerprint of the source files (names, sizes, mtimes),
loader options, and :data:`CACHE_VERSION`. Entries are written atomically (temporary file
in the same directory, then ``os.replace``), so a crash or a concurrent run never leaves a
half-written entry under the final name. An unreadable entry is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kfcrun.data.base import ImageData

log = logging.getLogger(__name__)

CACHE_ENV = "KFCRUN_CACHE_DIR"
#: Bump when the layout of an entry or the decoding changes, so old entries are ignored.
CACHE_VERSION = 1
_TENSOR_FIELDS = ("train_images", "train_labels", "test_images", "test_labels")


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache base directory: ``cache_dir``, else ``$KFCRUN_CACHE_DIR``, else ``~/.cache/kfcrun``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kfcrun"


def entry_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    """Where the entry for ``key`` lives: ``<cache_dir>/data/<dataset>-<format>-<source hash>-<key hash>.pt``.

    The source hash covers everything but the fingerprint (path and options), so entries that
    share it differ only in the files' fingerprint; :func:`save` deletes those stale ones.
    """
    source = {k: v for k, v in key.items() if k != "fingerprint"}
    source_hash = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:8]
    full = hashlib.sha256(json.dumps({**key, "version": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()
    return cache_dir / "data" / f"{key['dataset']}-{key['format']}-{source_hash}-{full[:16]}.pt"


def load(path: Path) -> ImageData | None:
    """Read an entry; ``None`` if absent. A corrupted or invalid entry gives a warning and ``None``."""
    if not path.is_file():
        return None
    try:
        # weights_only: the entry holds only tensors, strings and lists, so never unpickle code.
        blob = torch.load(path, map_location="cpu", weights_only=True)
        data = ImageData(
            **{f: blob[f] for f in _TENSOR_FIELDS},
            classes=tuple(blob["classes"]),
            name=str(blob["name"]),
            source=str(blob["source"]),
        )
        data.validate()
    except FileNotFoundError:  # removed by a concurrent run between is_file() and open
        return None
    except Exception as err:  # any failure to read back means "rebuild", never "crash"
        warnings.warn(
            f"ignoring unreadable dataset cache {path} ({type(err).__name__}: {err}); "
            "decoding the dataset again",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return data


def save(path: Path, data: ImageData) -> None:
    """Write an entry atomically and delete older entries of the same source.

    A cache that cannot be written (read-only home, full disk) costs speed, not correctness,
    so failures are a warning.
    """
    blob = {f: getattr(data, f).contiguous() for f in _TENSOR_FIELDS}
    blob.update(classes=list(data.classes), name=data.name, source=data.source)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; let other users of a shared cache dir read it
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        warnings.warn(
            f"could not write dataset cache {path} ({err}); the next run will decode again",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    # Same dataset, format, source and options but another fingerprint: the files changed, so stale.
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(prefix + "*.pt"):
        if old != path:
            old.unlink(missing_ok=True)


def cached(key: dict[str, Any], build: Callable[[], ImageData], cache_dir: str | Path | None) -> ImageData:
    """Return the cached entry for ``key`` or ``build()`` it and cache the result.

    ``key`` must hold ``dataset``, ``format``, ``source_path`` and ``fingerprint`` plus any option
    the contents depend on; all values must be JSON-serialisable.
    """
    path = entry_path(resolve_cache_dir(cache_dir), key)
    start = time.perf_counter()
    data = load(path)
    if data is not None:
        log.info("loaded %s from cache %s in %.2f s", data.name, path, time.perf_counter() - start)
        return data
    data = build()
    data.validate()
    log.info("built %s in %.2f s", data.name, time.perf_counter() - start)
    save(path, data)
    return data
