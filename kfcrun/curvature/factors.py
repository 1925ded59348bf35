"""Single-mini-batch factor estimates (Eqn 32) for every layer KFC covers.

:func:`batch_factors` is the contract used by the rest of kfcrun; it is
:func:`batch_factors_for_loss` with the per-example NLL of given targets.
:func:`batch_factors_for_loss` accepts any loss (or list of losses whose
``DS^T DS`` are summed), which is how sampled-target, expected and empirical Fisher
estimates, and the exactness tests' Gaussian likelihoods, share one code path.
The pass itself (hooks, buffers, ``.grad`` untouched) is :func:`~kfcrun.curvature.derivatives.recorded_pass`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from .blocks import KroneckerBlock, make_block
from .coverage import kfc_layers
from .derivatives import recorded_pass
from .fisher import LossFn, nll_sum

__all__ = ["batch_factors", "batch_factors_for_loss", "block_estimates"]


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
    blocks: Mapping[str, KroneckerBlock],
    *,
    chunk_size: int | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (Omega_hat, Gamma_hat)}`` for the blocks whose layer ran in ``model(inputs)``.

    One recorded forward pass, then one ``torch.autograd.grad`` per loss returned by
    ``loss_fn(logits)`` with respect to the layer outputs (so ``Gamma_hat`` sums
    ``DS^T DS`` over those passes), then the ``Omega_hat`` of each layer from its
    recorded input, after the graph is freed so that the chunked patch expansion does
    not coexist with it. Layers that did not run are absent from the result; a layer
    whose output does not reach the loss gets ``Gamma_hat = 0``.
    """
    modules = {name: block.module for name, block in blocks.items()}
    with recorded_pass(model, inputs, modules) as layer_pass:
        assert layer_pass.logits is not None
        losses = _as_losses(loss_fn(layer_pass.logits))
        gammas: dict[str, Tensor] = {}
        for k, loss in enumerate(losses):
            derivatives = layer_pass.derivatives(loss, retain_graph=k < len(losses) - 1)
            for name, ds in derivatives.items():
                part = blocks[name].batch_gamma([ds])
                gammas[name] = part if name not in gammas else gammas[name].add_(part)
        del losses
        layer_pass.release_graph()
        return {
            name: (
                blocks[name].batch_omega(layer_pass.layer_input(name), chunk_size=chunk_size),
                gammas[name],
            )
            for name in layer_pass.names
        }


def batch_factors_for_loss(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """:func:`batch_factors` with an arbitrary loss.

    ``loss_fn(logits)`` returns the batch's per-example losses **summed** (a scalar),
    or a sequence of such scalars whose ``DS^T DS`` are summed into ``Gamma_hat``
    (e.g. one per column of a square root of the output Fisher, giving the exact
    expectation over targets; see :func:`~kfcrun.curvature.fisher.expected_fisher_losses`).
    """
    blocks = {name: make_block(name, m) for name, m in kfc_layers(model).items()}
    return block_estimates(model, inputs, loss_fn, blocks, chunk_size=chunk_size)


def batch_factors(model: nn.Module, inputs: Tensor, targets: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Single-mini-batch KFC factors ``(Omega_hat, Gamma_hat)`` (Eqn 32) of every covered layer.

    Keyed by layer name (:func:`~kfcrun.curvature.coverage.kfc_layers`; Linear:
    ``(Psi_hat, Gamma_hat)``). ``DS`` are derivatives of
    ``sum_m -log softmax(model(inputs))_m[targets_m]`` (per-example losses summed) w.r.t.
    each layer's output. Conv: ``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` over all ``M|T|``
    output positions, ``Gamma_hat = 1/(M|T|) DS^T DS``; homogeneous coordinate at index 0
    when the layer has a bias, other columns in ``weight.flatten(1)`` order. Factors have
    the inputs'/parameters' dtype (at least float32).

    The model is left unchanged (parameters, buffers, ``.grad``, hooks, train/eval mode).
    Layers that did not run in the forward pass are absent from the result.
    """
    return batch_factors_for_loss(model, inputs, lambda logits: nll_sum(logits, targets))
