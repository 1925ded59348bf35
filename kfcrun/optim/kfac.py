"""K-FAC with KFC blocks (paper App. A.2; Martens & Grosse 2015): learning rate, momentum and damping adapted.

Each iteration ``k`` (from 1), as named phases of :meth:`KFAC.step`:

1. ``_refresh_curvature``: statistics every ``T_s`` and the damped inverses every ``T_f``, as
   in KFC-pre (Algorithm 1), or when the staleness guard asks. Every ``T_2`` iterations the
   inverses are fitted for three dampings ``gamma, gamma_-, gamma_+`` at once;
2. ``_directions``: per damping candidate, ``v_1 = -(F_hat + (r + gamma) I)^{-1} grad h``
   (Eqns 39-44 by default, Eqn 28 with ``damping_mode="pi"``); ``v_2 = delta_prev``, the
   previous update;
3. ``_quadratic_model``: the Gram matrix ``v_i^T F v_j`` of the EXACT Fisher of the whole
   mini-batch (one forward-mode JVP per direction, :func:`~kfcrun.optim.fisher_vector.fisher_gram`),
   ``C_ij = v_i^T (F + R + lambda I) v_j``, ``d_i = grad h^T v_i``, and ``(alpha, mu)`` from
   ``C w = -d`` (:mod:`kfcrun.optim.quadratic_model`). The first step has no ``v_2``:
   ``alpha`` only. On ``T_2`` iterations the candidate with the lowest ``M(theta + delta)``
   becomes ``gamma`` (A.2, last paragraph);
4. ``delta = alpha v_1 + mu v_2``, ``theta <- theta + delta``;
5. every ``T_1`` iterations the reduction ratio (Eqn 37)
   ``rho = (h(theta + delta) - h(theta)) / (M(theta + delta) - M(theta))`` on the same
   mini-batch (the ``closure``), and Eqn 38's Levenberg-Marquardt rule for ``lambda``;
6. averaging: ``theta_avg <- xi theta_avg + (1 - xi) theta``, as for KFC-pre and SGD.

``h`` is the mean mini-batch loss plus ``sum_l r_l/2 |W_l|^2``; ``R`` is ``r_l`` on the decayed
parameters. ``C``, ``d``, ``h(theta)`` and ``h(theta + delta)`` all use the same rows (the whole
mini-batch, as Martens & Grosse's code: a fraction "is dangerous"). No update clipping: A.2 has
none (kfac-jax forbids it with adaptive learning rates).

**Units of the damping.** kfcrun adds ``r + gamma`` to the whole block, ``F_hat_l + (r_l + gamma) I``
(KFC-pre's convention, Eqn 28 with ``damping = gamma``), where Martens & Grosse (2015) add a
per-factor ``g`` (``pi g`` and ``g / pi`` to the two factors), so that their damped block is about
``F_hat + g^2 I``. The config keys mean what they mean for KFC-pre: ``damping`` is the initial
``gamma``, ``weight_decay`` is ``r``.

**The gamma floor** (``gamma_floor=True``). A.2: "one should always choose gamma at least"
``sqrt(lambda + r)``, in Martens & Grosse's per-factor units: ``g^2 >= lambda + r``. The reason:
the quadratic model ``M`` has curvature ``F + (r + lambda) I``; a preconditioner with less
identity weight than that makes ``v_1`` large in directions that ``M``, and with it the trust
region, damps. In kfcrun's units the block's identity weight is ``r + gamma``, so the same
condition reads ``r + gamma >= r + lambda``, i.e. ``gamma >= lambda``. Both sides are
curvatures (loss per squared parameter): multiplying the loss by ``c`` (``F``, ``F_hat``, ``r``
and ``lambda`` with it) multiplies the floor by ``c``, while ``sqrt(lambda + r)`` read in kfcrun's
units would scale by ``sqrt(c)``. The floor is applied whenever the inverses are fitted
(``gamma <- max(gamma, lambda)``, and ``gamma_- >= lambda``), not between fits.

**The gamma search** (``gamma_search_decades``). A.2 moves ``gamma`` one step of
``gamma_decay ** T_2`` (x0.358 or x2.79) per ``T_2`` iterations towards a lower ``M(theta + delta)``.
On CIFAR-10 ``M`` as a function of ``gamma`` has two basins: a small-``gamma`` one (KFC's
direction) and, above ``gamma ~ 1`` (where ``v_1`` is nearly the gradient), a shallower one.
The local search climbs into whichever its start is nearest: from ``gamma_0 = 1`` it went to
471 in 300 iterations while ``M`` was lower at ``gamma <= 1e-3`` from iteration 40 on. Candidates a
whole decade apart up to ``gamma_search_decades`` decades either way let the search leave the
wrong basin; ``0`` is A.2 as written.

**The gamma ceiling** (``gamma_ceiling``, off by default; 1 in ``cifar10_kfac``). Far above the
curvature's own scale every block's ``v_1`` is nearly ``-grad h / gamma``: ``alpha`` absorbs
``1/gamma`` and ``M`` is flat in ``gamma``, so a search that goes there drifts out of the reach
of its candidates (to 1e9-1e14 in ``outputs/results/kfac_study5``). kfcrun holds
``gamma <= gamma_ceiling * max_l tr(F_hat_l) / n_l``,
the largest block's mean eigenvalue (:meth:`~kfcrun.curvature.CurvatureBlock.mean_eigenvalue`)
from the running factors at each fit. It is a curvature, so it scales with the loss as ``gamma``
and the floor do; where it crosses the floor, the floor wins. With ``lambda_init`` unset the
first fit lowers ``gamma_0`` to it before taking ``lambda_0 = gamma_0``, so that a large start
does not also start a wide trust region. On CIFAR-10 (0-255 inputs) the scale is 4.2e-4 at
initialization and grows to about 4 by iteration 300.

**kfcrun's constants** (the defaults) differ from Martens & Grosse's in two places, both
measured (batch 512, 300 iterations, CIFAR-10, averaged-parameter training NLL from
``gamma_0 = 1e-3 / 1e-1 / 1 / 10``; ``outputs/results/kfac_study4/README.md``):
``gamma_search_decades=4`` (A.2: 0) and ``lambda_decay=0.8`` (``lambda_- = 0.33`` per
``T_1 = 5``; MG: 0.95, ``lambda_- = 0.77``). With A.2's constants the four starts ended at
0.772 / 0.890 / 1.655 / 1.670 (the last two behind SGD's 1.369); with kfcrun's at
0.773 / 0.931 / 1.249 / 1.034. ``lambda`` starts at ``gamma_0`` and ``rho`` stays near 1 on
this problem, so with MG's decrease a large start is over-damped for 100-200 iterations.
The ceiling (``gamma_ceiling=1``, an option, not in A.2) brought the four starts to 0.773 / 0.897 / 1.001 /
0.977 with ``lambda_0 = gamma_0`` (``outputs/results/kfac_study6``), and with the start lowered
to it to one run, 0.770, as all four lie above the scale (``gamma_0 = 1e-5``, below it: 0.753;
``outputs/results/kfac_study7``). ``gamma_search_decades=0, lambda_decay=0.95`` is A.2 with
Martens & Grosse's constants.

**rho's denominator** (``rho_includes_lambda=True``). Martens & Grosse's own code divides by the
change of the model WITH the Tikhonov term ``lambda/2 |delta|^2`` (``denom = -val`` of the model it
minimized), and A.2 says the term is "added to M"; kfac-jax and TF K-FAC leave it out by default.
kfcrun follows the paper's code; ``rho_includes_lambda=False`` gives the libraries' choice (a
larger predicted decrease, so a smaller ``rho``, so ``lambda`` rises more readily).
``rho`` is ``-inf`` when the loss went up or is not finite (``lambda`` grows), as in their code.

**Host reads.** ``alpha`` and ``mu`` stay on the device. The step reads one scalar on
``T_1`` iterations (``rho``, for the rule of Eqn 38), the candidates' model values on ``T_2``
iterations (to keep one), and one scalar per step for the staleness guard if it is on.

Parameters outside the blocks (no block, or in ``skip_layers``) take ``v_1 = -grad h``, as in
KFC-pre; ``alpha`` and ``mu`` then scale them with everything else, and ``M`` includes them.
Normalization layers, grouped convolutions and embeddings get their blocks as in KFC-pre.
Gradient accumulation: ``step(closure, inputs=[x1, x2, ...])``; the quadratic model then uses
every example of every micro-batch, and the closure's loss must be over all of them.

**No learning-rate schedule.** ``alpha`` is chosen every step; a schedule would scale nothing
(the runner refuses ``trainer.lr_schedule`` with K-FAC).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, ClassVar

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
from kfcrun.optim.kfc_base import KFCOptimizerBase, StepInputs, parse_inverse_dtype, shared_arguments
from kfcrun.optim.knobs import LIKELIHOOD_RULE, SKIP_LAYERS_RULE
from kfcrun.optim.quadratic_model import (
    gamma_candidates,
    levenberg_marquardt,
    model_change,
    model_coefficients,
)
from kfcrun.optim.staleness import StalenessGuard
from kfcrun.schema import boolean, check_arguments, choice, integer, mapping_of_numbers, number

__all__ = ["KFAC"]

Vectors = dict[Tensor, Tensor]


class KFAC(KFCOptimizerBase):
    """K-FAC (App. A.2) with KFC blocks, as a ``torch.optim.Optimizer`` (see the module docstring).

    Usage::

        opt = KFAC(model, weight_decay=0.004, damping=1.0)
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)          # the MEAN loss
            loss.backward()
            opt.step(lambda: F.cross_entropy(model(x), y), inputs=x)

    The closure returns the mean mini-batch loss at the current parameters, WITHOUT the L2
    term (K-FAC adds it) and without calling ``backward``: it is a forward pass only, run
    under ``torch.no_grad()`` on the iterations that compute ``rho`` (every ``T_1``), once at
    ``theta`` and once at ``theta + delta``, on the same random state (the same dropout masks),
    with BatchNorm's running statistics restored after each call.

    Args:
        model: the network; maps inputs to the output of ``likelihood`` (by default logits
            of a softmax cross-entropy). Every module :func:`~kfcrun.curvature.kfc_layers`
            covers gets a block (convolutions of any groups, Linear, Embedding, normalization).
        lr: ``alpha`` held fixed; ``None`` (default): chosen every step from the quadratic model.
        momentum: ``mu`` held fixed; ``None`` (default): chosen every step from the quadratic model.
        weight_decay: ``r`` of the L2 term ``r/2 |W|^2`` for the covered layers' weights.
        layer_weight_decay: per-layer ``r`` by layer name (overrides ``weight_decay``).
        decay_biases: include biases in the L2 term (cuda-convnet does not).
        damping: the initial ``gamma`` (added as ``r + gamma`` to each block, see above).
        damping_mode: ``"exact"`` (Eqns 39-44, default) or ``"pi"`` (Eqn 28).
        lambda_init: the initial ``lambda``; ``None``: ``damping`` (Martens & Grosse's code
            starts ``g = sqrt(lambda + r)``, i.e. ``gamma = lambda`` here).
        lambda_every: ``T_1``, iterations between ``lambda`` updates (``rho`` is computed on
            them); ``None``: ``lambda`` fixed.
        lambda_decay: per-iteration factor: ``lambda_- = lambda_decay ** T_1``, ``lambda_+ = 1 / lambda_-``
            (Martens & Grosse: 0.95; kfcrun's 0.8, see "kfcrun's constants" above).
        lambda_min, lambda_max: bounds on ``lambda`` (``None``: no upper bound).
        rho_includes_lambda: whether ``rho``'s denominator includes ``lambda/2 |delta|^2``.
        gamma_every: ``T_2``, iterations between ``gamma`` updates; ``None``: ``gamma`` fixed.
        gamma_decay: per-iteration factor: ``gamma_- = gamma * gamma_decay ** T_2``,
            ``gamma_+ = gamma / gamma_decay ** T_2``.
        gamma_floor: keep ``gamma >= lambda`` (A.2's ``g >= sqrt(lambda + r)``; see above).
        gamma_search_decades: on ``T_2`` iterations also try ``gamma * 10^(+-j)``, ``j = 1..this``
            (one more fit of the inverses and one JVP each); 0: A.2's three candidates only.
            See "The gamma search" and "kfcrun's constants" above.
        gamma_search_at_start: also search on the first iteration (``alpha`` only, no ``v_2``),
            so that ``damping`` seeds the search instead of holding for ``T_2`` iterations. With
            ``gamma_floor`` no candidate goes below ``lambda``, which starts at ``damping`` unless
            ``lambda_init`` is set lower. kfcrun's option, not in A.2; off by default because it
            measured worse (the model prefers ``gamma`` of 0.3-1 on iteration 1, and from there
            most runs went to the large-``gamma`` basin: ``outputs/results/kfac_study5``).
        gamma_ceiling: keep ``gamma <= gamma_ceiling * max_l tr(F_hat_l) / n_l``, a multiple of
            the largest block's mean eigenvalue (from the running factors at each fit, one host
            read; it scales with the loss as ``gamma`` does). Far above that scale every block's
            ``v_1`` is nearly the gradient, ``alpha`` absorbs ``gamma`` and ``M`` is flat in it, so
            the search can drift beyond the reach of its candidates. Where ceiling and floor cross,
            the floor wins. With ``lambda_init=None`` the first fit lowers ``gamma_0`` to the
            ceiling before ``lambda_0 = gamma_0`` is taken, so every start above the curvature's
            scale is the same start. Only while ``gamma`` adapts (``gamma_every`` set); ``None``
            (default): no ceiling. kfcrun's option, not in A.2, on in ``cifar10_kfac``
            (``outputs/results/kfac_study7``). Off by default: on a small per-token sequence model
            (``tests/optim/test_networks.py``) the lowered start diverged.
        stat_decay: ``xi`` of the factors' running averages (Eqn 33), per statistics update.
        ema_warmup: ``xi_k = min(1 - 1/k, xi)`` for the ``k``-th statistics update (as KFC-pre).
        stats_every: ``T_s``; inverse_every: ``T_f``; refresh_until: both every iteration
            while ``k <= refresh_until`` (as KFC-pre).
        guard_rho: staleness guard: refresh the statistics and the inverses at the next step
            when ``rho`` fell below this (``None``: off).
        guard_nu_jump: staleness guard: refresh when ``nu = delta^T F delta`` grew by more than
            this factor from one step to the next (``None``: off). See :mod:`kfcrun.optim.staleness`.
        stats_fraction, init_examples, fisher, approx: the factor statistics, as for KFC-pre.
        likelihood, skip_layers, max_factor_dim: the output distribution and the coverage, as
            for KFC-pre. The closure's loss must be the likelihood's mean per-example NLL
            (:meth:`~kfcrun.curvature.Likelihood.loss`): ``rho`` compares its change with the
            model built from this Fisher.
        avg_decay, avg_mode, avg_start: iterate averaging, as for :class:`kfcrun.optim.SGD`.
        seed: seeds the generator of the sampled targets.
        omega_method, stats_from_training: the speed options, as for KFC-pre (same steps
            either way). KFC-pre's ``async_inverses`` is not offered: the ``gamma`` candidates
            of a ``T_2`` iteration are fitted together and chosen at once.
        chunk_size, inverse_dtype, record_inputs, grad_worker_fraction: as for KFC-pre. Data
            parallel (:meth:`distribute`), the quadratic model's Fisher products and ``h`` are
            summed over ranks, so every rank chooses the same ``alpha``, ``mu``, ``lambda``, ``gamma``.

    :meth:`step_stats` holds the last step's ``alpha``, ``mu``, ``lambda``, ``damping`` (``gamma``)
    and ``damping_ceiling`` (with ``gamma_ceiling``),
    ``m_decrease`` (``M(theta) - M(theta + delta)``, with ``lambda``), ``nu`` (``delta^T F delta``), the
    last ``rho`` and ``h_decrease`` (``h(theta) - h(theta + delta)``), and the shared statistics.

    The arguments annotated with a :class:`~kfcrun.schema.Rule` are the config knobs of
    ``configs/optimizer/kfac.yaml``; ``model``, ``avg_decay`` and ``seed`` are supplied by
    the runner; the rest are library-only.
    """

    needs_closure: ClassVar[bool] = True
    #: ``alpha`` is adapted every step: the runner refuses an lr schedule (see the module docstring).
    supports_lr_schedule: ClassVar[bool] = False
    phases: ClassVar[tuple[str, ...]] = ("statistics", "inverses", "precondition", "quadratic_model", "rho")

    def __init__(
        self,
        model: nn.Module,
        lr: Annotated[float | None, number("0.03", gt=0, optional=True)] = None,
        momentum: Annotated[float | None, number("0.9", ge=0, lt=1, optional=True)] = None,
        weight_decay: Annotated[float, number("0.004", ge=0)] = 0.0,
        *,
        layer_weight_decay: Annotated[dict[str, float] | None, mapping_of_numbers("{fc10: 1.0}")] = None,
        decay_biases: Annotated[bool, boolean()] = False,
        damping: Annotated[float, number("1.0", gt=0)] = 1.0,
        damping_mode: Annotated[DampingMode | str, choice(DampingMode)] = DampingMode.EXACT,
        lambda_init: Annotated[float | None, number("1.0", gt=0, optional=True)] = None,
        lambda_every: Annotated[int | None, integer(1, "5", optional=True)] = 5,
        lambda_decay: Annotated[float, number("0.8", gt=0, lt=1)] = 0.8,
        lambda_min: Annotated[float, number("1e-8", ge=0)] = 1e-8,
        lambda_max: Annotated[float | None, number("1000", gt=0, optional=True)] = None,
        rho_includes_lambda: Annotated[bool, boolean()] = True,
        gamma_every: Annotated[int | None, integer(1, "20", optional=True)] = 20,
        gamma_decay: Annotated[float, number("0.95", gt=0, lt=1)] = 0.95,
        gamma_floor: Annotated[bool, boolean()] = True,
        gamma_search_decades: Annotated[int, integer(0, "4")] = 4,
        gamma_search_at_start: Annotated[bool, boolean()] = False,
        gamma_ceiling: Annotated[float | None, number("1.0", gt=0, optional=True)] = None,
        stat_decay: Annotated[float, number("0.95", ge=0, lt=1)] = 0.95,
        ema_warmup: Annotated[bool, boolean()] = True,
        stats_every: Annotated[int, integer(1, "10")] = 10,
        inverse_every: Annotated[int, integer(1, "20")] = 20,
        refresh_until: Annotated[int, integer(0, "3")] = 3,
        guard_rho: Annotated[float | None, number("0.0", optional=True)] = None,
        guard_nu_jump: Annotated[float | None, number("10", gt=1, optional=True)] = None,
        stats_fraction: Annotated[float, number("0.25", gt=0, le=1)] = 1.0,
        init_examples: Annotated[int, integer(0, "10000")] = 0,
        fisher: Annotated[FisherType | str, choice(FisherType)] = FisherType.SAMPLED,
        approx: Annotated[OmegaModel | str, choice(OmegaModel)] = OmegaModel.KFC,
        likelihood: Annotated[Likelihood | str, LIKELIHOOD_RULE] = "cross_entropy",
        skip_layers: Annotated[Sequence[str], SKIP_LAYERS_RULE] = (),
        max_factor_dim: Annotated[int | None, integer(1, "8192", optional=True)] = DEFAULT_MAX_FACTOR_DIM,
        avg_decay: float | None = None,
        avg_mode: Annotated[str, choice(*AVERAGING_MODES)] = "paper",
        avg_start: Annotated[int, integer(0, "0")] = 0,
        seed: int = 0,
        chunk_size: int | None = None,
        inverse_dtype: Annotated[torch.dtype | str | None, choice("float64", "float32")] = torch.float64,
        record_inputs: bool = True,
        omega_method: Annotated[str, choice(*OMEGA_METHODS)] = "auto",
        stats_from_training: Annotated[bool, boolean()] = False,
        grad_worker_fraction: Annotated[float, number("1.0", ge=0, le=1)] = 1.0,
    ) -> None:
        compute_dtype = parse_inverse_dtype(KFAC, inverse_dtype)
        check_arguments(
            KFAC, {k: v for k, v in locals().items() if k not in ("inverse_dtype", "compute_dtype")}
        )
        if lambda_max is not None and lambda_max < lambda_min:
            raise ValueError(f"lambda_max={lambda_max} is below lambda_min={lambda_min}")
        super().__init__(
            model,
            {"lr": lr, "momentum": momentum},
            staleness_guard=StalenessGuard(nu_jump=guard_nu_jump, health_below=guard_rho),
            precondition=True,
            **shared_arguments(locals(), inverse_dtype=compute_dtype),
        )
        self.fixed_lr, self.fixed_momentum = lr, momentum
        self.lam = float(lambda_init if lambda_init is not None else damping)
        self._lambda_follows_damping = lambda_init is None  # lambda_0 = gamma_0, after the ceiling
        self.lambda_every, self.lambda_min, self.lambda_max = lambda_every, lambda_min, lambda_max
        self.lambda_minus = lambda_decay ** (lambda_every or 1)
        self.lambda_plus = 1.0 / self.lambda_minus
        self.rho_includes_lambda = rho_includes_lambda
        self.gamma_every, self.gamma_floor = gamma_every, gamma_floor
        self.gamma_step = gamma_decay ** (gamma_every or 1)
        self.gamma_search_decades = gamma_search_decades
        self.gamma_search_at_start = gamma_search_at_start
        self.gamma_ceiling = gamma_ceiling
        self._damping_ceiling = math.inf  # gamma_ceiling times the curvature scale, at the last fit
        self.rho: float | None = None  # the last rho computed (T_1 iterations)
        self._gamma_due = False
        self._fitted_dampings: list[float] = []  # what the last _fit_dampings returned

    # -- damping ---------------------------------------------------------------------------------
    @property
    def damping_floor(self) -> float:
        """The least ``gamma`` allowed: ``lambda`` with ``gamma_floor`` (see the module docstring), else 0."""
        return self.lam if self.gamma_floor else 0.0

    def _update_damping_ceiling(self) -> float:
        """``gamma_ceiling * max_l tr(F_hat_l) / n_l`` of the current factors (one host read); inf if off."""
        adapted = self.gamma_ceiling is not None and self.gamma_every is not None  # a fixed gamma stays
        scale = self.curvature.largest_mean_eigenvalue() if adapted else None
        if self.gamma_ceiling is not None and scale is not None and scale > 0:
            self._damping_ceiling = self.gamma_ceiling * scale
            if self.iteration == 0 and self._lambda_follows_damping:
                # the first fit: gamma_0 is lowered to the ceiling, and lambda_0 = gamma_0 with it
                self.damping = min(self.damping, self._damping_ceiling)
                self.lam = min(self.lam, self.damping)
        return self._damping_ceiling

    def _gamma_candidates(self) -> list[float]:
        """The ``T_2`` candidates: A.2's three, plus whole decades with ``gamma_search_decades``."""
        return gamma_candidates(
            self.damping,
            self.gamma_step,
            self.damping_floor,
            self.gamma_search_decades,
            ceiling=self._update_damping_ceiling(),
        )

    def _fit_dampings(self) -> list[float]:
        """``[gamma]`` (within floor and ceiling), or the candidates on a ``T_2`` iteration."""
        if self._gamma_due:
            self._fitted_dampings = self._gamma_candidates()
        else:
            self.damping = max(min(self.damping, self._update_damping_ceiling()), self.damping_floor)
            self._fitted_dampings = [self.damping]
        return self._fitted_dampings

    # -- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        inputs: StepInputs | None = None,
        targets: StepInputs | None = None,
    ) -> Any:
        """One K-FAC iteration (see the module docstring). ``.grad`` must hold the mean-loss gradient.

        Args:
            closure: returns the mean mini-batch loss without the L2 term, a forward pass only
                (see the class docstring); needed on the iterations that compute ``rho``.
            inputs: the mini-batch inputs, or the list of micro-batches whose gradients
                ``.grad`` holds (the closure's loss must then be over all of them);
                default: the recorded training forwards since the last step.
            targets: training labels (a list for micro-batches), needed only when
                :attr:`needs_labels`.

        Returns:
            ``h(theta)`` (with the L2 term) on iterations that compute ``rho``, else ``None``.
        """
        batches, labels = self._step_batches(inputs, targets)
        k = self.iteration + 1
        rho_due = self.lambda_every is not None and k % self.lambda_every == 0
        if rho_due and closure is None:
            raise RuntimeError(
                "KFAC.step() needs a closure returning the mini-batch loss on the iterations that adapt "
                "lambda (every lambda_every); call step(closure, inputs=x), or set lambda_every=None"
            )
        self._gamma_due = self.gamma_every is not None and (
            k % self.gamma_every == 0 or (k == 1 and self.gamma_search_at_start)
        )

        refitted = self._refresh_curvature(k, batches, labels, force=self.guard.due())
        candidates = [self.damping]
        if self._gamma_due:
            # a refit on this iteration already fitted the candidates: reuse them (no second host read)
            candidates = self._fitted_dampings if refitted else self._gamma_candidates()
            if not refitted:
                self._update_inverses(candidates)
        self._gamma_due = False

        with self.timer("precondition"):
            grads = self._gradients_of_h()
            proposals = [self._negated(self._directions(grads, index)) for index in range(len(candidates))]
        previous = self._previous_update() if self._has_previous_update else None
        with self.timer("quadratic_model"):
            chosen, model = self._quadratic_model(batches, labels, grads, proposals, previous)
        if len(candidates) > 1:
            self.curvature.select_damping(chosen)
            self.damping = candidates[chosen]

        rewind = random_state_rewinder(self.device)  # h(theta) and h(theta + delta) draw the same masks
        h_before = self._objective(closure, rewind) if rho_due and closure is not None else None
        alpha, mu = model["w"][0], model["w"][1] if previous is not None else None
        updates = {p: v.mul_(alpha.to(v.dtype)) for p, v in proposals[chosen].items()}
        momentum = mu if mu is not None else torch.zeros((), dtype=torch.float64, device=alpha.device)
        updates, momentum = self._finite_or_nothing(updates, momentum)
        self._apply_momentum(updates, momentum.to(updates[next(iter(updates))].dtype))

        if rho_due and closure is not None and h_before is not None:
            with self.timer("rho"):
                h_after = self._objective(closure, rewind)
                self._adapt_lambda(h_before, h_after, model)
        self.guard.observe(nu=model["nu"], health=model["rho"] if rho_due else None)

        self.iteration = k
        self.averaging.update(self._params(), k)
        self._record_stats(model)
        return h_before

    @staticmethod
    def _finite_or_nothing(updates: Vectors, momentum: Tensor) -> tuple[Vectors, Tensor]:
        """``(alpha v_1, mu)`` if all of it is finite, else no step at all: zeros (no host read).

        A failed model (non-finite ``C`` or ``d``: e.g. a JVP through BatchNorm over a
        near-constant batch overflows) gives ``alpha = mu = 0``, but ``0 * inf`` is NaN; one
        non-finite entry would poison every parameter through ``theta + delta``. The step is
        skipped instead and ``delta_prev`` reset; ``rho`` is then ``-inf`` on ``T_1``
        iterations (nothing decreased), so ``lambda`` grows.
        """
        finite = torch.isfinite(momentum)
        for v in updates.values():
            finite = finite & torch.isfinite(v).all()
        kept = {p: torch.where(finite, v, torch.zeros_like(v)) for p, v in updates.items()}
        return kept, torch.where(finite, momentum, torch.zeros_like(momentum))

    @staticmethod
    def _negated(directions: Vectors) -> Vectors:
        for v in directions.values():
            v.neg_()
        return directions

    @property
    def _has_previous_update(self) -> bool:
        return any("momentum_buffer" in self.state[p] for p in self._params())

    def _quadratic_model(
        self,
        batches: Batches,
        targets: Batches | None,
        grads: Vectors,
        proposals: list[Vectors],
        previous: Vectors | None,
    ) -> tuple[int, dict[str, Tensor]]:
        """``C``, ``d`` and ``(alpha, mu)`` for every candidate; the index of the lowest ``M`` and its model.

        One JVP per candidate direction and one for ``delta_prev``, all on the same rows.
        """
        vectors = [*proposals, *([previous] if previous is not None else [])]
        fisher = self._fisher_gram(batches, targets, vectors).to(torch.float64)
        count = len(vectors)
        decay = torch.zeros(count, count, dtype=torch.float64, device=fisher.device)
        euclid = torch.zeros_like(decay)
        for i in range(count):
            for j in range(i, count):
                r_term = self._decay_form(vectors[i], vectors[j])
                if r_term is not None:
                    decay[i, j] = decay[j, i] = r_term.to(torch.float64)
                euclid[i, j] = euclid[j, i] = _inner(vectors[i], vectors[j])
        slopes = torch.stack([_inner(grads, v) for v in vectors])
        fixed = [self.fixed_lr, self.fixed_momentum]
        models = []
        for index in range(len(proposals)):
            rows = [index, count - 1] if previous is not None else [index]
            select = torch.tensor(rows, device=fisher.device)
            f = fisher[select][:, select]
            r = decay[select][:, select]
            e = euclid[select][:, select]
            c = f + r + self.lam * e
            d = slopes[select]
            w = model_coefficients(c, d, fixed)
            change = model_change(c, d, w)
            models.append(
                {
                    "w": w,
                    "change": change,
                    "change_without_lambda": change - 0.5 * self.lam * (w @ (e @ w)),
                    "nu": w @ (f @ w),
                    "rho": torch.full((), math.nan, dtype=torch.float64, device=fisher.device),
                }
            )
        chosen = 0
        if len(models) > 1:
            chosen = int(
                torch.stack([m["change"] for m in models]).argmin()
            )  # first of equal values: current
        return chosen, models[chosen]

    def _objective(self, closure: Callable[[], Any], rewind: Callable[[], None]) -> Tensor:
        """``h`` at the current parameters: the closure's mean loss plus ``sum r/2 |W|^2`` (float64).

        The forward pass leaves no trace: it runs on the random state ``rewind`` restores (the
        same for ``h(theta)`` and ``h(theta + delta)``), the caller's random state is kept, and
        the model's buffers (BatchNorm running statistics) are restored afterwards.
        """
        with self._isolated_forward():
            rewind()
            loss = closure()
        loss = torch.as_tensor(loss).detach().to(torch.float64)
        loss = self._global_mean(loss, 1, None, "objective")  # data parallel: the global batch's mean
        params = {p: p.detach() for p in self._params()}
        l2 = self._decay_form(params, params)
        return loss + 0.5 * l2.to(torch.float64) if l2 is not None else loss

    @contextlib.contextmanager
    def _isolated_forward(self) -> Iterator[None]:
        buffers = list(self.model.buffers())
        saved = [b.detach().clone() for b in buffers]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.recorder.paused():
            try:
                yield
            finally:
                for buffer, value in zip(buffers, saved, strict=True):
                    buffer.copy_(value)

    def _adapt_lambda(self, h_before: Tensor, h_after: Tensor, model: dict[str, Tensor]) -> None:
        """Eqns 37-38: ``rho`` from the actual and the predicted change, then ``lambda`` (one host read)."""
        predicted = model["change"] if self.rho_includes_lambda else model["change_without_lambda"]
        actual = h_after - h_before
        rho = actual / predicted
        failed = ~torch.isfinite(actual) | (actual > 0) | ~torch.isfinite(predicted)  # a failed model too
        model["rho"] = torch.where(failed, torch.full_like(rho, -math.inf), rho)
        self.rho = float(model["rho"])
        lam = levenberg_marquardt(self.lam, self.rho, self.lambda_minus, self.lambda_plus)
        upper = self.lambda_max if self.lambda_max is not None else math.inf
        self.lam = min(max(lam, self.lambda_min), upper)
        model["h_change"] = actual

    def _record_stats(self, model: dict[str, Tensor]) -> None:
        w = model["w"]
        self._last_stats = {
            "alpha": w[0],
            "mu": w[1] if w.numel() > 1 else torch.zeros((), dtype=w.dtype, device=w.device),
            "lambda": torch.tensor(self.lam, dtype=torch.float64),
            "damping": torch.tensor(self.damping, dtype=torch.float64),
            "m_decrease": -model["change"],
            "nu": model["nu"],
        }
        if self.rho is not None:
            self._last_stats["rho"] = torch.tensor(self.rho, dtype=torch.float64)
        if "h_change" in model:
            self._last_stats["h_decrease"] = -model["h_change"]
        if self.refresher.pi_mean is not None:
            self._last_stats["pi_mean"] = self.refresher.pi_mean
        if math.isfinite(self._damping_ceiling):
            self._last_stats["damping_ceiling"] = torch.tensor(self._damping_ceiling, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        """The shared state plus the adapted ``lambda``, ``gamma``, the last ``rho`` and damping ceiling."""
        state = super().state_dict()
        state["kfac"] = {
            "lambda": self.lam,
            "gamma": self.damping,
            "rho": self.rho,
            "damping_ceiling": self._damping_ceiling,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the model's parameters are loaded separately)."""
        state_dict = dict(state_dict)
        adapted = state_dict.pop("kfac")
        self.lam, self.damping, self.rho = float(adapted["lambda"]), float(adapted["gamma"]), adapted["rho"]
        self._damping_ceiling = float(adapted.get("damping_ceiling", math.inf))  # absent in older checkpoints
        super().load_state_dict(state_dict)


def random_state_rewinder(device: torch.device) -> Callable[[], None]:
    """A function that puts torch's random state (CPU, and ``device`` if CUDA) back to what it is now."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    return rewind


def _inner(a: Vectors, b: Vectors) -> Tensor:
    """``sum_p <a_p, b_p>`` in float64 (0-d)."""
    terms = [(a[p].square() if a is b else a[p] * b[p]).sum().to(torch.float64) for p in a]
    return torch.stack(terms).sum()
