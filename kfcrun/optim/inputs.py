"""Where a curvature optimizer gets the mini-batch for its statistics and ``nu``.

KFC-pre and K-FAC need the inputs of the current mini-batch (a statistics pass and the
exact Fisher of ``nu`` re-run the network on part of it). There are two ways to give it:

* **explicitly**: ``opt.step(inputs=x, targets=y)``. The kfcrun runner always does this
  (and builds its optimizers with ``record_inputs=False``, so nothing else is relied on);
* **recorded**: with ``record_inputs=True`` (the default, for the plain
  ``loss.backward(); opt.step()`` loop) the optimizer registers ONE forward pre-hook on
  the model, a :class:`BatchRecorder`, which keeps a reference to the first positional
  argument of the model's last forward pass made in train mode with gradients enabled.
  The optimizer's own passes are excluded (:meth:`BatchRecorder.paused`). The hook holds
  no reference to the optimizer; a deep copy of the model gets its own recorder (so an
  EMA copy's forwards cannot replace the batch), and the recorded batch is not pickled
  with the model. ``opt.remove_hooks()`` detaches it.

Explicit inputs always win over recorded ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["BatchRecorder"]


class BatchRecorder:
    """A forward pre-hook that keeps the model's last training-mode input (see the module docstring)."""

    def __init__(self) -> None:
        self.inputs: Tensor | None = None
        self._paused = 0

    def attach(self, model: nn.Module) -> RemovableHandle:
        """Register on ``model``; returns the handle that removes it."""
        return model.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """The pre-hook: keep ``args[0]`` (the batch) as :attr:`inputs`.

        Only in training mode with grad enabled, and not while :meth:`paused`.
        """
        if self._paused or not module.training or not torch.is_grad_enabled():
            return
        if args and isinstance(args[0], Tensor):
            self.inputs = args[0]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside this block are not recorded (the optimizer's own passes)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles of the model carry an empty recorder, not the last batch.
        return {"inputs": None, "_paused": 0}
