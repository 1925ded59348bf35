"""SGD with momentum and iterate averaging: the paper's baseline (Sec. 5.2, footnote 2).

The update is ``p <- mu * p - alpha * (grad + lambda * theta)``, ``theta <- theta + p``,
which is ``torch.optim.SGD`` with ``dampening = 0`` (identical to cuda-convnet's
``inc = mom*inc - wc*eps*W + eps*grad`` for a constant learning rate). After each
update the EMA of the iterates is refreshed (:mod:`kfcrun.optim.averaging`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import torch
from torch import nn

from kfcrun.optim.averaging import AVERAGING_MODES, IterateAveraging
from kfcrun.optim.param_groups import build_param_groups
from kfcrun.schema import boolean, check_arguments, choice, integer, mapping_of_numbers, number


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, L2 weight decay) plus parameter averaging.

    Args:
        params: parameters or param groups (see :func:`kfcrun.optim.build_param_groups`).
        lr: learning rate ``alpha`` on the gradient of the MEAN mini-batch loss.
        momentum: ``mu`` (paper: 0.9).
        weight_decay: default ``lambda`` for groups that do not set their own.
        avg_decay: per-iteration EMA factor ``xi_avg`` of the iterates (see
            :func:`kfcrun.optim.averaging.averaging_decay`); ``None`` disables averaging.
        avg_mode: ``"paper"`` or ``"debiased"``; ``avg_start``: see
            :class:`~kfcrun.optim.averaging.IterateAveraging`.

    ``iteration`` counts completed steps; ``averaged_parameters()`` swaps the averages
    into the model for evaluation. Implements :class:`~kfcrun.optim.protocol.TrainingOptimizer`:
    it wants no initialization, no labels and no closure, and ignores the mini-batch passed to ``step``.
    """

    #: SGD needs no initial curvature estimate.
    init_examples = 0
    #: SGD's step needs no loss closure (the runner passes none).
    needs_closure = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        avg_decay: float | None = None,
        avg_mode: str = "paper",
        avg_start: int = 0,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.iteration = 0
        self.averaging = IterateAveraging(self, avg_decay, avg_mode, avg_start)
        self.averaging.begin(self._params())

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        lr: Annotated[float, number("0.003", gt=0)],
        momentum: Annotated[float, number("0.9", ge=0, lt=1)] = 0.9,
        weight_decay: Annotated[float, number("0.004", ge=0)] = 0.0,
        *,
        layer_weight_decay: Annotated[dict[str, float] | None, mapping_of_numbers("{fc10: 1.0}")] = None,
        decay_biases: Annotated[bool, boolean()] = False,
        bias_lr_scale: Annotated[float, number("2.0", gt=0)] = 1.0,
        avg_decay: float | None = None,
        avg_mode: Annotated[str, choice(*AVERAGING_MODES)] = "paper",
        avg_start: Annotated[int, integer(0, "0")] = 0,
        seed: int = 0,
    ) -> SGD:
        """SGD on ``model`` with cuda-convnet's per-parameter settings.

        The parameter groups are built by :func:`~kfcrun.optim.build_param_groups`.

        ``weight_decay`` (and ``layer_weight_decay`` by layer name) is the L2 ``lambda`` of the
        weight layers' weights, biases get ``lr * bias_lr_scale`` and are decayed only if
        ``decay_biases``; everything else gets ``lr`` and no decay. The annotated arguments
        are the knobs of ``configs/optimizer/sgd.yaml``; ``seed`` is accepted for a uniform
        builder signature and unused (SGD draws nothing).
        """
        check_arguments(cls.for_model, locals())
        groups = build_param_groups(
            model,
            lr,
            weight_decay=weight_decay,
            layer_weight_decay=layer_weight_decay,
            bias_lr_scale=bias_lr_scale,
            decay_biases=decay_biases,
        )
        return cls(
            groups, lr=lr, momentum=momentum, avg_decay=avg_decay, avg_mode=avg_mode, avg_start=avg_start
        )

    @property
    def needs_labels(self) -> bool:
        """SGD never needs the labels: the gradient is already in ``.grad``."""
        return False

    def initialize(self, batches: Iterable[Any]) -> None:
        """Nothing to estimate before the first step."""

    @property
    def phase_times(self) -> dict[str, float]:
        """SGD's step is not split into timed phases."""
        return {}

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        inputs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> Any:
        """``torch.optim.SGD.step``, then fold the new iterate into the average.

        ``inputs`` and ``targets`` are unused (the gradient is already in ``.grad``).
        """
        loss = super().step(closure)
        self.iteration += 1
        self.averaging.update(self._params(), self.iteration)
        return loss

    @contextmanager
    def averaged_parameters(self) -> Iterator[None]:
        """Load the averaged iterates into the parameters inside the ``with`` block."""
        with self.averaging.swapped_in(self._params(), self.iteration):
            yield

    def step_stats(self) -> dict[str, torch.Tensor]:
        """Per-step statistics for logging (none for SGD)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim.SGD`` state (momentum buffers, averages) plus the iteration count."""
        state = super().state_dict()
        state["iteration"] = self.iteration
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (a missing iteration count reads as 0)."""
        state_dict = dict(state_dict)
        self.iteration = int(state_dict.pop("iteration", 0))
        super().load_state_dict(state_dict)
