"""Warnings the curvature code raises, attributed to the caller's code rather than ours."""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

__all__ = ["KFCCurvatureWarning", "warn"]

_PACKAGE_DIR = os.path.dirname(__file__)


class KFCCurvatureWarning(RuntimeWarning):
    """A factor could not be used as is (inversion fallback, non-finite values, unused layer)."""


def warn(message: str) -> None:
    """Warn with :class:`KFCCurvatureWarning`, pointing at the first frame outside this package."""
    frame: FrameType | None
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.dirname(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, KFCCurvatureWarning, stacklevel=level)
