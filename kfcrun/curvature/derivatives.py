"""One recorded forward pass, and the derivatives of a loss with respect to layer outputs.

This is the seam between a network and its curvature: the factor statistics
(:mod:`kfcrun.curvature.factors`) and the assumption study both need, for a batch,
each layer's input and the derivatives ``DS`` of a loss with respect to each layer's
output. :func:`recorded_pass` gives both for any set of layers; :func:`output_derivatives`
is the one-loss shortcut.

Side effects: none that outlive the pass. Buffers (BatchNorm running statistics,
``num_batches_tracked``) are snapshot and restored, ``DS`` comes from
``torch.autograd.grad`` so no ``.grad`` is touched, the hooks exist only during the
forward pass, and the train/eval mode is whatever the caller set. A train-mode forward
does consume the global RNG where the model draws from it (dropout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .capture import ActivationCapture, LayerRecord
from .coverage import kfc_layers
from .fisher import LossFn

__all__ = ["LayerPass", "output_derivatives", "preserved_buffers", "recorded_pass"]


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Snapshot every buffer of ``model`` and copy it back on exit (BN running stats etc.)."""
    saved = [(buf, buf.detach().clone()) for buf in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


@dataclass
class LayerPass:
    """What a recorded forward pass saw: the model output and each layer's inputs and outputs.

    ``records[name]`` has one entry per use of the layer (a shared layer runs several
    times). ``names`` lists the requested layers that ran, in the order requested; a
    layer that did not run is absent.
    """

    logits: Tensor | None
    records: dict[str, list[LayerRecord]]
    names: list[str] = field(default_factory=list)

    def layer_inputs(self, name: str) -> list[Tensor]:
        """Layer ``name``'s (detached) input of every use, checked for in-place edits since the pass."""
        return [record.checked_input(name) for record in self.records[name]]

    def layer_input(self, name: str) -> Tensor:
        """The input of a layer that ran once (see :meth:`layer_inputs` for shared layers)."""
        inputs = self.layer_inputs(name)
        if len(inputs) != 1:
            raise RuntimeError(
                f"kfc: layer {name!r} ran {len(inputs)} times in one forward pass; use layer_inputs()"
            )
        return inputs[0]

    def derivatives(self, loss: Tensor, *, retain_graph: bool = False) -> dict[str, list[Tensor]]:
        """``{name: [d loss / d output of each use]}`` for every layer that ran.

        Zeros where an output does not reach the loss.

        A layer whose output does not reach the loss gets zeros. The derivative of a loss
        that sums per-example losses has one row per example and output position: ``DS``
        of Eqn 32, not divided by the batch size.
        """
        outputs = [record.output for name in self.names for record in self.records[name]]
        derivs = iter(
            torch.autograd.grad(
                loss, outputs, retain_graph=retain_graph, allow_unused=True, materialize_grads=True
            )
        )
        return {name: [next(derivs).detach() for _ in self.records[name]] for name in self.names}

    def release_graph(self) -> None:
        """Drop the model output and the layer outputs, so the autograd graph can be freed."""
        self.logits = None
        for records in self.records.values():
            for record in records:
                record.output = record.output.detach()


@contextlib.contextmanager
def recorded_pass(model: nn.Module, inputs: Tensor, layers: Mapping[str, nn.Module]) -> Iterator[LayerPass]:
    """Run ``model(inputs)`` recording every module of ``layers``; yield a :class:`LayerPass`.

    Gradients are enabled inside the block whatever the caller's mode, and the model's
    buffers are restored on exit.
    """
    capture = ActivationCapture(layers)
    with preserved_buffers(model), torch.enable_grad():
        with capture.recording() as records:
            logits = model(inputs)
        yield LayerPass(logits, records, [name for name in layers if name in records])


def output_derivatives(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: LossFn,
    layers: Mapping[str, nn.Module] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(layer inputs, DS)`` of ``layers`` (default: :func:`~kfcrun.curvature.coverage.kfc_layers`).

    ``loss_fn(logits)`` must return ONE scalar, the per-example losses summed (e.g.
    :func:`~kfcrun.curvature.fisher.nll_sum` of sampled targets), so that ``DS`` holds
    per-example derivatives. Both dicts are keyed by layer name and hold detached tensors.
    Every layer must run once (a shared layer raises, naming it).
    """
    modules = kfc_layers(model) if layers is None else layers
    with recorded_pass(model, inputs, modules) as layer_pass:
        assert layer_pass.logits is not None
        loss = loss_fn(layer_pass.logits)
        if not isinstance(loss, Tensor):
            raise TypeError("output_derivatives needs loss_fn to return one scalar tensor")
        inputs_by_layer = {name: layer_pass.layer_input(name) for name in layer_pass.names}
        derivatives = {name: uses[0] for name, uses in layer_pass.derivatives(loss).items()}
        return inputs_by_layer, derivatives
