"""KFC-pre: SGD with momentum preconditioned by the damped KFC Fisher (paper App. A.1, Algorithm 1).

Each iteration ``k`` (counting from 1), as named phases of :meth:`KFCPre.step`:

1. ``_refresh_curvature``: if ``k % T_s == 0`` update the running factors ``Omega, Gamma``
   on the current mini-batch with targets sampled from the model (Eqns 32-33); if
   ``k % T_f == 0`` recompute the damped inverses (Eqn 28, or Eqns 39-44);
2. ``_proposed_updates``: ``v = -alpha * F_hat^{-1} grad h`` per covered layer (Eqn 29),
   where ``h`` is the mean mini-batch loss plus ``sum_l lambda_l/2 |W_l|^2``;
3. ``_clip``: ``nu = v^T F v + sum_l lambda_l |v_l|^2`` with the EXACT Fisher of a
   fraction of the mini-batch (forward-mode JVP, :mod:`kfcrun.optim.fisher_vector`);
   if ``nu > C``: ``v <- v / sqrt(nu / C)`` (``C = 0.3``);
4. ``_apply_momentum``: ``p <- mu p + v``; ``theta <- theta + p``;
5. averaging: ``theta_avg <- xi_avg theta_avg + (1 - xi_avg) theta`` (shared with SGD,
   :mod:`~kfcrun.optim.averaging`).

Before the first step the factors are estimated on a large training subset
(:meth:`KFCPre.initialize`); without that call, the first step initializes them from
its own mini-batch. The mini-batch inputs come from ``step(inputs=...)`` or, for the
plain ``loss.backward(); opt.step()`` loop, from the recorded training forwards since
the last step (:mod:`kfcrun.optim.inputs`). With gradient accumulation (several
micro-batches per step, their mean-loss gradients averaged into ``.grad`` by the user)
the statistics and ``nu`` cover all micro-batches, one micro-batch at a time
(:mod:`kfcrun.optim.curvature_steps`).

Coverage is :func:`~kfcrun.curvature.kfc_layers`: convolutions (any groups and padding
mode), Linear, Embedding and the scale/shift of normalization layers each get a block.
Every other trainable parameter (and those of ``skip_layers``) takes the plain
SGD-with-momentum step ``v = -alpha * grad h`` with the same learning rate, and takes
part in ``nu`` and clipping like every other parameter; the curvature warns once, naming
the modules without a block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any

import torch
from torch import Tensor, nn

from kfcrun.curvature import (
    DEFAULT_MAX_FACTOR_DIM,
    CurvatureBlock,
    CurvatureComm,
    CurvatureSchedule,
    DampingMode,
    FisherType,
    KFCCurvature,
    Likelihood,
    OmegaModel,
)
from kfcrun.optim.averaging import AVERAGING_MODES, IterateAveraging
from kfcrun.optim.curvature_steps import (
    CurvatureRefresher,
    exact_quadratic,
    leading_examples,
    micro_batches,
    precondition_parameters,
    sharded_leading,
    subset_size,
)
from kfcrun.optim.inputs import BatchRecorder
from kfcrun.optim.knobs import LIKELIHOOD_RULE, SKIP_LAYERS_RULE
from kfcrun.optim.param_groups import layer_weight_decays, parameter_weight_decays
from kfcrun.optim.protocol import InitBatch
from kfcrun.optim.timing import PhaseTimer
from kfcrun.schema import boolean, check_arguments, choice, integer, mapping_of_numbers, number

__all__ = ["PHASES", "KFCPre", "subset_size"]

#: Names of the timed phases, as reported by :attr:`KFCPre.phase_times`.
PHASES = ("statistics", "inverses", "precondition", "nu")


class KFCPre(torch.optim.Optimizer):
    """KFC-pre (Algorithm 1) as a ``torch.optim.Optimizer``.

    Usage::

        opt = KFCPre(model, lr=0.01, weight_decay=0.004)
        opt.initialize(batches_of_inputs)        # optional: Algorithm 1's initial estimate
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()   # the MEAN loss
            opt.step()                           # or opt.step(inputs=x): see kfcrun.optim.inputs

    Gradient accumulation: run ``(loss / n_micro).backward()`` on each micro-batch, then
    one ``opt.step()`` (the recorder keeps every micro-batch; or pass
    ``step(inputs=[x1, x2, ...])``).

    Args:
        model: the network; maps inputs to the output of ``likelihood`` (by default logits
            of a softmax cross-entropy, class dim 1). Every module
            :func:`~kfcrun.curvature.kfc_layers` covers gets a block.
        lr: ``alpha``, on the gradient of the MEAN mini-batch loss.
        momentum: ``mu`` (paper: 0.9).
        weight_decay: ``lambda`` of the L2 term ``lambda/2 |W|^2`` for the covered layers' weights.
        layer_weight_decay: per-layer ``lambda`` by layer name (overrides ``weight_decay``).
        decay_biases: include biases in the L2 term (cuda-convnet does not).
        damping: ``γ`` (paper: 1e-3). The damping is ``sqrt(λ + γ)`` per factor
            (Eqn 28) or ``λ + γ`` on the whole block (``damping_mode="exact"``).
        damping_mode: ``"pi"`` (Eqn 28) or ``"exact"`` (Eqns 39-44).
        stat_decay: ``xi`` of the factors' running averages (Eqn 33), per statistics update.
        stats_every: ``T_s``, iterations between statistics updates.
        inverse_every: ``T_f``, iterations between inverse updates.
        refresh_until: for iterations ``k <= refresh_until`` update the statistics and the
            inverses every iteration, whatever ``T_s``/``T_f`` say. Early on the parameters,
            and with them the curvature, change fastest, and factors that are ``T_s``/``T_f``
            iterations stale mis-scale the step. 0 (default) is Algorithm 1 exactly.
        clip: ``C`` of the update clipping; ``None`` disables clipping (and ``nu``).
        nu_fraction: fraction of the mini-batch whose exact Fisher estimates ``nu`` (paper: 1/4).
            With BatchNorm the ``nu`` pass normalizes over that subset (train mode), so keep it
            at a few dozen examples: over two examples of a 1x1 map the batch variance can
            nearly vanish and ``nu`` explode, and the clip then freezes the step.
        stats_fraction: fraction of the mini-batch used for the factor statistics (the
            estimate gets noisier, the cost falls in proportion; App. A.3). The first
            ``ceil(f * M)`` examples are used; ``M`` in Eqn 32 is then that subset's size.
        init_examples: how many training examples the training loop should pass to
            :meth:`initialize` (Algorithm 1: "the full dataset"); 0 leaves the first step
            to initialize the factors from its own batch.
        fisher: ``"sampled"`` (targets sampled from the model's predictive distribution: the
            true Fisher, the paper's method), ``"expected"`` (the exact expectation over
            classes; one backward pass per class) or ``"empirical"`` (training labels, passed
            as ``step(targets=...)``: the empirical Fisher, a different and worse object).
        approx: ``"kfc"`` (Theorem 1-2) or ``"sua"`` (spatially uncorrelated activations,
            the idealized PRONG model of Theorem 4).
        likelihood: the output distribution: ``"cross_entropy"`` (softmax, class dim 1),
            ``"gaussian"`` (unit variance: per-example loss ``1/2 |f - y|^2``) or
            ``"bernoulli"`` (sigmoid), or a :class:`~kfcrun.curvature.Likelihood` (e.g.
            ``SoftmaxCrossEntropy(class_dim=-1, ignore_index=-100)`` for tokens). The curvature
            and ``nu`` are the Fisher of the per-example NLL summed over output positions
            (:mod:`kfcrun.curvature.likelihoods` lists the factors to common losses).
        skip_layers: names or patterns of modules that get no block (plain step), e.g.
            ``["fc", "layer4.*"]`` (:func:`~kfcrun.curvature.layer_matches`).
        max_factor_dim: a Kronecker factor larger than this is kept as its diagonal (an LM
            head's ``V x V`` Gamma); ``None``: no cap.
        precondition: ``False`` skips curvature entirely (SGD with momentum and clipping).
        avg_decay, avg_mode, avg_start: iterate averaging, as for :class:`kfcrun.optim.SGD`.
        seed: seeds the generator of the sampled targets.
        chunk_size: examples per chunk of the conv patch expansion (memory bound).
        inverse_dtype: dtype of the inversions: ``"float64"`` (default: cheap at the paper's
            sizes) or ``"float32"`` (about twice as fast for the 4608-wide factors of a
            ResNet-18), or a ``torch.dtype``; ``None``: the factors' dtype.
        record_inputs: register the :class:`~kfcrun.optim.inputs.BatchRecorder` hook so that
            ``step()`` without ``inputs`` finds the batch (see :mod:`kfcrun.optim.inputs`).
        grad_worker_fraction: data parallel only (:meth:`distribute`): KAISA's ``f``, the
            fraction of ranks that hold each layer's inverse. ``1.0``: the owner broadcasts
            each fit and every rank solves (memory: all inverses on every rank; traffic: the
            inverses every ``T_f``); ``0`` (or ``<= 1/P``): the owner solves and broadcasts the
            preconditioned gradient (memory: ``1/P`` of the inverses; traffic: one gradient
            every step). Same parameters either way (:mod:`kfcrun.distributed.curvature_comm`).

    The arguments annotated with a :class:`~kfcrun.schema.Rule` are the config knobs of
    ``configs/optimizer/kfc_pre.yaml`` (validated from these annotations); ``model``,
    ``avg_decay`` and ``seed`` are supplied by the runner; the rest are library-only.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: Annotated[float, number("0.003", gt=0)],
        momentum: Annotated[float, number("0.9", ge=0, lt=1)] = 0.9,
        weight_decay: Annotated[float, number("0.004", ge=0)] = 0.0,
        *,
        layer_weight_decay: Annotated[dict[str, float] | None, mapping_of_numbers("{fc10: 1.0}")] = None,
        decay_biases: Annotated[bool, boolean()] = False,
        damping: Annotated[float, number("0.001", gt=0)] = 1e-3,
        damping_mode: Annotated[DampingMode | str, choice(DampingMode)] = DampingMode.PI,
        stat_decay: Annotated[float, number("0.95", ge=0, lt=1)] = 0.95,
        stats_every: Annotated[int, integer(1, "10")] = 10,
        inverse_every: Annotated[int, integer(1, "20")] = 20,
        refresh_until: Annotated[int, integer(0, "0")] = 0,
        clip: Annotated[float | None, number("0.3", gt=0, optional=True)] = 0.3,
        nu_fraction: Annotated[float, number("0.25", gt=0, le=1)] = 0.25,
        stats_fraction: Annotated[float, number("0.25", gt=0, le=1)] = 1.0,
        init_examples: Annotated[int, integer(0, "10000")] = 0,
        fisher: Annotated[FisherType | str, choice(FisherType)] = FisherType.SAMPLED,
        approx: Annotated[OmegaModel | str, choice(OmegaModel)] = OmegaModel.KFC,
        likelihood: Annotated[Likelihood | str, LIKELIHOOD_RULE] = "cross_entropy",
        skip_layers: Annotated[Sequence[str], SKIP_LAYERS_RULE] = (),
        max_factor_dim: Annotated[int | None, integer(1, "8192", optional=True)] = DEFAULT_MAX_FACTOR_DIM,
        precondition: Annotated[bool, boolean()] = True,
        avg_decay: float | None = None,
        avg_mode: Annotated[str, choice(*AVERAGING_MODES)] = "paper",
        avg_start: Annotated[int, integer(0, "0")] = 0,
        seed: int = 0,
        chunk_size: int | None = None,
        inverse_dtype: Annotated[torch.dtype | str | None, choice("float64", "float32")] = torch.float64,
        record_inputs: bool = True,
        grad_worker_fraction: Annotated[float, number("1.0", ge=0, le=1)] = 1.0,
    ) -> None:
        compute_dtype: torch.dtype | None
        if isinstance(inverse_dtype, str):
            check_arguments(KFCPre, {"inverse_dtype": inverse_dtype})
            compute_dtype = getattr(torch, inverse_dtype)
        else:
            compute_dtype = inverse_dtype
        check_arguments(KFCPre, {k: v for k, v in locals().items() if k != "inverse_dtype"})
        self.schedule = CurvatureSchedule(stats_every, inverse_every, refresh_until)
        self.model = model
        self.curvature = KFCCurvature(
            model,
            stat_decay=stat_decay,
            damping_mode=damping_mode,
            fisher_type=fisher,
            chunk_size=chunk_size,
            inverse_dtype=compute_dtype,
            omega_model=approx,
            likelihood=likelihood,
            skip_layers=skip_layers,
            max_factor_dim=max_factor_dim,
        )
        #: ``lambda`` per weight layer (Conv/Linear) by name, covered or not.
        self.lambdas = layer_weight_decays(model, weight_decay, layer_weight_decay)
        #: ``lambda`` per parameter: weights of weight layers, biases with ``decay_biases``.
        self.decays = parameter_weight_decays(model, self.lambdas, decay_biases)
        groups: list[dict[str, Any]] = []
        covered: set[int] = set()
        for name, block in self.blocks.items():
            covered.update(id(p) for p in block.params)
            groups.append({"params": block.params, "layer": name})
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
        if others:
            groups.append({"params": others, "layer": None})
        super().__init__(groups, {"lr": lr, "momentum": momentum})

        self.damping = damping
        self.clip, self.nu_fraction, self.stats_fraction = clip, nu_fraction, stats_fraction
        self.decay_biases, self.precondition_enabled = decay_biases, precondition
        self.init_examples = init_examples
        self.grad_worker_fraction = grad_worker_fraction
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.iteration = 0
        self.averaging = IterateAveraging(self, avg_decay, avg_mode, avg_start)
        self.averaging.begin(self._params())
        self.timer = PhaseTimer(device)
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        self._last_stats: dict[str, Tensor] = {}
        self.recorder = BatchRecorder()
        self._recorder_handle = self.recorder.attach(model) if record_inputs else None
        self.refresher = CurvatureRefresher(
            self.curvature,
            self.schedule,
            stats_fraction=stats_fraction,
            generator=self.generator,
            timer=self.timer,
            recorder=self.recorder,
        )

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def blocks(self) -> dict[str, CurvatureBlock]:
        """The curvature blocks, by module name."""
        return self.curvature.blocks

    @property
    def block_weight_decays(self) -> dict[str, float]:
        """``lambda`` of each block's damping ``λ + γ`` (0 for normalization blocks)."""
        return {name: self.lambdas.get(name, 0.0) for name in self.blocks}

    @property
    def needs_labels(self) -> bool:
        """The empirical Fisher and a masking likelihood need the labels (``step(targets=...)``)."""
        return self.curvature.fisher_type is FisherType.EMPIRICAL or self.curvature.likelihood.needs_labels

    @property
    def initialized(self) -> bool:
        """Whether the damped inverses exist (after :meth:`initialize` or the first step)."""
        return self.curvature.has_inverses

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def phase_times(self) -> dict[str, float]:
        """Cumulative seconds per phase: statistics, inverses, precondition, nu."""
        totals = self.timer.totals()
        return {f"kfc_{phase}_s": totals.get(phase, 0.0) for phase in PHASES}

    def distribute(self, comm: CurvatureComm) -> None:
        """Run data parallel: statistics, inverses, solves and ``nu`` go through ``comm``.

        ``comm`` (:class:`kfcrun.distributed.DataParallelCurvatureComm`, built by the runner
        with :attr:`grad_worker_fraction`) averages the factor statistics over ranks, splits
        the inverses among them and reduces ``nu``; each rank's ``step`` gets its slice of
        the global batch (``.grad`` already averaged over ranks).
        """
        self.curvature.comm = comm
        self.curvature.release_foreign_inverses()

    def remove_hooks(self) -> None:
        """Detach the input-recording hook from the model (``step`` then needs ``inputs=``)."""
        if self._recorder_handle is not None:
            self._recorder_handle.remove()
            self._recorder_handle = None

    # -- curvature ------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, batches: Iterable[InitBatch]) -> None:
        """Algorithm 1's initial factor estimate: average Eqn 32 over ``batches``, then invert.

        ``batches`` yields input tensors, or ``(inputs, labels)`` pairs (labels are used
        only with ``fisher="empirical"`` or a masking likelihood): a large training subset;
        the paper used the full training set. Every example is used, whatever
        ``stats_fraction`` is.
        """
        self.refresher.initialize(batches, self.damping, self.block_weight_decays)

    def _refresh_curvature(self, k: int, batches: list[Tensor], targets: list[Tensor] | None) -> None:
        """Phase 1: statistics every ``T_s`` and inverses every ``T_f`` (on a subset of every micro-batch)."""
        self.refresher.refresh(k, batches, targets, self.damping, self.block_weight_decays)

    # -- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        inputs: Tensor | Sequence[Tensor] | None = None,
        targets: Tensor | Sequence[Tensor] | None = None,
    ) -> Any:
        """One KFC-pre iteration (see the module docstring). ``.grad`` must hold the mean-loss gradient.

        Args:
            closure: re-evaluates the loss and its gradient (standard ``torch.optim``).
            inputs: the mini-batch inputs, or the list of micro-batches whose gradients
                ``.grad`` holds; default: the recorded training forwards since the last step.
            targets: training labels (a list for micro-batches), needed only when
                :attr:`needs_labels`.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        recorded = self.recorder.take()
        if inputs is None:
            inputs = recorded
        if isinstance(inputs, Sequence) and not isinstance(inputs, Tensor) and not inputs:
            raise RuntimeError(
                "KFCPre.step() needs the mini-batch inputs: call step(inputs=x), or build the optimizer with "
                "record_inputs=True and run the model in train mode on them before step()"
            )
        batches, labels = micro_batches(inputs, targets)
        k = self.iteration + 1

        if self.precondition_enabled:
            self._refresh_curvature(k, batches, labels)
        with self.timer("precondition"):
            updates = self._proposed_updates()
        nu, scale = self._clip(batches, labels, updates)
        self._apply_momentum(updates)

        self.iteration = k
        self.averaging.update(self._params(), k)
        self._last_stats = {"damping": torch.tensor(self.damping)}
        if self.refresher.pi_mean is not None:
            self._last_stats["pi_mean"] = self.refresher.pi_mean
        if nu is not None and scale is not None:
            self._last_stats["nu"] = nu
            self._last_stats["clip_factor"] = scale
        return loss

    def _gradient_of_h(self, p: Tensor) -> Tensor:
        """``grad h = grad(mean loss) + lambda p`` (a fresh tensor)."""
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        decay = self.decays.get(p, 0.0)
        return grad.add(p, alpha=decay) if decay else grad.clone()

    def _proposed_updates(self) -> dict[Tensor, Tensor]:
        """Phase 2: the proposed update ``v`` per parameter.

        ``v = -alpha F_hat^{-1} grad h`` for the parameters a block covers (Eqn 29 for Kronecker
        blocks), ``-alpha grad h`` for the others.
        """
        grads = {p: self._gradient_of_h(p) for p in self._params()}
        if self.precondition_enabled and self.blocks:
            grads.update(precondition_parameters(self.curvature, grads))
        lr = {p: group["lr"] for group in self.param_groups for p in group["params"]}
        return {p: g.mul_(-lr[p]) for p, g in grads.items()}

    def _clip(
        self, batches: list[Tensor], targets: list[Tensor] | None, updates: dict[Tensor, Tensor]
    ) -> tuple[Tensor | None, Tensor | None]:
        """Phase 3: ``nu`` on part of the step's examples; scale ``v`` in place so ``nu <= C`` (no sync)."""
        if self.clip is None:
            return None, None
        with self.timer("nu"):
            nu = self._nu(batches, targets, updates)
            scale = torch.clamp(torch.sqrt(self.clip / nu), max=1.0)
            scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
            torch._foreach_mul_(list(updates.values()), scale)
        return nu, scale

    def _apply_momentum(self, updates: dict[Tensor, Tensor]) -> None:
        """Phase 4: ``p <- mu p + v``, ``theta <- theta + p``."""
        params = list(updates)
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffers.append(state["momentum_buffer"])
        momentum = self.param_groups[0]["momentum"]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, list(updates.values()))
        torch._foreach_add_(params, buffers)

    def _nu(
        self, batches: list[Tensor], targets: list[Tensor] | None, updates: dict[Tensor, Tensor]
    ) -> Tensor:
        """``v^T F v + sum lambda |v|^2``, exact Fisher of the step's first ``nu_fraction`` of examples."""
        comm = self.curvature.comm
        tangents = {self._param_names[id(p)]: v for p, v in updates.items()}
        if comm is not None and not comm.shard.single:
            # This rank's examples of the global subset; the mean over all of them (one all-reduce).
            inputs, labels, count = sharded_leading(self.curvature, batches, targets, self.nu_fraction)
            assert count is not None
            with self.recorder.paused(), torch.enable_grad():
                local = exact_quadratic(self.model, self.curvature.likelihood, inputs, labels, tangents)
            quadratic = comm.all_reduce_sum(local * (inputs[0].shape[0] / count), "nu")
        else:
            total = sum(x.shape[0] for x in batches)
            inputs, labels = leading_examples(batches, targets, subset_size(self.nu_fraction, total))
            with self.recorder.paused(), torch.enable_grad():
                quadratic = exact_quadratic(self.model, self.curvature.likelihood, inputs, labels, tangents)
        decay_terms = [
            self.decays[p] * v.square().sum() for p, v in updates.items() if self.decays.get(p, 0.0)
        ]
        return quadratic + torch.stack(decay_terms).sum() if decay_terms else quadratic

    # -- evaluation, logging, state --------------------------------------------------------------
    @contextmanager
    def averaged_parameters(self) -> Iterator[None]:
        """Load the averaged iterates into the parameters inside the ``with`` block."""
        with self.averaging.swapped_in(self._params(), self.iteration):
            yield

    def step_stats(self) -> dict[str, Tensor | float]:
        """Last step's ``damping``, ``pi_mean``, ``nu``, ``clip_factor``, non-finite counts and phase times.

        ``stats_nonfinite``/``inverse_nonfinite``: layers whose last statistics estimate /
        last factors were non-finite (and were skipped / kept their previous inverse).
        Values are tensors where they come from the device; reading them syncs, so call
        this only when logging.
        """
        return {**self._last_stats, **self.refresher.health, **self.phase_times}

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim.Optimizer`` state plus iteration, curvature, generator, phase times, ``pi``."""
        state = super().state_dict()
        state["iteration"] = self.iteration
        state["curvature"] = self.curvature.state_dict()
        state["generator"] = self.generator.get_state()
        state["phase_times"] = self.timer.state_dict()
        state["pi_mean"] = self.refresher.pi_mean
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output bitwise (curvature, generator and counters included)."""
        state_dict = dict(state_dict)
        self.iteration = int(state_dict.pop("iteration"))
        self.curvature.load_state_dict(state_dict.pop("curvature"))
        self.generator.set_state(state_dict.pop("generator"))
        self.timer.load_state_dict(state_dict.pop("phase_times", {}))
        self.refresher.pi_mean = state_dict.pop("pi_mean", None)
        super().load_state_dict(state_dict)
