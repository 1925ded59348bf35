"""Recording layer inputs and outputs for one statistics pass.

:class:`ActivationCapture` owns every hook handle it creates. Hooks exist only
inside ``with capture.recording():`` and are removed on exit, even on error, so the
ordinary training forward/backward never sees them.

Why forward hooks and ``torch.autograd.grad`` (not ``register_full_backward_hook``):
the pre-activation derivatives ``DS`` are obtained as
``torch.autograd.grad(loss_sum, outputs)`` with the recorded outputs, which never
touches any ``.grad``. A layer's output may be modified in place downstream
(``ReLU(inplace=True)``), which would silently turn ``outputs`` into the
post-activation tensor; so while recording, the hook hands the rest of the network
a copy of the output and keeps the original, whose value and history nothing else
can change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ActivationCapture", "LayerRecord"]


@dataclass
class LayerRecord:
    """What one layer saw in the recorded forward pass.

    ``input`` is detached (it feeds ``Omega``); ``output`` stays in the graph (it is the
    tensor ``DS`` is taken with respect to). ``input_version`` catches in-place edits
    of the input after the layer ran, which would corrupt ``Omega``.
    """

    input: Tensor
    input_version: int
    output: Tensor

    def checked_input(self, name: str) -> Tensor:
        """The recorded input, after checking nobody modified it in place since."""
        if self.input._version != self.input_version:
            raise RuntimeError(
                f"kfc: the input of layer {name!r} was modified in place after the layer ran; "
                "its Omega factor would be wrong. Avoid in-place ops on tensors that feed a Conv2d/Linear."
            )
        return self.input


class ActivationCapture:
    """Forward hooks on a fixed set of modules, alive only inside :meth:`recording`.

    A module that runs several times in one forward pass (a shared layer) gets one
    record per use, in call order; the blocks combine the uses (see
    :mod:`kfcrun.curvature.blocks`).
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self._modules: dict[str, nn.Module] = dict(modules)
        self._handles: list[RemovableHandle] = []
        self.records: dict[str, list[LayerRecord]] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, list[LayerRecord]]]:
        """Register the hooks, yield the (filling) ``name -> [record per use]`` dict, remove the hooks."""
        if self._handles:
            raise RuntimeError("ActivationCapture.recording() is not re-entrant")
        self.records = {}
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(partial(self._hook, name)))
            yield self.records
        finally:
            self.remove()

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise TypeError(f"kfc: layer {name!r} must take and return a single tensor")
        inp = args[0]
        if not output.requires_grad:
            # Frozen parameters and inputs: output is a graph leaf; make it one we can
            # differentiate with respect to, so DS still exists for this layer.
            output.requires_grad_(True)
        record = LayerRecord(input=inp.detach(), input_version=inp._version, output=output)
        self.records.setdefault(name, []).append(record)
        # The network continues with a copy, so in-place ops downstream cannot alter `output`.
        return output.clone()
