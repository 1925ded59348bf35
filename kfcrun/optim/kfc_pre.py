"""KFC-pre: SGD with momentum preconditioned by the damped KFC Fisher (paper App. A.1, Algorithm 1).

Each iteration ``k`` (counting from 1), as named phases of :meth:`KFCPre.step`:

1. ``_refresh_curvature``: if ``k % T_s == 0`` update the running factors ``Omega, Gamma``
   on the current mini-batch with targets sampled from the model (Eqns 32-33); if
   ``k % T_f == 0`` recompute the damped inverses (Eqn 28, or Eqns 39-44); both when the
   staleness guard asks (:mod:`kfcrun.optim.staleness`, off by default). With
   ``ema_warmup`` the ``k``-th statistics update uses ``xi_k = min(1 - 1/k, xi)``;
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

The shared machinery (param groups, ``grad h``, the refresh, the solve, state) lives in
:class:`~kfcrun.optim.kfc_base.KFCOptimizerBase`, shared with :class:`~kfcrun.optim.KFAC`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import torch
from torch import Tensor, nn

from kfcrun.curvature import (
    DEFAULT_MAX_FACTOR_DIM,
    OMEGA_METHODS,
    DampingMode,
    FisherType,
    Likelihood,
    OmegaModel,
)
from kfcrun.optim.averaging import AVERAGING_MODES
from kfcrun.optim.curvature_steps import Batches
from kfcrun.optim.kfc_base import (
    PHASES,
    KFCOptimizerBase,
    StepInputs,
    parse_inverse_dtype,
    shared_arguments,
    subset_size,
)
from kfcrun.optim.knobs import LIKELIHOOD_RULE, SKIP_LAYERS_RULE
from kfcrun.optim.staleness import StalenessGuard
from kfcrun.schema import boolean, check_arguments, choice, integer, mapping_of_numbers, number

__all__ = ["PHASES", "KFCPre", "subset_size"]


class KFCPre(KFCOptimizerBase):
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
        ema_warmup: use ``xi_k = min(1 - 1/k, xi)`` for the ``k``-th statistics update
            (Martens & Grosse 2015), the initial estimate counting as
            ``ceil(init_examples / statistics batch)`` updates (see
            :class:`~kfcrun.curvature.KFCCurvature`). ``False``: Eqn 33's constant ``xi``.
        stats_every: ``T_s``, iterations between statistics updates.
        inverse_every: ``T_f``, iterations between inverse updates.
        refresh_until: for iterations ``k <= refresh_until`` update the statistics and the
            inverses every iteration, whatever ``T_s``/``T_f`` say. Early on the parameters,
            and with them the curvature, change fastest, and factors that are ``T_s``/``T_f``
            iterations stale mis-scale the step. 0 (default) is Algorithm 1 exactly.
        guard_clip: staleness guard: refresh the statistics and the inverses at the next
            step when this step's clip factor ``min(1, sqrt(C/nu))`` fell below this
            (``None``: off). See :mod:`kfcrun.optim.staleness`; reads one scalar per step.
        guard_nu_jump: staleness guard: refresh when ``nu`` grew by more than this factor
            from one step to the next (``None``: off). Both need ``clip`` (they watch ``nu``).
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
        omega_method: how a conv layer computes ``Omega_hat`` (the same matrix either way):
            ``"auto"`` (row-lagged products for stride-1 convs, the patch GEMM otherwise),
            ``"patch"`` or ``"lagged"`` (:class:`~kfcrun.curvature.blocks.ConvBlock`).
        async_inverses: fit the scheduled inverses in the background (a worker thread; a
            side stream on CUDA) and install each at the next inverse update: one ``T_f``
            period staler than Algorithm 1, so off by default.
        stats_from_training: take the factor statistics from the training forward
            (:meth:`backward`, which the runner calls): one extra backward through its
            graph instead of a separate statistics forward. Same estimates (exact in
            float64) for networks without train-mode BatchNorm; a plain
            ``loss.backward(); step()`` loop falls back to the separate pass.
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
        ema_warmup: Annotated[bool, boolean()] = False,
        stats_every: Annotated[int, integer(1, "10")] = 10,
        inverse_every: Annotated[int, integer(1, "20")] = 20,
        refresh_until: Annotated[int, integer(0, "0")] = 0,
        guard_clip: Annotated[float | None, number("0.1", gt=0, le=1, optional=True)] = None,
        guard_nu_jump: Annotated[float | None, number("10", gt=1, optional=True)] = None,
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
        omega_method: Annotated[str, choice(*OMEGA_METHODS)] = "auto",
        async_inverses: Annotated[bool, boolean()] = False,
        stats_from_training: Annotated[bool, boolean()] = False,
        grad_worker_fraction: Annotated[float, number("1.0", ge=0, le=1)] = 1.0,
    ) -> None:
        compute_dtype = parse_inverse_dtype(KFCPre, inverse_dtype)
        check_arguments(
            KFCPre, {k: v for k, v in locals().items() if k not in ("inverse_dtype", "compute_dtype")}
        )
        if clip is None and (guard_clip is not None or guard_nu_jump is not None):
            raise ValueError(
                "guard_clip and guard_nu_jump watch nu, which clip=None turns off; set clip or drop them"
            )
        super().__init__(
            model,
            {"lr": lr, "momentum": momentum},
            staleness_guard=StalenessGuard(nu_jump=guard_nu_jump, health_below=guard_clip),
            **shared_arguments(locals(), inverse_dtype=compute_dtype),
        )
        self.clip, self.nu_fraction = clip, nu_fraction

    # -- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        inputs: StepInputs | None = None,
        targets: StepInputs | None = None,
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
        batches, labels = self._step_batches(inputs, targets)
        k = self.iteration + 1

        if self.precondition_enabled:
            self._refresh_curvature(k, batches, labels, force=self.guard.due())
        with self.timer("precondition"):
            updates = self._proposed_updates()
        nu, scale = self._clip(batches, labels, updates)
        self._apply_momentum(updates, self.param_groups[0]["momentum"])
        self.guard.observe(nu=nu, health=scale)

        self.iteration = k
        self.averaging.update(self._params(), k)
        self._last_stats = {"damping": torch.tensor(self.damping)}
        if self.refresher.pi_mean is not None:
            self._last_stats["pi_mean"] = self.refresher.pi_mean
        if nu is not None and scale is not None:
            self._last_stats["nu"] = nu
            self._last_stats["clip_factor"] = scale
        return loss

    def _proposed_updates(self) -> dict[Tensor, Tensor]:
        """Phase 2: the proposed update ``v`` per parameter.

        ``v = -alpha F_hat^{-1} grad h`` for the parameters a block covers (Eqn 29 for Kronecker
        blocks), ``-alpha grad h`` for the others.
        """
        updates = self._directions()
        lr = {p: group["lr"] for group in self.param_groups for p in group["params"]}
        return {p: v.mul_(-lr[p]) for p, v in updates.items()}

    def _clip(
        self, batches: Batches, targets: Batches | None, updates: dict[Tensor, Tensor]
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

    def _nu(self, batches: Batches, targets: Batches | None, updates: dict[Tensor, Tensor]) -> Tensor:
        """``v^T F v + sum lambda |v|^2``, exact Fisher of the step's first ``nu_fraction`` of examples."""
        inputs, labels, total = self._leading(batches, targets, self.nu_fraction)  # (global examples)
        quadratic = self._fisher_gram(inputs, labels, [updates], global_examples=total)[0, 0]
        decay = self._decay_form(updates, updates)
        return quadratic + decay if decay is not None else quadratic
