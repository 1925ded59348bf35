"""Per-phase timers for optimizer steps that do not force a host sync on every step.

On CPU a phase is timed with ``time.perf_counter``. On CUDA each phase records a pair
of CUDA events; the elapsed times are read (one sync) only when someone asks for
them, e.g. the training loop at logging time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Cumulative seconds spent in named phases.

    Args:
        device: where the timed work runs; CUDA work is timed with CUDA events.
    """

    def __init__(self, device: torch.device) -> None:
        self.use_events = device.type == "cuda"
        self._totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the ``with`` block and add its duration to ``phase`` (CUDA: recorded, read later)."""
        if self.use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((phase, start, end))
        else:
            began = time.perf_counter()
            yield
            self._totals[phase] += time.perf_counter() - began

    def totals(self) -> dict[str, float]:
        """Seconds per phase so far (resolves pending CUDA events: one sync)."""
        for phase, start, end in self._pending:
            end.synchronize()
            self._totals[phase] += start.elapsed_time(end) / 1000.0
        self._pending.clear()
        return dict(self._totals)

    def state_dict(self) -> dict[str, float]:
        """Seconds per phase so far, for a checkpoint (the same as :meth:`totals`; syncs on CUDA)."""
        return self.totals()

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the totals of :meth:`state_dict`, dropping any pending CUDA events."""
        self._pending.clear()
        self._totals = defaultdict(float, state)
