"""Single-mini-batch estimates (Eqn 32 and its analogues) for every covered module.

:func:`batch_factors` is the contract used by the rest of kfcrun; it is
:func:`batch_factors_for_loss` with the per-example NLL of given targets.
:func:`batch_factors_for_loss` accepts any loss (or list of losses whose statistics
are summed), which is how sampled-target, expected and empirical Fisher estimates,
and the exactness tests' Gaussian likelihoods, share one code path. The pass itself
(hooks, buffers, ``.grad`` untouched) is :func:`~kfcrun.curvature.derivatives.recorded_pass`.

Estimates are per-example means, so the estimates of several micro-batches of one
step combine exactly into the estimate of their union by an example-weighted mean
(:class:`EstimateAccumulator`): ``Omega_hat`` sums rows and divides by ``M``, ``Gamma_hat``
divides by ``M|T|`` with the same ``|T|`` for every example, a normalization block's
Fisher divides by ``M``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .blocks import CurvatureBlock, Estimate, make_block
from .coverage import kfc_layers
from .derivatives import LayerPass, recorded_pass
from .fisher import LossFn, nll_sum
from .kron_math import accumulation_dtype

__all__ = [
    "EstimateAccumulator",
    "batch_factors",
    "batch_factors_for_loss",
    "block_estimates",
    "pass_estimates",
]


def _as_losses(value: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    losses = list(value)
    if not losses:
        raise ValueError("loss_fn returned no losses")
    return losses


def block_estimates(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: LossFn,
    blocks: Mapping[str, CurvatureBlock],
    *,
    chunk_size: int | None = None,
) -> dict[str, Estimate]:
    """``{name: estimate}`` for the blocks whose module ran in ``model(inputs)``.

    One recorded forward pass, then one ``torch.autograd.grad`` per loss returned by
    ``loss_fn(output)`` with respect to the layer outputs (each block's
    :meth:`~CurvatureBlock.pass_statistic` is summed over those passes), then each
    block's :meth:`~CurvatureBlock.batch_estimate` from its recorded inputs, after the
    graph is freed so that the chunked patch expansion does not coexist with it.
    Kronecker blocks give ``(Omega_hat, Gamma_hat)``. Modules that did not run are
    absent from the result; a module whose output does not reach the loss gets a
    zero output-side statistic.
    """
    modules = {name: block.module for name, block in blocks.items()}
    with recorded_pass(model, inputs, modules) as layer_pass:
        assert layer_pass.logits is not None
        return pass_estimates(layer_pass, loss_fn(layer_pass.logits), blocks, chunk_size=chunk_size)


def pass_estimates(
    layer_pass: LayerPass,
    losses: Tensor | Sequence[Tensor],
    blocks: Mapping[str, CurvatureBlock],
    *,
    chunk_size: int | None = None,
    keep_graph: bool = False,
    examples: int | None = None,
    loss_scale: Tensor | None = None,
) -> dict[str, Estimate]:
    """``{name: estimate}`` from a recorded forward pass and the loss(es) computed from its output.

    The derivatives ``DS`` of each loss with respect to the recorded layer outputs come
    from ``torch.autograd.grad`` (no ``.grad`` is touched). ``keep_graph=False`` frees the
    graph before the Omega pass (a forward made only for the statistics);
    ``keep_graph=True`` keeps it for the caller's own backward (statistics from the
    training pass). ``examples=n`` uses only the first ``n`` examples of every layer's
    input and ``DS`` (dim 0), the estimate of that subset when ``losses`` only involve it.
    ``loss_scale`` (a 0-d tensor ``s``, e.g. a ``GradScaler``'s scale under float16 autocast):
    each loss is differentiated as ``s * loss``, so that small half-precision derivatives do
    not underflow, and ``DS`` is divided by ``s`` in float32 before any statistic: the
    estimates are those of the unscaled loss (``Gamma`` would otherwise carry ``s^2``). A
    scale that overflowed gives non-finite estimates, which the fold skips.
    """
    loss_list = _as_losses(losses)
    names = layer_pass.names
    recorded = {name: _first(layer_pass.layer_inputs(name), examples) for name in names}
    # The caller may be inside autocast (statistics from a mixed-precision training pass):
    # the statistics' GEMMs run at the inputs' precision, at least float32, not in half.
    no_autocast = torch.autocast(loss_list[0].device.type, enabled=False)
    with no_autocast:
        contexts = {name: blocks[name].pass_context(recorded[name]) for name in names}
    totals: dict[str, Tensor] = {}
    for k, loss in enumerate(loss_list):
        retain = keep_graph or k < len(loss_list) - 1
        scaled = loss if loss_scale is None else loss * loss_scale
        derivatives = layer_pass.derivatives(scaled, retain_graph=retain)
        if loss_scale is not None:
            derivatives = {name: _unscaled(ds, loss_scale) for name, ds in derivatives.items()}
        with no_autocast:
            for name, ds in derivatives.items():
                part = blocks[name].pass_statistic(recorded[name], _first(ds, examples), contexts[name])
                totals[name] = part if name not in totals else totals[name].add_(part)
    del loss_list, contexts
    if not keep_graph:
        layer_pass.release_graph()
    with no_autocast:
        return {
            name: blocks[name].batch_estimate(recorded[name], totals[name], chunk_size=chunk_size)
            for name in names
        }


def _unscaled(derivatives: list[Tensor], loss_scale: Tensor) -> list[Tensor]:
    """``DS / s`` in at least float32 (dividing in float16 would underflow again)."""
    scaled = [(d, accumulation_dtype(d.dtype)) for d in derivatives]
    return [d.to(dtype) / loss_scale.to(dtype) for d, dtype in scaled]


def _first(tensors: list[Tensor], examples: int | None) -> list[Tensor]:
    """The first ``examples`` rows (dim 0) of each tensor; all of them for ``None``."""
    return tensors if examples is None else [t[:examples] for t in tensors]


class EstimateAccumulator:
    """Example-weighted mean of the estimates of several micro-batches (gradient accumulation).

    ``add(estimates, examples)`` once per micro-batch; :meth:`result` is then the
    estimate of the union of the micro-batches, exactly (every estimate is a mean over
    its examples, see the module docstring). A module missing from some micro-batches
    is averaged over the micro-batches it ran in.
    """

    def __init__(self) -> None:
        self._sums: dict[str, list[Tensor]] = {}
        self._counts: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._counts)

    @property
    def examples(self) -> int:
        """The largest number of examples any module has seen so far."""
        return max(self._counts.values(), default=0)

    def add(self, estimates: Mapping[str, Sequence[Tensor]], examples: int) -> None:
        """Add one micro-batch's estimates, computed on ``examples`` examples."""
        for name, estimate in estimates.items():
            weighted = [t * examples for t in estimate]
            if name in self._sums:
                for total, part in zip(self._sums[name], weighted, strict=True):
                    total.add_(part)
                self._counts[name] += examples
            else:
                self._sums[name] = weighted
                self._counts[name] = examples

    def result(self) -> dict[str, Estimate]:
        """The example-weighted mean per module."""
        return {name: tuple(t / self._counts[name] for t in sums) for name, sums in self._sums.items()}


def batch_factors_for_loss(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int | None = None,
) -> dict[str, Estimate]:
    """:func:`batch_factors` with an arbitrary loss.

    ``loss_fn(logits)`` returns the batch's per-example losses **summed** (a scalar),
    or a sequence of such scalars whose statistics are summed (e.g. one per column of
    a square root of the output Fisher, giving the exact expectation over targets; see
    :meth:`~kfcrun.curvature.likelihoods.Likelihood.expected_losses`).
    """
    blocks = {name: make_block(name, m) for name, m in kfc_layers(model).items()}
    return block_estimates(model, inputs, loss_fn, blocks, chunk_size=chunk_size)


def batch_factors(model: nn.Module, inputs: Tensor, targets: Tensor) -> dict[str, Estimate]:
    """Single-mini-batch KFC factors ``(Omega_hat, Gamma_hat)`` (Eqn 32) of every covered layer.

    Keyed by layer name (:func:`~kfcrun.curvature.coverage.kfc_layers`; Linear:
    ``(Psi_hat, Gamma_hat)``; a normalization layer: ``(F_hat,)``, its per-channel Fisher).
    ``DS`` are derivatives of ``sum_m -log softmax(model(inputs))_m[targets_m]``
    (per-example losses summed) w.r.t. each layer's output. Conv:
    ``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` over all ``M|T|`` output positions,
    ``Gamma_hat = 1/(M|T|) DS^T DS``; homogeneous coordinate at index 0 when the layer
    has a bias, other columns in ``weight.flatten(1)`` order. Factors have the
    inputs'/parameters' dtype (at least float32).

    The model is left unchanged (parameters, buffers, ``.grad``, hooks, train/eval mode).
    Layers that did not run in the forward pass are absent from the result.
    """
    return batch_factors_for_loss(model, inputs, lambda logits: nll_sum(logits, targets))
