"""Learning-rate schedules as a pure function of the iteration (so resuming needs no scheduler state).

``lr_k = lr * factor(k)`` for iteration ``k = 1..K`` (``K`` = the run's total iterations):

* ``constant``: ``1`` (the paper's setting: a fixed learning rate, Sec. 5.2);
* ``cosine``: ``(1 + cos(pi (k - 1) / K)) / 2``, from 1 down to nearly 0 (Loshchilov &
  Hutter 2017, without restarts or warm-up);
* ``step``: ``decay ** (number of milestones m with k - 1 >= round(m K))``, milestones as
  fractions of the run (e.g. ``[0.5, 0.75]`` with ``decay = 0.1``).

The factor multiplies every param group's own base lr (groups may differ, e.g. the
biases' ``bias_lr_scale``). Optimizers that adapt their step size themselves declare
``supports_lr_schedule = False`` and the runner refuses a schedule for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["SCHEDULES", "apply_lr_factor", "lr_factor"]

#: The schedule names configs use.
SCHEDULES = ("constant", "cosine", "step")


def lr_factor(
    schedule: str, iteration: int, total: int, milestones: Sequence[float] = (0.5, 0.75), decay: float = 0.1
) -> float:
    """The factor of iteration ``iteration`` (from 1) of ``total`` (see the module docstring)."""
    if schedule == "constant":
        return 1.0
    done = min(max(iteration - 1, 0), total)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done / max(total, 1)))
    if schedule == "step":
        passed = sum(1 for m in milestones if done >= round(m * total))
        return float(decay**passed)
    raise ValueError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def apply_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every param group's ``lr`` to its ``base_lr`` (recorded the first time) times ``factor``."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * factor
