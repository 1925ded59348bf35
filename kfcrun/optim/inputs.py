"""Where a curvature optimizer gets the mini-batch for its statistics and ``nu``.

KFC-pre and K-FAC need the inputs of the current mini-batch (a statistics pass and the
exact Fisher of ``nu`` re-run the network on part of it). There are two ways to give it:

* **explicitly**: ``opt.step(inputs=x, targets=y)``. The kfcrun runner always does this
  (and builds its optimizers with ``record_inputs=False``, so nothing else is relied on);
* **recorded**: with ``record_inputs=True`` (the default, for the plain
  ``loss.backward(); opt.step()`` loop) the optimizer registers ONE forward hook on
  the model, a :class:`BatchRecorder`. For every forward pass made in train mode with
  gradients enabled it keeps a reference to the first positional argument, and adds it
  to the step's batches once a gradient flows back through the model's output: the
  batches whose gradients ``.grad`` holds. That is the one batch of a plain step, or the
  micro-batches of a step with gradient accumulation
  (``for x in micro_batches: loss(model(x)).backward()``, then one ``step()``); a
  forward pass without a backward (e.g. a training-accuracy pass) is not a batch. A
  model whose output is not a tensor records every train-mode forward with gradients.
  The optimizer's own passes are excluded (:meth:`BatchRecorder.paused`). The hook
  holds no reference to the optimizer; a deep copy of the model gets its own recorder
  (so an EMA copy's forwards cannot add batches), and the recorded batches are not
  pickled with the model.
  ``opt.remove_hooks()`` detaches it.

Explicit inputs always win over recorded ones; ``step(inputs=[x1, x2, ...])`` passes
micro-batches explicitly. Every ``step()`` clears the recorder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["BatchRecorder"]


class BatchRecorder:
    """A forward hook that keeps the batches of the model's training passes since the last step.

    See the module docstring.
    """

    def __init__(self) -> None:
        self.batches: list[Tensor] = []
        self._paused = 0

    @property
    def is_paused(self) -> bool:
        """Whether forward passes are currently not recorded (inside :meth:`paused`)."""
        return self._paused > 0

    @property
    def inputs(self) -> Tensor | None:
        """The last recorded batch, or ``None``."""
        return self.batches[-1] if self.batches else None

    def take(self) -> list[Tensor]:
        """The recorded batches, in order; the recorder is empty afterwards."""
        batches, self.batches = self.batches, []
        return batches

    def attach(self, model: nn.Module) -> RemovableHandle:
        """Register on ``model``; returns the handle that removes it."""
        return model.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """The forward hook: remember ``args[0]`` (the batch) for :attr:`batches` (see the class docstring).

        Only in training mode with grad enabled, and not while :meth:`paused`.
        """
        if self._paused or not module.training or not torch.is_grad_enabled():
            return
        if not args or not isinstance(args[0], Tensor):
            return
        batch = args[0]
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(self._when_backpropagated(batch))
        else:
            self.batches.append(batch)

    def _when_backpropagated(self, batch: Tensor) -> Callable[[Tensor], None]:
        """A gradient hook on the model output that adds ``batch`` the first time a gradient reaches it."""
        seen = False

        def hook(_grad: Tensor) -> None:
            nonlocal seen
            if not seen and not self._paused:
                seen = True
                self.batches.append(batch)

        return hook

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside this block are not recorded (the optimizer's own passes)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles of the model carry an empty recorder, not the recorded batches.
        return {"batches": [], "_paused": 0}
