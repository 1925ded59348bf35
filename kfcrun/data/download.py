"""Fetch the official files with torchvision's downloader, failing fast without a network.

torchvision opens its URLs without a timeout, so on a machine whose packets are dropped
(no route, firewall) a download would wait for the OS's TCP timeout, minutes. We set a
process-wide default socket timeout for the duration of the download and turn every
network or integrity failure into a one-line :class:`~kfcrun.errors.DatasetError`.
Name resolution (DNS) is not covered by socket timeouts; on offline machines it
normally fails at once.
"""

from __future__ import annotations

import socket
import urllib.error
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kfcrun.errors import DatasetError

#: Seconds a single socket operation (connect, read) may block during a download.
DOWNLOAD_TIMEOUT_S = 20.0


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Set ``socket.setdefaulttimeout(seconds)`` inside the block and restore the old value afterwards."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def run_download(
    fetch: Callable[[], None],
    *,
    what: str,
    url: str,
    root: Path,
    expected: str,
    partial: Path | None = None,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
) -> None:
    """Run ``fetch()``, a torchvision download call, under a socket timeout; ``DatasetError`` on failure.

    Args:
        fetch: downloads ``url`` into ``root``.
        what: dataset name for the message, e.g. ``"CIFAR-10"``.
        url: shown in the message so a user can fetch the file by hand.
        root: the directory the files go to.
        expected: the files or folder the user would put in ``root`` by hand.
        partial: the file ``fetch`` writes; deleted on failure, so that a half-written file
            is not later mistaken for the real one.
        timeout_s: seconds one socket operation may block.
    """
    manual = (
        f"fetch {url} yourself, put {expected} in {root} and set dataset.root={root}, "
        "or check your connection"
    )
    try:
        with socket_timeout(timeout_s):
            fetch()
    except Exception as err:
        if partial is not None:
            partial.unlink(missing_ok=True)
        error = _download_error(err, what, url, root, expected, manual)
        if error is err:
            raise
        raise error from err


def _download_error(err: Exception, what: str, url: str, root: Path, expected: str, manual: str) -> Exception:
    if isinstance(err, PermissionError):
        return DatasetError(
            f"could not download {what} into {root}: the directory is not writable ({err}); "
            "fix: set dataset.root=<a writable dir> with dataset.download=true, or put "
            f"{expected} in a directory and set dataset.root=<dir>"
        )
    if isinstance(err, (urllib.error.URLError, TimeoutError, ConnectionError, socket.gaierror)):
        # URLError wraps DNS failures and refused or unreachable connections; TimeoutError
        # (socket.timeout) is the default timeout above firing.
        reason = getattr(err, "reason", err)
        return DatasetError(
            f"could not download {what} from {url} into {root} (no network?): "
            f"{type(err).__name__}: {reason}; fix: {manual}"
        )
    if isinstance(err, RuntimeError):  # torchvision: "File not found or corrupted." after an MD5 mismatch
        return DatasetError(
            f"downloaded {what} from {url} into {root} but the file is corrupted ({err}); "
            f"fix: delete it and retry with dataset.download=true, or {manual}"
        )
    if isinstance(err, OSError):  # disk full, broken archive, ...
        return DatasetError(
            f"could not download {what} from {url} into {root}: {type(err).__name__}: {err}; fix: {manual}"
        )
    return err  # a bug, not a data problem: let it through unchanged
