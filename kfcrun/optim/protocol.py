"""What the training loop needs from an optimizer, beyond ``torch.optim.Optimizer``.

kfcrun's optimizers (:class:`~kfcrun.optim.SGD`, :class:`~kfcrun.optim.KFCPre`,
:class:`~kfcrun.optim.KFAC`) all
implement :class:`TrainingOptimizer`, so the runner never checks for attributes or
reads config strings to know what an optimizer wants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["InitBatch", "TrainingOptimizer"]

#: One batch for :meth:`TrainingOptimizer.initialize`: inputs, or ``(inputs, labels)``.
InitBatch = Tensor | tuple[Tensor, Tensor]


@runtime_checkable
class TrainingOptimizer(Protocol):
    """The optimizer side of the training loop.

    Attributes:
        init_examples: training examples the loop should pass to :meth:`initialize`
            before the first step (0: none wanted).
        needs_labels: whether :meth:`step` must receive the training labels as ``targets``.
        needs_closure: whether :meth:`step` must receive a closure that returns the mean
            mini-batch loss at the current parameters (a forward pass, no ``backward``):
            K-FAC evaluates the objective after its update for the reduction ratio.
        iteration: completed steps.
    """

    init_examples: int
    iteration: int

    @property
    def needs_labels(self) -> bool:
        """Whether :meth:`step` must receive the training labels as ``targets``."""

    @property
    def needs_closure(self) -> bool:
        """Whether :meth:`step` must receive a closure returning the mini-batch loss."""

    def initialize(self, batches: Iterable[InitBatch]) -> None:
        """Use ``batches`` (about ``init_examples`` examples) before the first step."""

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> Any:
        """One update from the gradients in ``.grad``; ``inputs``/``targets`` are the mini-batch.

        ``closure`` is passed when :attr:`needs_closure` says so, else it is ``None``.
        """

    def averaged_parameters(self) -> AbstractContextManager[None]:
        """Context in which the model holds the averaged iterates (for evaluation)."""

    def step_stats(self) -> dict[str, Any]:
        """Per-step statistics for logging (tensors may sync when read)."""

    @property
    def phase_times(self) -> dict[str, float]:
        """Cumulative seconds per phase of the step (empty if not timed)."""

    # -- the torch.optim.Optimizer methods the loop calls -----------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the parameters' ``.grad`` (to ``None`` with ``set_to_none``), as in ``torch.optim``."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit (``torch.optim.Optimizer`` state plus extras)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
