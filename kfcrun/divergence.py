"""The divergence guard: stop a run whose training loss blew up, finite or not.

A non-finite loss stops a run at once. A finite blow-up (a tiny damping can send the
loss to 1e21 and keep it there) is caught by comparing the mean training loss of each
log interval (``trainer.log_every`` iterations) with a threshold

    threshold = min(max_loss_ratio * L_1, max_loss)

where ``L_1`` is the loss of the run's first step (before any update could have blown it
up; ``ln C`` for a fresh classifier over ``C`` classes) and either bound may be off
(``null``). When the mean stays above the threshold for ``patience`` log intervals in a
row, or is above it when the run ends, the run stops like a NaN does: one line, the last
good checkpoint kept (no checkpoint is written while the loss is above the threshold),
exit code 3 (:class:`~kfcrun.errors.TrainingDivergedError`).

The default ``max_loss_ratio = 3`` means: on average less than ``C^-3`` probability on the
correct class (for CIFAR-10, 100 times worse than guessing) for ``patience * log_every``
iterations in a row. A learning run never gets there; a diverging one does in a few steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from kfcrun.errors import TrainingDivergedError
from kfcrun.schema import integer, number

__all__ = ["DivergenceGuard", "DivergenceSettings"]


@dataclass(frozen=True)
class DivergenceSettings:
    """The ``divergence`` section.

    Attributes:
        max_loss_ratio: a log interval's mean training loss above this multiple of the first
            step's loss counts as diverging (``null``: no relative bound).
        max_loss: a log interval's mean training loss above this value (nats) counts as
            diverging (``null``: no fixed bound).
        patience: log intervals in a row above the threshold that stop the run.
    """

    max_loss_ratio: Annotated[float | None, number("3.0", gt=1, optional=True)] = 3.0
    max_loss: Annotated[float | None, number("50.0", gt=0, optional=True)] = None
    patience: Annotated[int, integer(1, "3")] = 3


class DivergenceGuard:
    """Watches the training loss; raises :class:`TrainingDivergedError` with one line when it diverged.

    Args:
        settings: the thresholds.
        where: describes the last good checkpoint and the fix (appended to the message).
    """

    def __init__(self, settings: DivergenceSettings, where: Callable[[], str]) -> None:
        self.settings = settings
        self.where = where
        #: ``L_1``, the loss of the run's first step (``None`` until seen).
        self.first_loss: float | None = None
        #: Log intervals in a row whose mean was above the threshold.
        self.strikes = 0
        self.last_mean: float | None = None

    @property
    def threshold(self) -> float | None:
        """The current threshold in nats, or ``None`` while there is none."""
        bounds = []
        if self.settings.max_loss_ratio is not None and self.first_loss is not None:
            bounds.append(self.settings.max_loss_ratio * self.first_loss)
        if self.settings.max_loss is not None:
            bounds.append(self.settings.max_loss)
        return min(bounds) if bounds else None

    @property
    def suspect(self) -> bool:
        """Whether the latest log interval was above the threshold (no checkpoint should be written)."""
        return self.strikes > 0

    def observe(self, losses: torch.Tensor, iteration: int, final: bool = False) -> None:
        """Check the losses of the log interval that ended at ``iteration`` (one host sync).

        ``final``: this is the run's last interval; being above the threshold then stops it.
        """
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            first_bad = iteration - len(losses) + 1 + int((~finite).nonzero()[0])
            value = losses[~finite][0].item()
            raise TrainingDivergedError(
                f"training loss became {value} at iteration {first_bad}; {self.where()}"
            )
        if self.first_loss is None:
            self.first_loss = float(losses[0])
        mean = float(losses.mean())
        self.last_mean = mean
        threshold = self.threshold
        if threshold is None or mean <= threshold:
            self.strikes = 0
            return
        self.strikes += 1
        if self.strikes >= self.settings.patience or final:
            raise TrainingDivergedError(
                f"training loss diverged: its mean over the log interval ending at iteration {iteration} is "
                f"{mean:.4g}, above the threshold {threshold:.4g} ({self._rule()}) for {self.strikes} log "
                f"interval(s) in a row{' at the end of the run' if final else ''}; {self.where()}"
            )

    def _rule(self) -> str:
        parts = []
        if self.settings.max_loss_ratio is not None and self.first_loss is not None:
            ratio = self.settings.max_loss_ratio
            parts.append(f"divergence.max_loss_ratio={ratio:g} x the first loss {self.first_loss:.4g}")
        if self.settings.max_loss is not None:
            parts.append(f"divergence.max_loss={self.settings.max_loss:g}")
        return " or ".join(parts) + f", divergence.patience={self.settings.patience}"

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to judge the same way: the first loss and the current strikes."""
        return {"first_loss": self.first_loss, "strikes": self.strikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (``{}``, from a checkpoint older than the guard, starts afresh)."""
        self.first_loss = state.get("first_loss")
        self.strikes = int(state.get("strikes", 0))
