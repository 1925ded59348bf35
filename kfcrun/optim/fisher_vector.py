"""Exact Fisher bilinear forms ``v_i^T F v_j`` of a network's likelihood, by forward-mode AD.

The Fisher (= generalized Gauss-Newton for these exponential families) of the
per-example negative log-likelihood averaged over inputs ``x_1..x_n`` is
``F = (1/n) sum_m J_m^T H_m J_m``, with ``J_m`` the Jacobian of example ``m``'s whole
output w.r.t. the parameters and ``H_m`` the output-space Fisher of its likelihood
(:mod:`kfcrun.curvature.likelihoods`), summed over the example's output positions - the
same object the KFC blocks approximate. With ``u_im = J_m v_i`` (one JVP through the
network per direction ``v_i``)::

    v_i^T F v_j = (1/n) sum_m u_im^T H_m u_jm

e.g. for softmax cross-entropy
``u^T H w = sum_t [ sum_k p_tk u_tk w_tk - (sum_k p_tk u_tk)(sum_k p_tk w_tk) ]``
(paper App. A.1 for ``nu``, App. A.2 for K-FAC's 2x2 model; Schraudolph 2002).

* :func:`fisher_gram` - the Gram matrix ``G_ij = v_i^T F v_j`` of several directions,
  one forward-mode pass per direction on the same inputs (batched over the directions
  with ``vmap``, which on the CPU is several times faster than a loop of JVPs);
* :func:`fisher_quadratic` - ``v^T F v``, its 1x1 case (KFC-pre's ``nu``);
* :func:`output_gram` - the likelihood's ``H_m`` applied to the JVPs in output space.

The forward passes run in the model's current mode (dropout masks and BatchNorm batch
statistics as in training). Every direction sees the SAME dropout masks (``vmap`` with
``randomness="same"``), so the ``J_m`` agree. BatchNorm running statistics are updated on
copies, so the model is unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from kfcrun.curvature import Likelihood, SoftmaxCrossEntropy, make_likelihood

__all__ = ["fisher_gram", "fisher_quadratic", "output_gram"]

_SOFTMAX = SoftmaxCrossEntropy()


def output_gram(
    likelihood: Likelihood, output: Tensor, jvps: Sequence[Tensor], labels: Tensor | None = None
) -> Tensor:
    """``G_ij = (1/n) sum_m u_im^T H_m u_jm`` for the network output and the JVPs ``u_i`` (output's shape).

    The output-space Fisher of ``likelihood`` (summed over output positions, masked by
    ``labels`` where the likelihood masks), applied to the directions' JVPs and averaged
    over the examples.
    """
    count = len(jvps)
    entries: dict[tuple[int, int], Tensor] = {}
    for i in range(count):
        for j in range(i, count):
            # i == j: the quadratic form, the same operations as v^T F v always used
            if i == j:
                entries[i, j] = likelihood.fisher_quadratic(output, jvps[i], labels).mean()
            else:
                entries[i, j] = likelihood.fisher_bilinear(output, jvps[i], jvps[j], labels).mean()
    dtype = entries[0, 0].dtype if entries else torch.float32
    gram = torch.empty(count, count, dtype=dtype, device=output.device)
    for (i, j), value in entries.items():
        gram[i, j] = gram[j, i] = value
    return gram


def fisher_gram(
    model: nn.Module,
    inputs: Tensor,
    directions: Sequence[Mapping[str, Tensor]],
    *,
    likelihood: Likelihood | str = _SOFTMAX,
    targets: Tensor | None = None,
) -> Tensor:
    """``G_ij = v_i^T F v_j`` (``R x R`` tensor) of the exact Fisher on ``inputs``, one JVP per direction.

    Several directions share one batched pass (``vmap`` over the tangents, the same dropout
    masks for all); a single direction takes a plain JVP (KFC-pre's ``nu``).

    Args:
        model: maps ``inputs`` to the output ``likelihood`` parameterises (logits by default).
        inputs: the examples the Fisher is estimated on.
        directions: the ``v_i``, each by parameter name (as in ``model.named_parameters()``);
            parameters not listed get a zero tangent.
        likelihood: the output distribution (name or object).
        targets: training labels, only for a likelihood that masks positions.
    """
    lik = make_likelihood(likelihood)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def output_of(parameters: dict[str, Tensor]) -> Tensor:
        # Fresh copies made inside the transform: BatchNorm may update them in place.
        scratch = {name: b.detach().clone() for name, b in buffers.items()}
        return functional_call(model, (parameters, scratch), (inputs,))

    tangents = [
        {name: direction[name] if name in direction else torch.zeros_like(p) for name, p in params.items()}
        for direction in directions
    ]
    if not tangents:
        return torch.zeros(0, 0, dtype=torch.float32, device=inputs.device)
    with warnings.catch_warnings():
        # torch.func scripts a helper of its own on first use; the deprecation is torch's, not ours
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        if len(tangents) == 1:
            # Without has_aux, jvp returns the pair (output, Jacobian-vector product).
            output, jv = cast("tuple[Tensor, Tensor]", jvp(output_of, (params,), (tangents[0],)))
            jvps = [jv]
        else:
            stacked = {name: torch.stack([t[name] for t in tangents]) for name in params}
            batched = vmap(lambda t: jvp(output_of, (params,), (t,)), randomness="same")(stacked)
            output, jvps = batched[0][0], list(batched[1].unbind(0))  # the outputs are the same for all
    return output_gram(lik, output, jvps, targets)


def fisher_quadratic(
    model: nn.Module,
    inputs: Tensor,
    tangents: Mapping[str, Tensor],
    *,
    likelihood: Likelihood | str = _SOFTMAX,
    targets: Tensor | None = None,
) -> Tensor:
    """``v^T F v`` (0-d tensor) for the parameter-space direction ``tangents`` on ``inputs``.

    :func:`fisher_gram` of one direction (see it for the arguments).
    """
    return fisher_gram(model, inputs, [tangents], likelihood=likelihood, targets=targets)[0, 0]
