"""Exponential moving average of the iterates (paper Appendix A.1, Algorithm 1).

Both optimizers keep, per parameter, ``theta_avg <- xi_avg * theta_avg + (1 - xi_avg) * theta``
after every update, with ``xi_avg = exp(-batch_size / timescale)`` and the timescale in
training EXAMPLES (the paper uses one epoch of CIFAR-10, 50,000 examples; Algorithm 1
writes ``xi_avg = exp(-1/tau)`` with tau in mini-batches, which is the same thing).
The averages live in the optimizer's per-parameter state under ``"average"``, so
``state_dict()`` round-trips them and ``load_state_dict`` moves them to the right device.

Modes:

``"paper"``
    Algorithm 1 as written: ``theta_avg(0) = theta(0)``. Early on the initial iterate
    keeps weight ``xi_avg**k``: after 150 KFC-pre iterations at batch 512 that is 21%.
``"debiased"``
    Start the accumulator at zero and divide by ``1 - xi_avg**k`` (as Adam does for its
    moments): the result is the exponentially weighted mean of ``theta(1..k)`` only.
    It equals ``"paper"`` in the limit of many steps.

``start_iter`` (both modes): for ``k <= start_iter`` the average is reset to the current
iterate, so averaging effectively begins after ``start_iter`` updates.

Only parameters are averaged. Buffers such as BatchNorm running statistics are not: a BN
network evaluated with averaged parameters uses the running statistics gathered along
the current iterates (the paper does not say what it did).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

AVERAGING_MODES = ("paper", "debiased")


def averaging_decay(batch_size: int, timescale_examples: float) -> float:
    """Per-iteration EMA factor ``xi_avg = exp(-batch_size / timescale)``, both in examples."""
    if batch_size <= 0 or timescale_examples <= 0:
        raise ValueError("batch_size and timescale_examples must be positive")
    return math.exp(-batch_size / timescale_examples)


class IterateAveraging:
    """Shared EMA-of-iterates logic, owned by an optimizer.

    Args:
        optimizer: the owning optimizer; averages are stored in its per-parameter state as
            ``optimizer.state[p]["average"]`` (looked up on every use, because
            ``Optimizer.load_state_dict`` replaces the ``state`` dict).
        decay: ``xi_avg`` per iteration, or ``None`` to disable averaging (then the
            "averaged" parameters are the current ones).
        mode: ``"paper"`` or ``"debiased"`` (see module docstring).
        start_iter: reset the average to the iterate for the first ``start_iter`` updates.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, decay: float | None, mode: str = "paper", start_iter: int = 0
    ) -> None:
        if mode not in AVERAGING_MODES:
            raise ValueError(f"averaging mode must be one of {AVERAGING_MODES}, got {mode!r}")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"averaging decay must be in [0, 1), got {decay}")
        self.optimizer, self.decay, self.mode, self.start_iter = optimizer, decay, mode, start_iter

    @property
    def state(self) -> dict:
        """The wrapped optimizer's per-parameter state, which holds the ``"average"`` accumulators."""
        return self.optimizer.state

    @property
    def enabled(self) -> bool:
        """Whether averaging is on (a ``decay`` was given)."""
        return self.decay is not None

    def begin(self, params: Iterable[torch.Tensor]) -> None:
        """Create the accumulators before the first update (``theta_avg(0)``)."""
        if not self.enabled:
            return
        for p in params:
            st = self.state[p]
            if "average" not in st:
                st["average"] = p.detach().clone() if self.mode == "paper" else torch.zeros_like(p)

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], step: int) -> None:
        """Fold the iterate ``theta(step)`` (already updated) into the averages."""
        if not self.enabled or not params:
            return
        assert self.decay is not None  # enabled
        averages = [self.state[p]["average"] for p in params]
        if step <= self.start_iter:
            if self.mode == "paper":
                torch._foreach_copy_(averages, [p.detach() for p in params])
            else:
                # Keep the debiased invariant average/(1 - xi_avg^k') == theta with k' = steps since start.
                torch._foreach_mul_(averages, 0.0)
                torch._foreach_add_(averages, [p.detach() for p in params], alpha=1.0 - self.decay)
            return
        torch._foreach_lerp_(averages, [p.detach() for p in params], 1.0 - self.decay)

    def correction(self, step: int) -> float:
        """Factor that turns the stored accumulator into the reported average.

        In ``"debiased"`` mode the accumulator holds ``n`` folded iterates with total
        weight ``1 - xi_avg**n``; ``n = step`` without ``start_iter``, and counts the iterate at
        ``start_iter`` (the restart point) as the first term otherwise.
        """
        if self.mode == "paper" or not self.enabled or step <= 0:
            return 1.0
        assert self.decay is not None  # enabled
        terms = step if self.start_iter == 0 else max(step - self.start_iter + 1, 1)
        return 1.0 / (1.0 - self.decay**terms)

    @contextmanager
    def swapped_in(self, params: list[torch.Tensor], step: int) -> Iterator[None]:
        """Temporarily load the averaged parameters into the model (for evaluation)."""
        if not self.enabled or step == 0 or not params or "average" not in self.state[params[0]]:
            yield
            return
        scale = self.correction(step)
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p in params:
                p.copy_(self.state[p]["average"])
                if scale != 1.0:
                    p.mul_(scale)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in params], saved)
