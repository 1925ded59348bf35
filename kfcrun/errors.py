"""User-facing errors.

Every problem a user can fix (a bad config value, missing data, a diverged run,
a failed factor inversion) is raised as a :class:`KfcrunError` subclass whose
message is ONE line: what was wrong and how to fix it. The CLI prints that line
and exits non-zero; a Python traceback is shown only with ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations


class KfcrunError(Exception):
    """Base class for errors the user can act on; ``str(err)`` is one line."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ConfigError(KfcrunError):
    """A config key holds a value that is out of range, of the wrong type, or unknown."""


class DatasetError(KfcrunError):
    """Data is missing, corrupted, or cannot be downloaded."""


class TrainingDivergedError(KfcrunError):
    """The training loss became non-finite."""

    exit_code = 3


class CheckpointError(KfcrunError):
    """A checkpoint to resume from is missing or unreadable."""
