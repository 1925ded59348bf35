"""A staleness guard: refresh the curvature when the last step says it has gone stale.

Algorithm 1 refreshes the factor statistics every ``T_s`` and the damped inverses every
``T_f`` iterations. Early in training the network's scale changes fast and factors
that are a few iterations old mis-scale the step by orders of magnitude (issue 10: at
gamma = 1e-3, ``nu`` was 4.2e4 at iteration 2 with ``T_s/T_f = 10/20`` against 144 with
fresh factors). Instead of a fixed ``refresh_until``, the guard watches two signals of
the previous step and asks for a refresh (statistics on the current batch, then the
inverses) when either fires:

* ``nu`` jumped: ``nu_k > nu_jump * nu_{k-1}`` (``nu = v^T F v``, the KL size of the
  step; the exact-Fisher part of it);
* a health score fell below a threshold: KFC-pre's clip factor ``min(1, sqrt(C/nu))``
  (the step had to be shrunk that much), or K-FAC's reduction ratio ``rho`` (the
  quadratic model mispredicted the loss).

The signals stay on the device; :meth:`StalenessGuard.due` reads ONE scalar on the host
per step (a sync on CUDA), the only host read the guard makes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["StalenessGuard"]


class StalenessGuard:
    """Asks for a curvature refresh after a step whose ``nu`` jumped or whose health score was low.

    Args:
        nu_jump: refresh when ``nu`` grew by more than this factor from one step to the next
            (``None``: ignore ``nu``).
        health_below: refresh when the step's health score fell below this (``None``: ignore it).

    A guard with both ``None`` never fires and reads nothing.
    """

    def __init__(self, nu_jump: float | None = None, health_below: float | None = None) -> None:
        self.nu_jump, self.health_below = nu_jump, health_below
        self._previous_nu: Tensor | None = None
        self._stale: Tensor | None = None
        self.refreshes = 0  # how many times the guard fired

    @property
    def enabled(self) -> bool:
        """Whether any threshold is set."""
        return self.nu_jump is not None or self.health_below is not None

    def observe(self, nu: Tensor | None = None, health: Tensor | None = None) -> None:
        """Record one step's ``nu`` and health score (device tensors; no sync)."""
        if not self.enabled:
            return
        flags: list[Tensor] = []
        if self.nu_jump is not None and nu is not None:
            if self._previous_nu is not None:
                flags.append(nu > self.nu_jump * self._previous_nu)
            self._previous_nu = nu.detach().clone()
        if self.health_below is not None and health is not None:
            flags.append(health < self.health_below)
        if flags:
            stale = torch.stack(flags).any()
            self._stale = stale if self._stale is None else self._stale | stale

    def due(self) -> bool:
        """Whether the last observed step asks for a refresh (reads one scalar); clears the request."""
        if self._stale is None:
            return False
        stale, self._stale = bool(self._stale), None
        self.refreshes += int(stale)
        return stale

    def state_dict(self) -> dict[str, Any]:
        """The last ``nu``, a pending request and the refresh count."""
        return {"previous_nu": self._previous_nu, "stale": self._stale, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore :meth:`state_dict` onto ``device``."""

        def restore(value: Tensor | None) -> Tensor | None:
            return None if value is None else value.detach().clone().to(device)

        self._previous_nu = restore(state.get("previous_nu"))
        self._stale = restore(state.get("stale"))
        self.refreshes = int(state.get("refreshes", 0))
