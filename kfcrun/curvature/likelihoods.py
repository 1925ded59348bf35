"""Likelihoods: what the network's output parameterises, and the Fisher that follows from it.

The curvature of every block and the exact ``nu`` of the optimizers describe ONE object,
the Fisher of the per-example negative log-likelihood averaged over the ``M`` examples::

    F = (1/M) sum_n J_n^T H_n J_n,     H_n = E_{y ~ p(.|f_n)}[ g g^T ],  g = d(-log p(y|f_n)) / d f_n

where ``f_n`` is example ``n``'s whole output (every pixel, every token) and
``-log p(y|f_n)`` is SUMMED over its output positions (the paper's per-example loss;
Eqn 32's ``DS`` are its derivatives). A :class:`Likelihood` provides the three pieces
that need the output distribution:

* :meth:`~Likelihood.sample` - targets ``y ~ p(.|f)`` (the true Fisher, Sec. 3.1);
* :meth:`~Likelihood.nll_sum` - ``sum_n -log p(y_n|f_n)``, whose derivatives w.r.t. layer
  outputs are per-example ``DS``; :meth:`~Likelihood.expected_losses` - losses whose
  derivative covariances sum to ``H`` exactly (the ``"expected"`` Fisher type);
* :meth:`~Likelihood.fisher_bilinear` - ``u^T H_n w`` per example for output-space
  vectors (JVPs), summed over positions, so that ``v^T F v = mean_n`` of it.

The gradient an optimizer preconditions is the user's. It matches the curvature's scale
when the loss is the mean over examples of the per-example NLL (:meth:`Likelihood.loss`).
Common losses differ by constants (documented per class); e.g. PyTorch's
``F.cross_entropy`` on dense outputs averages over positions too, so its Gauss-Newton
matrix is ``F / |T|``. A constant factor is absorbed by the learning rate; the
clipping threshold ``C`` of ``nu`` refers to ``F`` as defined here.

Masked positions (``ignore_index``) contribute nothing: no loss, zero ``DS``, no term
in ``nu``; their mask comes from the training labels, so a likelihood with a mask needs
the labels (:attr:`Likelihood.needs_labels`) whatever the Fisher type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .sharding import ExampleDraws, as_draws

__all__ = [
    "LIKELIHOODS",
    "Bernoulli",
    "Gaussian",
    "Likelihood",
    "SoftmaxCrossEntropy",
    "inverse_cdf_sample",
    "make_likelihood",
]


def _float(t: Tensor) -> Tensor:
    """At least float32, so that probabilities and sums over many positions do not lose precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def inverse_cdf_sample(probs: Tensor, uniforms: Tensor) -> Tensor:
    """One draw per row of ``probs`` ``(rows, C)`` (nonnegative, any positive row sum): int64 ``(rows,)``.

    ``cdf = cumsum(probs)``; with ``uniforms`` ``u ~ U[0, 1)`` (``rows`` values, any shape) the
    draw is the first ``c`` with ``cdf_c > u cdf_C``, i.e. ``P(y = c) = p_c / sum(p)``. Clamped
    to ``C - 1`` against rounding at the top. Device-side only: no host synchronization. The
    uniforms are the caller's so that they can be indexed by global example
    (:class:`~kfcrun.curvature.sharding.ExampleDraws`).
    """
    cdf = probs.cumsum(dim=-1)
    scaled = (uniforms.reshape(-1, 1).to(cdf.dtype) * cdf[:, -1:]).contiguous()
    draws = torch.searchsorted(cdf, scaled, right=True).squeeze(1)
    return draws.clamp_(max=probs.shape[-1] - 1)


class Likelihood(ABC):
    """The output distribution ``p(y | f)`` of a network output ``f`` (see the module docstring)."""

    #: The name configs use.
    name: ClassVar[str]

    @property
    def needs_labels(self) -> bool:
        """Whether the training labels are needed for every Fisher type (to mask positions)."""
        return False

    @abstractmethod
    def sample(
        self,
        output: Tensor,
        generator: torch.Generator | ExampleDraws | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Targets drawn from ``p(. | output)`` without gradient (``labels`` only supply a mask).

        ``generator`` is a seeded generator, or :class:`~kfcrun.curvature.sharding.ExampleDraws`
        that draws for the whole global batch and keeps this rank's rows (data parallelism:
        the targets of an example do not depend on the number of ranks).
        """

    @abstractmethod
    def nll_sum(self, output: Tensor, targets: Tensor) -> Tensor:
        """``sum_n -log p(y_n | f_n)``: summed over examples and output positions (constants dropped)."""

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        """``(1/M) sum_n -log p(y_n | f_n)``: the training loss whose Fisher the curvature is."""
        return self.nll_sum(output, targets) / max(output.shape[0], 1)

    @abstractmethod
    def expected_losses(self, output: Tensor, labels: Tensor | None = None) -> list[Tensor]:
        """Losses whose derivatives' outer products sum to every example's output Fisher ``H_n``.

        Each loss is linear in ``output`` with a detached cotangent: a column of a square
        root of ``H``, at ONE output position (all examples in the same pass, which never
        mix). Summing any block's statistics over the passes therefore gives the exact
        expectation over targets. It costs one backward pass per column and position
        (``C |T|``), so it is meant for tests and small outputs.
        """

    @abstractmethod
    def fisher_bilinear(self, output: Tensor, u: Tensor, w: Tensor, labels: Tensor | None = None) -> Tensor:
        """``u_n^T H_n w_n`` per example (shape ``(M,)``), summed over output positions.

        ``u`` and ``w`` have ``output``'s shape (e.g. JVPs of the network). The Fisher
        quadratic form of a parameter direction ``v`` is ``mean_n`` of this with ``u = w = J v``.
        """

    def fisher_quadratic(self, output: Tensor, u: Tensor, labels: Tensor | None = None) -> Tensor:
        """``u_n^T H_n u_n`` per example (shape ``(M,)``)."""
        return self.fisher_bilinear(output, u, u, labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SoftmaxCrossEntropy(Likelihood):
    """Categorical ``y ~ softmax(f)`` at every output position: softmax cross-entropy.

    Output shapes: ``(M, C)`` (classification), ``(M, C, d1, ...)`` (per pixel, PyTorch's
    layout, ``class_dim=1``) or ``(M, T..., C)`` (per token, ``class_dim=-1``). Targets have
    the output's shape without the class dim. Output Fisher per position:
    ``H_t = diag(p_t) - p_t p_t^T``.

    ``ignore_index``: positions whose training label equals it are masked (no sample, no
    loss, no Fisher term); ``None`` masks nothing. ``nll_sum`` equals
    ``F.cross_entropy(..., reduction="sum", ignore_index=...)``, so the mean-reduced
    ``F.cross_entropy`` is ``nll_sum / (number of unmasked positions)``: for dense outputs
    its Gauss-Newton matrix is ``F * M / (unmasked positions)`` (``F / |T|`` without a mask).
    """

    name = "cross_entropy"

    def __init__(self, class_dim: int = 1, ignore_index: int | None = None) -> None:
        if class_dim not in (1, -1):
            raise ValueError(f"class_dim must be 1 or -1, got {class_dim}")
        self.class_dim = class_dim
        self.ignore_index = ignore_index

    def __repr__(self) -> str:
        return f"SoftmaxCrossEntropy(class_dim={self.class_dim}, ignore_index={self.ignore_index})"

    @property
    def needs_labels(self) -> bool:
        """With an ``ignore_index``: the labels mark the masked positions."""
        return self.ignore_index is not None

    def _rows(self, t: Tensor) -> Tensor:
        """``t`` as rows of ``C`` (one per example and position), class dim last."""
        if t.dim() < 2:
            raise ValueError(f"logits must have a batch and a class dim, got shape {tuple(t.shape)}")
        moved = t.movedim(self.class_dim, -1) if self.class_dim == 1 else t
        return moved.reshape(-1, moved.shape[-1])

    def _target_shape(self, output: Tensor) -> tuple[int, ...]:
        shape = list(output.shape)
        del shape[self.class_dim]
        return tuple(shape)

    def _mask(self, output: Tensor, labels: Tensor | None) -> Tensor | None:
        """``(rows,)`` bool: position not ignored; ``None`` when nothing is masked."""
        if self.ignore_index is None:
            return None
        if labels is None:
            raise ValueError(
                f"cross_entropy with ignore_index={self.ignore_index} needs the training labels for its mask"
            )
        return (labels != self.ignore_index).reshape(-1)

    def sample(
        self,
        output: Tensor,
        generator: torch.Generator | ExampleDraws | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """``y ~ Categorical(softmax(output))`` per position (int64), ``ignore_index`` where masked.

        Inverse-CDF sampling: one uniform ``u`` per row and ``y = #{c : cdf_c <= u cdf_C}``
        (``searchsorted``), so ``P(y = c) = p_c``. Unlike ``torch.multinomial`` this never
        reads a value back to the host, so a CUDA step does not wait on it (tested under
        ``torch.cuda.set_sync_debug_mode("error")``).
        """
        probs = torch.softmax(_float(self._rows(output.detach())), dim=-1)
        # one uniform per position, indexed by global example (world-size independent)
        uniforms = as_draws(generator).uniform(self._target_shape(output), probs.dtype, probs.device)
        draws = inverse_cdf_sample(probs, uniforms)
        mask = self._mask(output, labels)
        if mask is not None:
            draws = torch.where(mask, draws, torch.full_like(draws, self.ignore_index))  # type: ignore[arg-type]
        return draws.reshape(self._target_shape(output))

    def nll_sum(self, output: Tensor, targets: Tensor) -> Tensor:
        """``F.cross_entropy(..., reduction="sum")`` (masked positions excluded)."""
        logits = output.movedim(-1, 1) if self.class_dim == -1 and output.dim() > 2 else output
        ignore = self.ignore_index if self.ignore_index is not None else -100
        return F.cross_entropy(logits, targets, reduction="sum", ignore_index=ignore)

    def expected_losses(self, output: Tensor, labels: Tensor | None = None) -> list[Tensor]:
        """Per class ``c`` and position ``t``: the loss ``sum_n <f_nt, B_nt[:, c]>``.

        ``B = diag(sqrt p) - p sqrt(p)^T``, detached.

        The derivative w.r.t. ``f_nt`` is ``sqrt(p_c) (e_c - p)``, i.e. ``sqrt(p_c)`` times
        minus the NLL gradient for target ``c``; ``B B^T = diag(p) - p p^T``.
        """
        m = output.shape[0]
        rows = self._rows(output)
        probs = torch.softmax(rows.detach(), dim=-1)
        root = probs.sqrt()
        mask = self._mask(output, labels)
        keep = None if mask is None else mask.to(rows.dtype).unsqueeze(1)
        rows3 = rows.reshape(m, -1, rows.shape[-1])  # (M, positions, C)
        losses = []
        for c in range(rows.shape[1]):
            cot = -probs * root[:, c : c + 1]
            cot[:, c] += root[:, c]
            if keep is not None:
                cot = cot * keep
            cot3 = cot.reshape(rows3.shape)
            losses += [(rows3[:, t] * cot3[:, t]).sum() for t in range(rows3.shape[1])]
        return losses

    def fisher_bilinear(self, output: Tensor, u: Tensor, w: Tensor, labels: Tensor | None = None) -> Tensor:
        """``sum_t [ sum_k p_k u_k w_k - (sum_k p_k u_k)(sum_k p_k w_k) ]`` per example."""
        m = output.shape[0]
        p = torch.softmax(_float(self._rows(output)), dim=-1)
        ur, wr = _float(self._rows(u)), _float(self._rows(w))
        per_row = (p * ur * wr).sum(-1) - (p * ur).sum(-1) * (p * wr).sum(-1)
        mask = self._mask(output, labels)
        if mask is not None:
            per_row = per_row * mask.to(per_row.dtype)
        return per_row.reshape(m, -1).sum(dim=1)


class Gaussian(Likelihood):
    """``y ~ N(f, I)`` on every output entry (variance 1): per-example NLL ``1/2 ||f - y||^2`` (+ const).

    Output Fisher ``H = I``. Relation to ``nn.MSELoss``: for outputs with ``C`` entries
    per example (all positions and features), ``MSELoss(reduction="mean") =
    (1/(M C)) sum ||f - y||^2 = (2/C) * (1/M) sum_n 1/2 ||f_n - y_n||^2``, so its
    Gauss-Newton matrix is ``(2/C) F``; ``reduction="sum"`` gives ``2 M F``.
    """

    name = "gaussian"

    def sample(
        self,
        output: Tensor,
        generator: torch.Generator | ExampleDraws | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """``y = f + eps``, ``eps ~ N(0, I)``."""
        f = output.detach()
        noise = as_draws(generator).normal(tuple(f.shape), f.dtype, f.device)
        return f + noise

    def nll_sum(self, output: Tensor, targets: Tensor) -> Tensor:
        """``sum 1/2 (f - y)^2`` over all entries (the constant ``log(2 pi)/2`` dropped)."""
        return 0.5 * (output - targets).square().sum()

    def expected_losses(self, output: Tensor, labels: Tensor | None = None) -> list[Tensor]:
        """One pass per entry ``j`` of an example's output: the loss ``sum_n f_n[j]`` (cotangent ``e_j``)."""
        flat = output.reshape(output.shape[0], -1)
        return [flat[:, j].sum() for j in range(flat.shape[1])]

    def fisher_bilinear(self, output: Tensor, u: Tensor, w: Tensor, labels: Tensor | None = None) -> Tensor:
        """``sum_t u_t^T w_t`` per example."""
        return (_float(u) * _float(w)).reshape(u.shape[0], -1).sum(dim=1)


class Bernoulli(Likelihood):
    """``y ~ Bernoulli(sigmoid(f))`` on every output entry: binary cross-entropy with logits.

    Output Fisher ``H = diag(p (1 - p))``, ``p = sigmoid(f)``. ``nll_sum`` equals
    ``F.binary_cross_entropy_with_logits(f, y, reduction="sum")``; the mean-reduced loss
    divides by all ``M C`` entries, so its Gauss-Newton matrix is ``F / C``.
    """

    name = "bernoulli"

    def sample(
        self,
        output: Tensor,
        generator: torch.Generator | ExampleDraws | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """``y ~ Bernoulli(sigmoid(f))`` as floats in ``{0, 1}``."""
        p = torch.sigmoid(_float(output.detach()))
        uniforms = as_draws(generator).uniform(tuple(p.shape), p.dtype, p.device)
        return (uniforms < p).to(output.dtype)

    def nll_sum(self, output: Tensor, targets: Tensor) -> Tensor:
        """``F.binary_cross_entropy_with_logits(f, y, reduction="sum")``."""
        return F.binary_cross_entropy_with_logits(output, targets.to(output.dtype), reduction="sum")

    def expected_losses(self, output: Tensor, labels: Tensor | None = None) -> list[Tensor]:
        """One pass per entry ``j`` of an example's output: cotangent ``sqrt(p_j (1 - p_j)) e_j``."""
        p = torch.sigmoid(output.detach())
        root = (p * (1 - p)).sqrt().reshape(output.shape[0], -1)
        flat = output.reshape(output.shape[0], -1)
        return [(flat[:, j] * root[:, j]).sum() for j in range(flat.shape[1])]

    def fisher_bilinear(self, output: Tensor, u: Tensor, w: Tensor, labels: Tensor | None = None) -> Tensor:
        """``sum_t sum_k p_k (1 - p_k) u_k w_k`` per example."""
        p = torch.sigmoid(_float(output))
        return (p * (1 - p) * _float(u) * _float(w)).reshape(u.shape[0], -1).sum(dim=1)


#: Likelihood class by config name.
LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (SoftmaxCrossEntropy, Gaussian, Bernoulli)
}


def make_likelihood(spec: str | Likelihood) -> Likelihood:
    """A :class:`Likelihood` from its config name (default options), or ``spec`` itself."""
    if isinstance(spec, Likelihood):
        return spec
    if spec not in LIKELIHOODS:
        allowed = ", ".join(repr(n) for n in LIKELIHOODS)
        raise ValueError(f"likelihood must be one of {allowed} or a Likelihood, got {spec!r}")
    return LIKELIHOODS[spec]()
