"""The curvature side of an optimizer step, shared by KFC-pre and :class:`~kfcrun.optim.KFCPreconditioner`.

* **micro-batches** (gradient accumulation): a step's inputs are one batch or a list of
  micro-batches whose gradients the user summed into ``.grad``. Statistics are estimated
  on every micro-batch and combined by an example-weighted mean, which equals the
  estimate on one batch made of all of them (:meth:`KFCCurvature.estimate_statistics`);
  ``stats_fraction`` takes the leading ``ceil(f m_k)`` examples of each micro-batch; ``nu``
  uses the leading ``ceil(f M)`` examples of the step, micro-batch by micro-batch, so a
  micro-batch is the most that is ever run at once.
* :class:`CurvatureRefresher`: Algorithm 1's statistics every ``T_s`` and inverses every
  ``T_f`` iterations (:class:`~kfcrun.curvature.CurvatureSchedule`), the initial estimate,
  and their timing and health counters.
* :func:`precondition_parameters`: the damped KFC solve of every block, from and to
  tensors shaped like the parameters.
* :func:`exact_gram` / :func:`exact_quadratic`: ``v_i^T F v_j`` / ``v^T F v`` with the exact
  Fisher (:mod:`kfcrun.optim.fisher_vector`) over the examples of a step's micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from kfcrun.curvature import CurvatureSchedule, Estimate, EstimateAccumulator, KFCCurvature, Likelihood
from kfcrun.optim.fisher_vector import fisher_gram
from kfcrun.optim.inputs import BatchRecorder
from kfcrun.optim.protocol import InitBatch
from kfcrun.optim.timing import PhaseTimer

__all__ = [
    "CurvatureRefresher",
    "exact_gram",
    "exact_quadratic",
    "leading_examples",
    "leading_fraction",
    "micro_batches",
    "precondition_parameters",
    "sharded_leading",
    "subset_size",
]

Batches = list[Tensor]
#: A damping value, several candidates, or a function returning them when a fit needs them.
Dampings = float | Sequence[float] | Callable[[], Sequence[float]]


def subset_size(fraction: float, batch_size: int) -> int:
    """``max(1, ceil(fraction * batch_size))``: the leading examples a fraction of a batch uses."""
    return max(1, math.ceil(fraction * batch_size - 1e-9))


def micro_batches(
    inputs: Tensor | Sequence[Tensor], targets: Tensor | Sequence[Tensor] | None
) -> tuple[Batches, Batches | None]:
    """``(inputs, targets)`` as lists of micro-batches (one entry for a plain batch)."""
    batches = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if not batches:
        raise ValueError("a step needs at least one batch of inputs")
    if targets is None:
        return batches, None
    labels = [targets] if isinstance(targets, Tensor) else list(targets)
    if len(labels) != len(batches):
        raise ValueError(f"{len(batches)} micro-batches of inputs but {len(labels)} of targets")
    return batches, labels


def leading_fraction(
    batches: Batches, targets: Batches | None, fraction: float
) -> tuple[Batches, Batches | None]:
    """The leading ``ceil(fraction * m_k)`` examples of each micro-batch."""
    sizes = [subset_size(fraction, x.shape[0]) for x in batches]
    inputs = [x[:n] for x, n in zip(batches, sizes, strict=True)]
    labels = None if targets is None else [y[:n] for y, n in zip(targets, sizes, strict=True)]
    return inputs, labels


def sharded_leading(
    curvature: KFCCurvature, batches: Batches, targets: Batches | None, fraction: float
) -> tuple[Batches, Batches | None, int | None]:
    """This rank's part of the leading ``ceil(f B)`` examples of the GLOBAL batch, and that global count.

    One process: :func:`leading_fraction` and ``None``. Data parallel (one batch per rank,
    equal shards dealt out interleaved, :class:`~kfcrun.curvature.sharding.BatchShard`):
    the subset is the same set of global examples whatever the number of ranks.
    """
    comm = curvature.comm
    if comm is None or comm.shard.single:
        inputs, labels = leading_fraction(batches, targets, fraction)
        return inputs, labels, None
    if len(batches) != 1:
        raise ValueError("data-parallel KFC takes one batch per rank and step, not micro-batches")
    shard = comm.shard
    total = subset_size(fraction, shard.global_batch(batches[0].shape[0]))
    if total < shard.world_size:
        raise ValueError(
            f"kfc: a subset of {total} examples cannot be spread over {shard.world_size} ranks; "
            "raise the fraction or the batch size"
        )
    local = shard.local_count(total)
    return [batches[0][:local]], None if targets is None else [targets[0][:local]], total


def leading_examples(batches: Batches, targets: Batches | None, count: int) -> tuple[Batches, Batches | None]:
    """The first ``count`` examples of the step, as chunks of (at most) the micro-batches."""
    inputs: Batches = []
    labels: Batches | None = None if targets is None else []
    left = count
    for i, x in enumerate(batches):
        if left <= 0:
            break
        take = min(left, x.shape[0])
        inputs.append(x[:take])
        if labels is not None and targets is not None:
            labels.append(targets[i][:take])
        left -= take
    return inputs, labels


class CurvatureRefresher:
    """Algorithm 1's updates of a :class:`~kfcrun.curvature.KFCCurvature`, on a step's micro-batches.

    Args:
        curvature: the blocks.
        schedule: ``T_s``, ``T_f`` and the warm-up.
        stats_fraction: fraction of each micro-batch the statistics use (App. A.3).
        generator: draws the sampled targets.
        timer: records the ``statistics`` and ``inverses`` phases.
        recorder: paused during the statistics passes.
        async_inverses: a scheduled inverse update starts a background fit
            (:meth:`KFCCurvature.start_inverses`) and installs the previous one, so the
            inverses in use are one ``T_f`` period staler than with the synchronous fit
            (bounded staleness; the initial fit and staleness-guard refreshes stay synchronous).

    Statistics from the training pass: :meth:`add_pass_estimates` hands over estimates made
    from the training forward (:meth:`KFCCurvature.estimate_from_pass`); the next due
    statistics update folds them in instead of running its own pass.

    Attributes:
        health: ``stats_nonfinite`` / ``inverse_nonfinite`` of the last updates (tensors).
        pi_mean: mean ``pi`` of the last inverse update (pi damping), or ``None``.
    """

    def __init__(
        self,
        curvature: KFCCurvature,
        schedule: CurvatureSchedule,
        *,
        stats_fraction: float,
        generator: torch.Generator,
        timer: PhaseTimer,
        recorder: BatchRecorder,
        async_inverses: bool = False,
    ) -> None:
        self.curvature, self.schedule = curvature, schedule
        self.stats_fraction = stats_fraction
        self.generator, self.timer, self.recorder = generator, timer, recorder
        self.async_inverses = async_inverses
        self.health: dict[str, Tensor] = {}
        self.pi_mean: Tensor | None = None
        self._pass = EstimateAccumulator()
        self._pass_examples = 0

    def add_pass_estimates(self, estimates: Mapping[str, Estimate], examples: int) -> None:
        """Estimates of ``examples`` examples from a training forward, for the next statistics update."""
        self._pass.add(estimates, examples)
        self._pass_examples += examples

    def discard_pass_estimates(self) -> None:
        """Drop estimates handed over by :meth:`add_pass_estimates` and not used."""
        self._pass = EstimateAccumulator()
        self._pass_examples = 0

    def _statistics(
        self, batches: Batches, targets: Batches | None, *, init: bool, global_examples: int | None = None
    ) -> None:
        """The training pass's estimates if there are any, else a statistics pass on ``batches``.

        Training-pass estimates are never handed over data parallel (see ``KFCOptimizerBase.backward``),
        so ``global_examples`` only concerns the separate pass.
        """
        if not self._pass:
            self.update_statistics(batches, targets, init=init, global_examples=global_examples)
            return
        with self.timer("statistics"):
            nonfinite = self.curvature.fold_statistics(
                self._pass.result(), init=init, examples=self._pass_examples
            )
        self.health["stats_nonfinite"] = nonfinite
        self.discard_pass_estimates()

    def _install_pending_inverses(self) -> None:
        """Install a finished background fit, if one is pending (waits for it)."""
        with self.timer("inverses"):
            update = self.curvature.finish_inverses()
        if update is not None:
            self.pi_mean = update.pi_mean()
            self.health["inverse_nonfinite"] = torch.tensor(float(update.nonfinite))

    @property
    def initialized(self) -> bool:
        """Whether the damped inverses exist."""
        return self.curvature.has_inverses

    def update_statistics(
        self, batches: Batches, targets: Batches | None, *, init: bool, global_examples: int | None = None
    ) -> None:
        """Estimate on all of ``batches`` (micro-batch by micro-batch) and fold in (Eqn 33, or init).

        Data parallel: ``batches`` are this rank's ``global_examples`` (default: equal shards).
        """
        with self.timer("statistics"), self.recorder.paused(), torch.enable_grad():
            update = self.curvature.update_statistics(
                batches, targets, generator=self.generator, init=init, global_examples=global_examples
            )
        self.health["stats_nonfinite"] = update.nonfinite

    def update_inverses(self, damping: float | Sequence[float], weight_decays: Mapping[str, float]) -> None:
        """Refit every block's damped inverse (one host sync)."""
        with self.timer("inverses"):
            update = self.curvature.update_inverses(damping, weight_decays)
        self.pi_mean = update.pi_mean()
        self.health["inverse_nonfinite"] = torch.tensor(float(update.nonfinite))

    def initialize(
        self,
        batches: Iterable[InitBatch],
        damping: float | Sequence[float],
        weight_decays: Mapping[str, float],
    ) -> None:
        """Algorithm 1's initial estimate: the mean of Eqn 32 over ``batches``, then the inverses.

        ``batches`` yields input tensors, or ``(inputs, labels)`` pairs (labels are used by
        the empirical Fisher and by likelihoods that mask positions). Every example is used.
        """
        count = 0
        for item in batches:
            inputs, labels = item if isinstance(item, (tuple, list)) else (item, None)
            self.update_statistics([inputs], None if labels is None else [labels], init=True)
            count += 1
        if count:
            self.update_inverses(damping, weight_decays)

    def refresh(
        self,
        k: int,
        batches: Batches,
        targets: Batches | None,
        damping: Dampings,
        weight_decays: Mapping[str, float],
        *,
        force: bool = False,
    ) -> bool:
        """Iteration ``k`` (from 1): statistics every ``T_s``, inverses every ``T_f``, on the stats subset.

        Before any inverse exists, the step initializes the factors from its own batch.
        ``force`` (the staleness guard) updates both now. ``damping`` may be a function
        returning the damping value(s) to fit, called only when the inverses are refitted.
        Returns whether they were.
        """
        inputs, labels, total = sharded_leading(self.curvature, batches, targets, self.stats_fraction)
        try:
            if not self.initialized:
                self._statistics(inputs, labels, init=True, global_examples=total)
                self.update_inverses(_resolve(damping), weight_decays)
                return True
            if force or self.schedule.statistics_due(k):
                self._statistics(inputs, labels, init=False, global_examples=total)
            if force or self.schedule.inverses_due(k):
                self._install_pending_inverses()
                if self.async_inverses and not force:
                    with self.timer("inverses"):
                        self.curvature.start_inverses(_resolve(damping), weight_decays)
                else:
                    self.update_inverses(_resolve(damping), weight_decays)
                return True
            return False
        finally:
            self.discard_pass_estimates()


def _resolve(damping: Dampings) -> float | Sequence[float]:
    return damping() if callable(damping) else damping


def precondition_parameters(
    curvature: KFCCurvature, grads: Mapping[Tensor, Tensor], index: int = 0
) -> dict[Tensor, Tensor]:
    """``{parameter: damped KFC natural gradient}`` for every parameter a block covers.

    ``grads`` maps parameters to gradient-shaped tensors (all of a block's parameters must
    be present). Each block combines its parameters' gradients into its layout, solves
    (:meth:`KFCCurvature.precondition`, damping candidate ``index``) and splits back.
    """
    combined: dict[str, Tensor] = {}
    for name, block in curvature.blocks.items():
        weight = grads[block.weight] if block.weight is not None else None
        bias = grads[block.bias] if block.bias is not None else None
        combined[name] = block.combine(weight, bias)
    solved = curvature.precondition(combined, index)
    out: dict[Tensor, Tensor] = {}
    for name, block in curvature.blocks.items():
        d_weight, d_bias = block.split(solved[name])
        if block.weight is not None and d_weight is not None:
            out[block.weight] = d_weight
        if block.bias is not None and d_bias is not None:
            out[block.bias] = d_bias
    return out


def exact_gram(
    model: nn.Module,
    likelihood: Likelihood,
    batches: Batches,
    targets: Batches | None,
    directions: Sequence[Mapping[str, Tensor]],
) -> Tensor:
    """``G_ij = v_i^T F v_j``, the exact Fisher averaged over the examples of ``batches``.

    ``F`` is the Fisher of the per-example NLL (summed over output positions) averaged
    over examples, the same object the curvature blocks approximate; each micro-batch's
    mean is weighted by its number of examples. One forward-mode pass per direction.
    """
    total: Tensor | None = None
    count = 0
    for i, x in enumerate(batches):
        labels = None if targets is None else targets[i]
        part = fisher_gram(model, x, directions, likelihood=likelihood, targets=labels) * x.shape[0]
        total = part if total is None else total + part
        count += x.shape[0]
    assert total is not None, "exact_gram needs at least one example"
    return total / count


def exact_quadratic(
    model: nn.Module,
    likelihood: Likelihood,
    batches: Batches,
    targets: Batches | None,
    tangents: Mapping[str, Tensor],
) -> Tensor:
    """``v^T F v``: :func:`exact_gram` of the one direction ``v``."""
    return exact_gram(model, likelihood, batches, targets, [tangents])[0, 0]
