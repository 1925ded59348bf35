"""Stopping a run on a signal without losing work.

:class:`GracefulStop` takes over SIGINT (Ctrl-C), SIGTERM (``kill``, Slurm's preemption
and time limit) and SIGUSR2 (the signal submitit and ``sbatch --signal`` send before a
job's time runs out) for the duration of a run:

* while training (:meth:`GracefulStop.arm`), the first signal only sets
  :attr:`GracefulStop.requested`; the loop finishes the current step, writes a
  checkpoint, prints one line with the ``resume=`` command and exits with
  ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM, 140 for SIGUSR2);
* before training starts (data loading, the initial curvature estimate) there is no
  step to finish and nothing new to save: the signal stops the run at once with
  :class:`RunInterrupted`;
* a second signal exits at once (the last checkpoint on disk stays intact: checkpoints
  are written atomically).

Signals whose handler is not the default are left alone (a parent that ignores SIGINT,
e.g. ``nohup``, keeps it ignored; a launcher that handles SIGTERM keeps it), except
SIGUSR2: if a handler was already installed (submitit's, which requeues the job), it is
called after the checkpoint is written, instead of exiting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from kfcrun.errors import KfcrunError

__all__ = ["SIGNALS", "GracefulStop", "RunInterrupted", "signal_name"]

#: The signals a run stops on, gracefully.
SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
_DEFAULTS: tuple[Any, ...] = (signal.SIG_DFL, signal.default_int_handler, None)


def signal_name(signum: int) -> str:
    """``SIGINT`` for 2, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class RunInterrupted(KfcrunError):
    """The run stopped on a signal; ``exit_code`` is ``128 + signal number``, as a shell reports it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class GracefulStop:
    """Signal handlers for one run, as a context manager (see the module docstring).

    Args:
        exit_now: called with the exit code on a second signal (``os._exit``; tests replace it).
    """

    def __init__(self, exit_now: Callable[[int], Any] = os._exit) -> None:
        self.requested: int | None = None
        self.armed = False
        #: What a second signal says about the state on disk (the trainer keeps it current).
        self.on_disk = "the last checkpoint on disk is intact"
        self._exit_now = exit_now
        self._previous: dict[int, Any] = {}
        #: Handlers that were installed before ours and are called after the checkpoint (SIGUSR2).
        self.chained: dict[int, Callable[[int, FrameType | None], Any]] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            if current not in _DEFAULTS:
                if sig == signal.SIGUSR2 and callable(current):
                    self.chained[int(sig)] = current
                else:
                    continue  # ignored, or handled by someone else: leave it
            self._previous[int(sig)] = current
            signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def arm(self) -> None:
        """From now on a first signal waits for the current step (training has started)."""
        self.armed = True

    @property
    def handled(self) -> tuple[int, ...]:
        """The signal numbers this object handles."""
        return tuple(self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            _say(f"kfcrun: {signal_name(signum)} again: stopped at once; {self.on_disk}\n")
            self._exit_now(128 + signum)
            return
        self.requested = signum
        if not self.armed:
            raise RunInterrupted(
                f"interrupted by {signal_name(signum)} before the first training step; nothing was trained "
                "or saved; fix: run the same command again",
                signum,
            )
        # Armed: the loop sees ``requested`` after the current step and reports, in one line, what it did.

    def finish(self) -> None:
        """After the checkpoint: call a chained handler (submitit's requeue) for the requested signal."""
        if self.requested is not None and self.requested in self.chained:
            self.chained[self.requested](self.requested, None)


def _say(text: str) -> None:
    """Write to stderr without Python's buffered streams (this may run inside a signal handler)."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())
