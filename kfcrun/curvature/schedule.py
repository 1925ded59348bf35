"""When the curvature is refreshed: Algorithm 1's periods ``T_s`` and ``T_f``.

Iterations ``k`` count from 1. Statistics are updated when ``k % T_s == 0`` and the
damped inverses recomputed when ``k % T_f == 0`` (paper App. A.1, Algorithm 1); for
``k <= refresh_until`` both happen every iteration (a kfcrun warm-up, 0 = Algorithm 1
as written). The schedule knows nothing of learning rates; both KFC-pre and K-FAC use it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CurvatureSchedule"]


@dataclass(frozen=True)
class CurvatureSchedule:
    """``T_s``, ``T_f`` and the optional every-iteration warm-up.

    Args:
        stats_every: ``T_s``, iterations between statistics updates.
        inverse_every: ``T_f``, iterations between inverse updates.
        refresh_until: statistics and inverses every iteration while ``k <= refresh_until``.
    """

    stats_every: int = 10
    inverse_every: int = 20
    refresh_until: int = 0

    def __post_init__(self) -> None:
        if self.stats_every < 1 or self.inverse_every < 1 or self.refresh_until < 0:
            raise ValueError("stats_every and inverse_every must be >= 1, refresh_until >= 0")

    def statistics_due(self, k: int) -> bool:
        """Whether iteration ``k`` (from 1) updates the factor statistics."""
        return k <= self.refresh_until or k % self.stats_every == 0

    def inverses_due(self, k: int) -> bool:
        """Whether iteration ``k`` (from 1) recomputes the damped inverses."""
        return k <= self.refresh_until or k % self.inverse_every == 0
