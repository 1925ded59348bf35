"""KFCCurvature: the manager of a model's Kronecker blocks (Eqns 28-33, 39-44).

Knows nothing about learning rates or momentum. The blocks own their math
(:mod:`kfcrun.curvature.blocks`, :mod:`kfcrun.curvature.inverses`); the manager keeps
the loop over blocks, the statistics bookkeeping, and the ONE batched host sync per
inverse update. An optimizer calls, per Algorithm 1 (Appendix A.1):

1. ``update_statistics(x, init=True)`` on a large subset before training (may be
   called repeatedly: the initialisation batches are averaged with equal weight);
2. ``update_statistics(x)`` every ``T_s`` iterations (EMA, Eqn 33);
3. ``update_inverses(gamma, lam)`` every ``T_f`` iterations;
4. ``precondition({name: G})`` every iteration, with ``G`` the gradient in the block's
   layout (``[grad_b | grad_W.flatten(1)]`` for a Kronecker block; build it with
   ``blocks[name].combine(...)`` or ``blocks[name].combined_grad()``, take it apart with
   ``blocks[name].split(...)``).

``update_statistics`` is :meth:`~KFCCurvature.estimate_statistics` followed by
:meth:`~KFCCurvature.fold_statistics`; a data-parallel wrapper reduces the estimates
across ranks between the two. Gradient accumulation: pass the micro-batches of one
step as a list; their estimates are combined by an example-weighted mean
(:class:`~kfcrun.curvature.factors.EstimateAccumulator`), which equals the estimate of
one batch made of all of them, and folded in once.

Blocks are heterogeneous (:mod:`kfcrun.curvature.blocks`: Kronecker blocks for
convolutions, Linear and Embedding layers; per-channel blocks for normalization
layers); the manager only uses their common interface. Modules with trainable
parameters that no block covers are named in ONE warning at construction; their
parameters take the optimizer's plain step.

Damping (``lam`` = weight decay of the layer, ``gamma`` = damping), by
:class:`~kfcrun.curvature.vocabulary.DampingMode`:

* ``"pi"`` (Eqn 28): ``(Omega + pi sqrt(λ + γ) I) ⊗ (Gamma + sqrt(λ + γ)/pi I)``,
  ``pi`` the trace-norm ratio (Eqn 10); result ``Gamma_d^{-1} G Omega_d^{-1}`` (Eqn 29).
* ``"exact"`` (Eqns 39-44): ``(Omega ⊗ Gamma + (λ + γ) I)^{-1} vec(G)`` through
  the eigendecompositions of both factors (needs ``λ + γ > 0``).

Several damping values may be fitted at once (``update_inverses([g0, g1, g2], lam)``)
and solved with ``precondition(grads, index=i)``; :meth:`KFCCurvature.select_damping`
then keeps candidate ``i`` as the fit used from now on (K-FAC's gamma adaptation).

Statistics warm-up (``ema_warmup=True``, Martens & Grosse 2015, Sec. 5; their code
``fade = min(1 - 1/k, 0.95)``): the ``k``-th statistics update uses
``xi_k = min(1 - 1/k, xi)`` instead of ``xi``, so that the first estimates are averaged
with equal weight instead of the first one keeping weight ``xi^k``. An initial estimate
(``init=True``) over ``N`` examples counts as ``ceil(N / M)`` updates, ``M`` the
examples of the first Eqn 33 update after it: it is worth that many mini-batches, and
the warm-up does not throw it away.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import DEFAULT_MAX_FACTOR_DIM, ConvBlock, CurvatureBlock, Estimate, make_block
from .capture import ActivationCapture
from .coverage import canonical_name, eager_module, kfc_layers, uncovered_modules, unmatched_patterns
from .derivatives import LayerPass
from .diagnostics import KFCCurvatureWarning, warn
from .factors import EstimateAccumulator, block_estimates, pass_estimates
from .fisher import make_loss_fn
from .likelihoods import Likelihood, make_likelihood
from .parallel import CurvatureComm
from .sharding import ExampleDraws
from .vocabulary import DampingMode, FisherType, OmegaModel

__all__ = ["InverseUpdate", "KFCCurvature", "KFCCurvatureWarning", "MicroBatches", "StatisticsUpdate"]

#: One mini-batch, or the micro-batches of one step (gradient accumulation).
MicroBatches = Tensor | Sequence[Tensor]

_STATE_FORMAT = 1


@dataclass
class StatisticsUpdate:
    """What one :meth:`KFCCurvature.update_statistics` call did.

    ``nonfinite`` is a 0-d tensor (no sync): layers whose estimate was non-finite and skipped.
    """

    examples: int
    nonfinite: Tensor
    seconds: float


@dataclass
class InverseUpdate:
    """What one :meth:`KFCCurvature.update_inverses` call did.

    Attributes:
        summaries: per layer, the strategy's 0-d tensors (``pi``, or the factors' largest
            eigenvalues ``eig_max_omega``/``eig_max_gamma``).
        nonfinite: layers whose factors were non-finite (their previous inverse was kept).
        seconds: wall time of the call (no device sync beyond the flags read).
    """

    summaries: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    nonfinite: int = 0
    seconds: float = 0.0

    def pi_mean(self) -> Tensor | None:
        """Mean ``pi`` over the layers (pi damping), or ``None``."""
        pis = [s["pi"] for s in self.summaries.values() if "pi" in s]
        return torch.stack(pis).mean() if pis else None


class KFCCurvature:
    """Kronecker-factored curvature (KFC) of every layer :func:`~kfcrun.curvature.coverage.kfc_layers` covers.

    Args:
        model: maps inputs to the output the likelihood is about (e.g. logits, class dim 1).
        stat_decay: ``xi`` of the running averages (Eqn 33), in ``[0, 1)``.
        damping_mode: ``"pi"`` (Eqn 28, factored) or ``"exact"`` (Eqns 39-44).
        fisher_type: ``"sampled"`` (targets sampled from the model, the paper's choice),
            ``"expected"`` (exact expectation over targets; ``C`` backward passes) or
            ``"empirical"`` (training labels; needs ``targets``).
        chunk_size: examples per chunk of the conv patch expansion (memory bound);
            ``None`` picks it from :data:`kron_math.DEFAULT_PATCH_BUDGET_BYTES`.
        inverse_dtype: dtype the damped inverses / eigendecompositions are computed in
            (``None``: the factors' dtype). Results are stored in the factors' dtype.
        omega_model: ``"kfc"`` or ``"sua"``: the conv Omega model (see
            :class:`~kfcrun.curvature.blocks.ConvBlock`).
        ema_warmup: use ``xi_k = min(1 - 1/k, xi)`` for the ``k``-th statistics update
            (see the module docstring); ``False`` is Eqn 33 with a constant ``xi``.
        likelihood: the output distribution (:mod:`kfcrun.curvature.likelihoods`): a name
            (``"cross_entropy"``, ``"gaussian"``, ``"bernoulli"``) or a
            :class:`~kfcrun.curvature.likelihoods.Likelihood`.
        skip_layers: names or patterns of modules to leave out (plain step), see
            :func:`~kfcrun.curvature.coverage.layer_matches`.
        max_factor_dim: a Kronecker factor larger than this is kept as its diagonal
            (:class:`~kfcrun.curvature.blocks.KroneckerBlock`); ``None``: no cap.
        omega_method: how a conv layer computes ``Omega_hat`` (the same matrix either way):
            ``"auto"`` (row-lagged products for stride-1 one-group convs, the patch GEMM
            otherwise), ``"patch"`` or ``"lagged"`` (see
            :class:`~kfcrun.curvature.blocks.ConvBlock`); a mapping ``{layer name: method}``
            chooses per layer (unlisted layers: ``"auto"``).

    Attributes:
        blocks: ``name -> block`` for every covered module, in ``named_modules`` order.
        uncovered: ``{module name: [parameter names]}`` of trainable parameters no block
            covers (skipped layers excluded); they take the optimizer's plain step.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        stat_decay: float = 0.95,
        damping_mode: DampingMode | str = DampingMode.PI,
        fisher_type: FisherType | str = FisherType.SAMPLED,
        chunk_size: int | None = None,
        inverse_dtype: torch.dtype | None = torch.float64,
        omega_model: OmegaModel | str = OmegaModel.KFC,
        ema_warmup: bool = False,
        likelihood: Likelihood | str = "cross_entropy",
        skip_layers: Sequence[str] = (),
        max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
        omega_method: str | Mapping[str, str] = "auto",
    ) -> None:
        if not 0.0 <= stat_decay < 1.0:
            raise ValueError(f"stat_decay must be in [0, 1), got {stat_decay}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.model = eager_module(model)  # hooks fire in the statistics pass even if compiled
        self.stat_decay = stat_decay
        self.ema_warmup = ema_warmup
        self.damping_mode = DampingMode.parse(damping_mode, "damping_mode")
        self.fisher_type = FisherType.parse(fisher_type, "fisher_type")
        self.chunk_size = chunk_size
        self.inverse_dtype = inverse_dtype
        if max_factor_dim is not None and max_factor_dim < 1:
            raise ValueError(f"max_factor_dim must be >= 1 or None, got {max_factor_dim}")
        skip = [skip_layers] if isinstance(skip_layers, str) else list(skip_layers)
        unknown = unmatched_patterns(model, skip)
        if unknown:
            raise ValueError(f"kfc: skip_layers entries {unknown} name no module of the model")
        self.likelihood: Likelihood = make_likelihood(likelihood)
        layers = kfc_layers(model, skip)
        methods = _omega_methods(omega_method, layers)
        self.blocks: dict[str, CurvatureBlock] = {
            name: make_block(
                name,
                m,
                damping_mode=self.damping_mode,
                omega_model=omega_model,
                max_factor_dim=max_factor_dim,
                omega_method=methods.get(name, "auto"),
            )
            for name, m in layers.items()
        }
        for block in self.blocks.values():
            if isinstance(block, ConvBlock):
                block.uses_lagged_omega()  # a bad or inapplicable omega_method fails here, not mid-run
        self.uncovered = uncovered_modules(model, skip)
        if self.uncovered:
            types = {canonical_name(n): type(m).__name__ for n, m in model.named_modules()}
            listed = ", ".join(
                f"{name or '<root>'} ({types.get(name, '?')}: {', '.join(params)})"
                for name, params in self.uncovered.items()
            )
            warn(
                f"kfc: {len(self.uncovered)} module(s) have trainable parameters without a curvature block; "
                f"they take the plain (unpreconditioned) step: {listed}"
            )
        self.num_init_batches = 0  # initialisation batches averaged into the factors
        self.num_ema_updates = 0  # Eqn 33 updates since the initialisation
        self.num_inverse_updates = 0
        self.init_examples = 0  # examples in the running initial estimate, until the first Eqn 33 update
        self.statistics_count = 0  # k: statistics updates the running factors stand for (the warm-up's count)
        self.last_decay = stat_decay  # the xi of the last Eqn 33 update (xi_k with the warm-up)
        self._warned_unused: set[str] = set()
        # start_inverses(): (future, {name: (inverse copy, factors)}, CUDA side stream or None)
        self._inverse_job: tuple[Future[InverseUpdate], dict[str, tuple[Any, Estimate]], Any] | None = None
        self._executor: ThreadPoolExecutor | None = None
        #: Data-parallel communicator (:mod:`kfcrun.curvature.parallel`); ``None``: one process.
        self.comm: CurvatureComm | None = None

    @property
    def has_statistics(self) -> bool:
        """Whether any statistics have been folded into the factors."""
        return self.num_init_batches > 0 or self.num_ema_updates > 0

    @property
    def has_inverses(self) -> bool:
        """Whether the damped inverses have been computed at least once."""
        return self.num_inverse_updates > 0

    def coverage(self) -> dict[str, str]:
        """``{module name: block kind}`` of the covered modules, e.g. ``{"conv1": "conv2d"}``."""
        return {name: block.kind for name, block in self.blocks.items()}

    # -- statistics ---------------------------------------------------------------------------
    def estimate_statistics(
        self,
        inputs: MicroBatches,
        targets: MicroBatches | None = None,
        *,
        generator: torch.Generator | None = None,
        global_examples: int | None = None,
    ) -> dict[str, Estimate]:
        """``{name: estimate}`` (Eqn 32; ``(Omega_hat, Gamma_hat)`` for Kronecker blocks), not folded in.

        ``inputs`` is one mini-batch or a list of micro-batches (and ``targets`` likewise):
        micro-batches are run one at a time and their estimates combined by an
        example-weighted mean, which is the estimate of their union.
        Targets: sampled from the model with ``generator`` (``"sampled"``), the expectation
        (``"expected"``) or ``targets`` (``"empirical"``, required then; also required by a
        likelihood that masks positions).

        Data parallel (:attr:`comm` set): ``inputs`` are this rank's examples of a global
        subset of ``global_examples`` (default: equal shards, ``P`` times the local count),
        dealt out interleaved (:class:`~kfcrun.curvature.sharding.BatchShard`); sampled
        targets are drawn by global example index, so they do not depend on ``P``.
        """
        batches = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        if self.comm is not None and not self.comm.shard.single:
            if len(batches) != 1:
                raise ValueError("kfc: data-parallel statistics take one batch per rank, not micro-batches")
            local = batches[0].shape[0]
            total = self.comm.shard.global_batch(local) if global_examples is None else global_examples
            draws = ExampleDraws(generator, self.comm.shard, total)
            label = None if targets is None else (targets if isinstance(targets, Tensor) else targets[0])
            return self._estimate_one(batches[0], label, draws)
        labels: list[Tensor | None]
        if targets is None:
            labels = [None] * len(batches)
        else:
            labels = [targets] if isinstance(targets, Tensor) else list(targets)
        if len(labels) != len(batches):
            raise ValueError(f"kfc: {len(batches)} micro-batches of inputs but {len(labels)} of targets")
        if len(batches) == 1:
            return self._estimate_one(batches[0], labels[0], generator)
        accumulator = EstimateAccumulator()
        for batch, label in zip(batches, labels, strict=True):
            accumulator.add(self._estimate_one(batch, label, generator), batch.shape[0])
        return accumulator.result()

    def _estimate_one(
        self, inputs: Tensor, targets: Tensor | None, generator: torch.Generator | ExampleDraws | None
    ) -> dict[str, Estimate]:
        loss_fn = make_loss_fn(
            self.fisher_type, targets=targets, generator=generator, likelihood=self.likelihood
        )
        return block_estimates(self.model, inputs, loss_fn, self.blocks, chunk_size=self.chunk_size)

    @contextlib.contextmanager
    def recording(self) -> Iterator[LayerPass]:
        """Record the covered layers' inputs and outputs during the caller's own forward pass.

        For statistics from the training pass (issue 13)::

            with curvature.recording() as layer_pass:
                logits = model(x)
            estimates = curvature.estimate_from_pass(layer_pass, logits)  # before the training backward
            F.cross_entropy(logits, y).backward()

        Unlike :meth:`estimate_statistics` this adds no forward pass: the activations are
        the training forward's, with whatever it changed (BatchNorm running statistics,
        dropout masks) changed once, as training does. The hooks exist only inside the
        block; each covered layer's output is passed on as a copy (as in every recorded pass).
        """
        capture = ActivationCapture({name: block.module for name, block in self.blocks.items()})
        with capture.recording() as records:
            layer_pass = LayerPass(None, records)
            yield layer_pass
        layer_pass.names = [name for name in self.blocks if name in records]

    def estimate_from_pass(
        self,
        layer_pass: LayerPass,
        output: Tensor,
        targets: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        examples: int | None = None,
        loss_scale: Tensor | None = None,
    ) -> dict[str, Estimate]:
        """Estimates (Eqn 32) from a forward recorded by :meth:`recording`, keeping its graph.

        ``output`` is that forward's model output. Targets as in :meth:`estimate_statistics`;
        the derivatives ``DS`` come from ONE extra backward of the sampled loss through
        the same graph (``retain_graph=True``, so the caller's training backward still
        works afterwards; no ``.grad`` is touched). ``examples=n`` estimates from the first
        ``n`` examples only (their loss alone is differentiated, and the Omega pass sees
        only their inputs): the same estimate as a separate pass on ``x[:n]`` for a network
        whose examples do not interact (no BatchNorm in train mode). ``loss_scale``: the
        sampled loss is differentiated scaled and ``DS`` unscaled (float16 autocast with a
        ``GradScaler``; see :func:`~kfcrun.curvature.factors.pass_estimates`).
        """
        if examples is not None and examples < 1:
            raise ValueError(f"examples must be >= 1 or None, got {examples}")
        if not layer_pass.names:
            raise RuntimeError("kfc: estimate_from_pass() needs a forward pass run inside recording()")
        sub_output = output if examples is None else output[:examples]
        sub_targets = targets if targets is None or examples is None else targets[:examples]
        loss_fn = make_loss_fn(
            self.fisher_type, targets=sub_targets, generator=generator, likelihood=self.likelihood
        )
        return pass_estimates(
            layer_pass,
            loss_fn(sub_output),
            self.blocks,
            chunk_size=self.chunk_size,
            keep_graph=True,
            examples=examples,
            loss_scale=loss_scale,
        )

    def fold_statistics(
        self,
        estimates: Mapping[str, Sequence[Tensor]],
        *,
        init: bool = False,
        examples: int | None = None,
    ) -> Tensor:
        """Fold batch estimates into the running factors; returns the non-finite count (0-d tensor).

        ``init=True`` (Algorithm 1's initialisation): consecutive ``init=True`` calls average
        their estimates with equal weight per call; the first of a run of them overwrites
        the factors. ``init=False``: ``Omega <- xi Omega + (1-xi) Omega_hat`` (Eqn 33), with
        ``xi_k`` under the warm-up; the very first update of a layer, init or not, sets its
        factors directly. ``examples``: how many examples the estimates are over (the
        warm-up's count of the initial estimate; without it each initialisation batch
        counts as one update).
        """
        if init and self.num_init_batches == 0:
            self.init_examples = 0
        decay = self.stat_decay if init else self._next_decay(examples)
        oks: list[Tensor] = []
        for name, estimate in estimates.items():
            block = self.blocks[name]
            if init:
                oks.append(block.accumulate_init(estimate, self.num_init_batches))
            else:
                oks.append(block.update_ema(estimate, decay))
        for name in [n for n in self.blocks if n not in estimates]:
            if name not in self._warned_unused:
                self._warned_unused.add(name)
                warn(f"kfc: layer {name!r} did not run in the statistics forward pass; factors not updated")
        if init:
            self.num_init_batches += 1
            self.init_examples += examples if examples is not None else 0
        else:
            # The next init=True call starts a fresh initialisation.
            self.num_init_batches = 0
            self.num_ema_updates += 1
        return (~torch.stack(oks)).sum() if oks else torch.zeros((), dtype=torch.long)

    def _next_decay(self, examples: int | None) -> float:
        """The ``xi`` of the next Eqn 33 update: ``min(1 - 1/k, xi)`` with the warm-up, else ``xi``."""
        if self.num_init_batches:  # the first update after an initial estimate: ceil(N / M) updates
            if self.init_examples and examples:
                self.statistics_count = math.ceil(self.init_examples / examples)
            else:
                self.statistics_count = self.num_init_batches
            self.init_examples = 0
        self.statistics_count += 1
        k = self.statistics_count
        self.last_decay = min(1.0 - 1.0 / k, self.stat_decay) if self.ema_warmup else self.stat_decay
        return self.last_decay

    def update_statistics(
        self,
        inputs: MicroBatches,
        targets: MicroBatches | None = None,
        *,
        generator: torch.Generator | None = None,
        init: bool = False,
        global_examples: int | None = None,
    ) -> StatisticsUpdate:
        """:meth:`estimate_statistics` on a batch (or micro-batches), then :meth:`fold_statistics`.

        Data parallel: between the two, :meth:`CurvatureComm.reduce_estimates` averages the
        estimates over the ``global_examples`` of all ranks (ONE all-reduce), so the factors
        are those of one process with the whole subset.
        """
        start = time.perf_counter()
        estimates = self.estimate_statistics(
            inputs, targets, generator=generator, global_examples=global_examples
        )
        examples = inputs.shape[0] if isinstance(inputs, Tensor) else sum(x.shape[0] for x in inputs)
        if self.comm is not None and not self.comm.shard.single:
            total = self.comm.shard.global_batch(examples) if global_examples is None else global_examples
            estimates = self.comm.reduce_estimates(estimates, examples, total)
            examples = total
        nonfinite = self.fold_statistics(estimates, init=init, examples=examples)
        return StatisticsUpdate(examples, nonfinite, time.perf_counter() - start)

    # -- inverses -----------------------------------------------------------------------------
    def _weight_decays(self, weight_decay: Mapping[str, float] | float) -> dict[str, float]:
        if isinstance(weight_decay, Mapping):
            unknown = [n for n in weight_decay if n not in self.blocks]
            if unknown:
                raise ValueError(
                    f"weight_decay names layers without a block: {unknown}; known: {list(self.blocks)}"
                )
            return {n: float(weight_decay.get(n, 0.0)) for n in self.blocks}
        return dict.fromkeys(self.blocks, float(weight_decay))

    def _damping_totals(
        self, damping: float | Sequence[float], weight_decay: Mapping[str, float] | float
    ) -> dict[str, list[float]]:
        """``{name: [λ + γ_i]}``, checked (finite, >= 0, > 0 where the damping mode needs it)."""
        if not self.has_statistics and any(b.factors() is None for b in self.blocks.values()):
            raise RuntimeError("KFCCurvature.update_inverses() called before any update_statistics()")
        dampings = [float(damping)] if isinstance(damping, (int, float)) else [float(d) for d in damping]
        lams = self._weight_decays(weight_decay)
        totals = {name: [lams[name] + g for g in dampings] for name in self.blocks}
        for name, block in self.blocks.items():
            for total in totals[name]:
                if not math.isfinite(total) or total < 0:
                    raise ValueError(
                        f"weight decay + damping (λ + γ) must be finite and >= 0, "
                        f"got {total} for layer {name!r}"
                    )
                if block.inverse.needs_positive_total and total <= 0:
                    raise ValueError(
                        f"damping_mode={self.damping_mode.value!r} needs weight decay + damping (λ + γ) > 0, "
                        f"got {total} for layer {name!r}"
                    )
        return totals

    def update_inverses(
        self, damping: float | Sequence[float], weight_decay: Mapping[str, float] | float
    ) -> InverseUpdate:
        """Refit every block's damped inverse from the current factors.

        ``damping`` is ``γ``, or several values to fit at once (candidate ``i`` is
        solved by ``precondition(..., index=i)``); ``weight_decay`` is ``lam``, one float
        for all blocks or a ``{name: lam}`` dict (blocks it leaves out get 0, e.g. the
        normalization layers, which carry no weight decay). Reads every block's success
        flags in one host sync, then finishes each fit.
        """
        start = time.perf_counter()
        totals = self._damping_totals(damping, weight_decay)
        mine = self.owned_blocks()
        pending = {name: mine[name].prepare_inverse(totals[name], self.inverse_dtype) for name in mine}
        flags = _read_flags(list(pending.values()))
        result = InverseUpdate()
        for block, block_flags in zip(mine.values(), flags, strict=True):
            result.nonfinite += int(not block_flags[0])
            block.inverse.commit(block_flags)
        if self.comm is not None and not self.comm.solve_on_owner:
            self.comm.share_inverses(self.blocks, list(self.blocks))
        for name, block in self.blocks.items():
            if block.inverse.ready:
                result.summaries[name] = block.inverse.summary()
        self.num_inverse_updates += 1
        result.seconds = time.perf_counter() - start
        return result

    def select_damping(self, index: int) -> None:
        """Keep damping candidate ``index`` of the last :meth:`update_inverses` as every block's fit.

        Afterwards ``precondition(..., index=0)`` solves with that candidate and the other
        candidates are gone. No new decomposition: the candidates were fitted together.
        """
        for name, block in self.blocks.items():
            if block.inverse.ready or self.owns(name):  # (data parallel: others' fits may be elsewhere)
                block.inverse.select(index)

    def start_inverses(
        self, damping: float | Sequence[float], weight_decay: Mapping[str, float] | float
    ) -> None:
        """Begin :meth:`update_inverses` in the background; :meth:`finish_inverses` installs the result.

        The fit runs on a worker thread (on CUDA: on a side stream, so the training
        stream never waits on it) from the factors as they are NOW: the factor tensors are
        rebound, never written in place, by later statistics updates, so the job's
        snapshot is just their references. Until :meth:`finish_inverses`, :meth:`precondition`
        keeps using the previous inverses (each block's inverse object is copied for the
        job and swapped in at the end). Calling :meth:`finish_inverses` right after this is
        exactly :meth:`update_inverses` (same numbers); an optimizer that calls it at the
        next inverse period gets inverses one period stale, the bounded staleness of
        issue 13. A pending job is saved by :meth:`state_dict` (waited for, not installed).
        """
        if self._inverse_job is not None:
            raise RuntimeError("kfc: start_inverses() while a fit is pending; call finish_inverses() first")
        # Background fits and data parallelism's owner-based fits (update_inverses: each rank fits
        # its own blocks, then inverses are shared or gathered, both collectives) are not combined:
        # the simplest correct rule is to refuse here; the optimizer refuses async_inverses earlier.
        if self.comm is not None:
            raise RuntimeError(
                "kfc: start_inverses() (async_inverses) is not supported data parallel; use update_inverses()"
            )
        totals = self._damping_totals(damping, weight_decay)
        work = {
            name: (copy.copy(block.inverse), block.factors_or_zero()) for name, block in self.blocks.items()
        }
        device = next(iter(self.blocks.values())).params[0].device if self.blocks else torch.device("cpu")
        stream = None
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # the factors are complete
        inverse_dtype = self.inverse_dtype

        def fit() -> InverseUpdate:
            begin = time.perf_counter()
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                pending = [
                    inv.prepare(factors, totals[name], inverse_dtype) for name, (inv, factors) in work.items()
                ]
                flags = _read_flags(pending)  # syncs this thread (and side stream) only
            result = InverseUpdate()
            for (name, (inv, _)), block_flags in zip(work.items(), flags, strict=True):
                result.nonfinite += int(not block_flags[0])
                inv.commit(block_flags)
                result.summaries[name] = inv.summary()
            result.seconds = time.perf_counter() - begin
            return result

        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfc-inverses")
        self._inverse_job = (self._executor.submit(fit), work, stream)

    @property
    def inverses_pending(self) -> bool:
        """Whether a :meth:`start_inverses` job has not been installed yet."""
        return self._inverse_job is not None

    def finish_inverses(self) -> InverseUpdate | None:
        """Wait for the :meth:`start_inverses` job and install its inverses (``None`` if none pending).

        Errors of the job (e.g. a failed decomposition) are raised here.
        """
        if self._inverse_job is None:
            return None
        future, work, stream = self._inverse_job
        self._inverse_job = None
        result = future.result()
        if stream is not None:
            torch.cuda.current_stream(stream.device).wait_stream(stream)
        for name, (inverse, _) in work.items():
            self.blocks[name].inverse = inverse
        self.num_inverse_updates += 1
        return result

    # -- preconditioning ----------------------------------------------------------------------
    def precondition(self, grads: Mapping[str, Tensor], index: int = 0) -> dict[str, Tensor]:
        """Apply each block's inverse damped Fisher block to its gradient in the block's layout.

        ``grads[name]`` has shape ``blocks[name].layout_shape`` (``I x omega_dim`` for a
        Kronecker block). Pi mode: ``Gamma_d^{-1} G Omega_d^{-1}`` (Eqn 29); exact mode:
        ``Q_G [(Q_G^T G Q_O) / (d_G d_O^T + λ + γ)] Q_O^T`` (Eqns 42-44); a
        normalization block: ``(F_c + (λ + γ) I)^{-1} g_c`` per channel. ``index``
        picks the damping candidate of the last ``update_inverses``. Returns tensors of
        the same shape and dtype as the inputs.
        """
        unknown = [name for name in grads if name not in self.blocks]
        if unknown:
            raise KeyError(f"kfc: no KFC layer named {unknown[0]!r}; known: {list(self.blocks)}")
        if self.comm is not None and self.comm.solve_on_owner:
            mine = {name: self.blocks[name].solve(g, index) for name, g in grads.items() if self.owns(name)}
            return self.comm.share_solutions(mine, grads)
        return {name: self.blocks[name].solve(grad, index) for name, grad in grads.items()}

    # -- data parallelism ---------------------------------------------------------------------
    def owns(self, name: str) -> bool:
        """Whether this rank fits block ``name``'s inverse (always, in one process)."""
        return self.comm is None or self.comm.owner(name) == self.comm.rank

    def largest_mean_eigenvalue(self) -> float | None:
        """``max_l tr(F_hat_l) / n_l`` over the blocks with statistics (one host read); ``None`` if none.

        The running factors are the same on every rank (their statistics are all-reduced), so
        data-parallel ranks agree on it.
        """
        means = [m for m in (block.mean_eigenvalue() for block in self.blocks.values()) if m is not None]
        return float(torch.stack([m.to(torch.float64) for m in means]).max()) if means else None

    def owned_blocks(self) -> dict[str, CurvatureBlock]:
        """The blocks whose inverses this rank fits (all of them in one process)."""
        return {name: block for name, block in self.blocks.items() if self.owns(name)}

    def gather_inverses(self) -> None:
        """Give every rank every fitted inverse (collective: for checkpoints with ``solve_on_owner``)."""
        if self.comm is not None and self.comm.solve_on_owner and self.has_inverses:
            self.comm.share_inverses(self.blocks, list(self.blocks))

    def release_foreign_inverses(self) -> None:
        """Drop the inverses of blocks another rank owns (``solve_on_owner``: they are never used here)."""
        if self.comm is not None and self.comm.solve_on_owner:
            for name, block in self.blocks.items():
                if not self.owns(name):
                    block.inverse.release()

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors, inverse-side state and counters (tensors cloned; loads back bitwise).

        A :meth:`start_inverses` job still pending is waited for (not installed) and saved
        as ``pending_inverses``, so that a resumed run installs it at the same step.
        Data parallel with ``solve_on_owner``: a collective (every rank must call it), since
        each rank holds only its own blocks' inverses; the state holds all of them.
        """
        self.gather_inverses()
        state = {
            "format": _STATE_FORMAT,
            "damping_mode": self.damping_mode.value,
            "fisher_type": self.fisher_type.value,
            "num_init_batches": self.num_init_batches,
            "num_ema_updates": self.num_ema_updates,
            "num_inverse_updates": self.num_inverse_updates,
            "init_examples": self.init_examples,
            "statistics_count": self.statistics_count,
            "last_decay": self.last_decay,
            "layers": {name: block.state_dict() for name, block in self.blocks.items()},
        }
        if self._inverse_job is not None:
            future, work, _ = self._inverse_job
            future.result()
            state["pending_inverses"] = {name: inverse.state_dict() for name, (inverse, _) in work.items()}
        self.release_foreign_inverses()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Layer names and ``damping_mode`` must match this object."""
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(f"kfc: unknown KFCCurvature state format {state_dict.get('format')!r}")
        if state_dict["damping_mode"] != self.damping_mode.value:
            raise ValueError(
                f"kfc: state was saved with damping_mode={state_dict['damping_mode']!r}, "
                f"this object uses {self.damping_mode.value!r}"
            )
        layers = state_dict["layers"]
        if list(layers) != list(self.blocks):
            raise ValueError(f"kfc: state has layers {list(layers)}, the model has {list(self.blocks)}")
        for name, block in self.blocks.items():
            block.load_state_dict(layers[name])
        self._inverse_job = None
        pending = state_dict.get("pending_inverses")
        if pending is not None:
            work: dict[str, tuple[Any, Estimate]] = {}
            for name, block in self.blocks.items():
                inverse = copy.copy(block.inverse)
                inverse.load_state_dict(pending[name], block.params[0].device)
                work[name] = (inverse, ())
            done: Future[InverseUpdate] = Future()
            done.set_result(InverseUpdate())
            self._inverse_job = (done, work, None)
        self.num_init_batches = int(state_dict["num_init_batches"])
        self.num_ema_updates = int(state_dict["num_ema_updates"])
        self.num_inverse_updates = int(state_dict["num_inverse_updates"])
        self.init_examples = int(state_dict.get("init_examples", 0))
        self.statistics_count = int(state_dict.get("statistics_count", 0))
        self.last_decay = float(state_dict.get("last_decay", self.stat_decay))
        self.release_foreign_inverses()


def _omega_methods(omega_method: str | Mapping[str, str], layers: Mapping[str, nn.Module]) -> dict[str, str]:
    """``{layer name: omega_method}`` from one method for all layers or a per-layer mapping."""
    if isinstance(omega_method, str):
        return dict.fromkeys(layers, omega_method)
    unknown = sorted(set(omega_method) - set(layers))
    if unknown:
        raise ValueError(f"kfc: omega_method names layers {unknown} that have no curvature block")
    return dict(omega_method)


def _read_flags(flags: list[Tensor]) -> list[list[bool]]:
    """Every block's success flags, read in ONE host sync, split back per block."""
    if not flags:
        return []
    device = flags[0].device
    values = torch.cat([f.to(device) for f in flags]).tolist()
    out, start = [], 0
    for f in flags:
        out.append([bool(v) for v in values[start : start + f.numel()]])
        start += f.numel()
    return out
