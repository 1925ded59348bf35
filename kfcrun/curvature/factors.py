"""Single-mini-batch factor estimates (Eqn 32) for every Conv2d/Linear of a model.

:func:`batch_factors` is the contract used by the rest of kfcrun; it is
:func:`batch_factors_for_loss` with the per-example NLL of given targets.
:func:`batch_factors_for_loss` accepts any loss (or list of losses whose
``DS^T DS`` are summed), which is how sampled-target ("true"), expected and
empirical Fisher estimates, and the exactness tests' Gaussian likelihoods, share
one code path.

Side effects: none that outlive the call. Buffers (BatchNorm running statistics,
``num_batches_tracked``) are snapshot and restored, every ``.grad`` is left alone
(derivatives come from ``torch.autograd.grad``), hooks are removed, and the
train/eval mode is whatever the caller set. A train-mode forward does consume the
global RNG where the model draws from it (dropout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .blocks import KroneckerBlock, make_block, tracked_modules
from .capture import ActivationCapture
from .fisher import LossFn, nll_sum

__all__ = ["batch_factors", "batch_factors_for_loss", "compute_block_estimates", "preserved_buffers"]


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


def _as_losses(value: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    losses = list(value)
    if not losses:
        raise ValueError("loss_fn returned no losses")
    return losses


def compute_block_estimates(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: LossFn,
    blocks: Mapping[str, KroneckerBlock],
    *,
    chunk_size: int | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (Omega_hat, Gamma_hat)}`` for the blocks whose layer ran in ``model(inputs)``.

    One forward pass with the layers' inputs/outputs recorded, then one
    ``torch.autograd.grad`` per loss returned by ``loss_fn(logits)`` with respect to the
    recorded outputs (so ``Gamma_hat`` sums ``DS^T DS`` over those passes), then the
    ``Omega_hat`` of each layer from its recorded input (after the graph is freed, so
    the chunked patch expansion does not coexist with it). Layers that did not run
    are absent from the result; a layer whose output does not reach the loss gets
    ``Gamma_hat = 0``.
    """
    capture = ActivationCapture({name: block.module for name, block in blocks.items()})
    with preserved_buffers(model), torch.enable_grad():
        with capture.recording() as records:
            logits = model(inputs)
        losses = _as_losses(loss_fn(logits))
        names = [name for name in blocks if name in records]
        outputs = [records[name].output for name in names]
        gammas: dict[str, Tensor] = {}
        for k, loss in enumerate(losses):
            derivs = torch.autograd.grad(
                loss, outputs, retain_graph=k < len(losses) - 1, allow_unused=True, materialize_grads=True
            )
            for name, ds in zip(names, derivs, strict=True):
                part = blocks[name].batch_gamma([ds.detach()])
                gammas[name] = part if name not in gammas else gammas[name].add_(part)
        del logits, losses, outputs
        result: dict[str, tuple[Tensor, Tensor]] = {}
        for name in names:
            inp = records[name].checked_input(name)
            omega = blocks[name].batch_omega(inp, chunk_size=chunk_size)
            result[name] = (omega, gammas[name])
    return result


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
    blocks = {name: make_block(name, m) for name, m in tracked_modules(model).items()}
    return compute_block_estimates(model, inputs, loss_fn, blocks, chunk_size=chunk_size)


def batch_factors(model: nn.Module, inputs: Tensor, targets: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Single-mini-batch KFC factors ``(Omega_hat, Gamma_hat)`` (Eqn 32) of every Conv2d/Linear.

    Keyed by qualified name from ``model.named_modules()`` (Linear: ``(Psi_hat, Gamma_hat)``).
    ``DS`` are derivatives of ``sum_m -log softmax(model(inputs))_m[targets_m]`` (per-example
    losses summed) w.r.t. each layer's output. Conv: ``Omega_hat = (1/M) [[A]]_H^T [[A]]_H``
    over all ``M|T|`` output positions, ``Gamma_hat = 1/(M|T|) DS^T DS``; homogeneous coordinate
    at index 0 when the layer has a bias, other columns in ``weight.flatten(1)`` order.
    Factors have the inputs'/parameters' dtype (at least float32).

    The model is left unchanged (parameters, buffers, ``.grad``, hooks, train/eval mode).
    Layers that did not run in the forward pass are absent from the result.
    """
    return batch_factors_for_loss(model, inputs, lambda logits: nll_sum(logits, targets))
