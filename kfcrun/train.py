"""The training loop, in named phases.

One run (:class:`Trainer`): load the data once as tensors on the device, build the
network and the optimizer, restore a checkpoint or start fresh, let the optimizer
initialize (KFC-pre's initial curvature estimate), open the run's files, then iterate

    batch -> forward -> loss -> backward -> optimizer.step(inputs=..., targets=...)

and every ``trainer.eval_every`` iterations evaluate the AVERAGED parameters (the
reported result, paper App. A.1) and the current ones on a fixed training subset and
on the full test set. The optimizer is used only through
:class:`~kfcrun.optim.protocol.TrainingOptimizer`.

The training clock (``train_time_s``) counts only the training steps: the device is
synchronized before the clock is read, and data preparation, evaluation, logging and
checkpointing happen outside the timed region (paper Sec. 5.2 plots against it).

Nothing is lost: a fresh run writes nothing before training starts (a failed start
leaves no files, :mod:`kfcrun.run_dir`); ``config.yaml`` is rewritten with every
checkpoint, from the config stored in it (:mod:`kfcrun.resume`); a signal stops the run
after the current step with a checkpoint (:mod:`kfcrun.signals`); a diverging loss,
finite or not, stops it without overwriting the last good checkpoint
(:mod:`kfcrun.divergence`).

Data parallel (``torchrun``, Slurm tasks; :mod:`kfcrun.launch`, :mod:`kfcrun.distributed`):
``trainer.batch_size`` is the global batch; every rank draws the same global batch from
the epoch permutation and keeps its interleaved slice (rank ``r``: positions ``r, r+P, ...``,
so ``batch_size`` must be a multiple of ``P``). The forward/backward runs through
DistributedDataParallel (gradients averaged over ranks); KFC-pre's curvature is
averaged, split and shared by its communicator. After every step ONE small all-reduce
gives every rank the global mini-batch loss and whether any rank was signalled, so all
ranks check divergence on the same numbers and stop at the same iteration. Only rank 0
writes (config, ``run.json``, metrics, TensorBoard, checkpoints), shows progress and
evaluates (on the whole evaluation sets; the others wait at the next step's all-reduce).
A checkpoint holds the reduced state once; every rank reads it to resume.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from kfcrun.builders import build_model, build_optimizer
from kfcrun.checkpoint import checkpoint_path, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kfcrun.data import DatasetConfig, DeviceBatches, ImageData, Preprocessor
from kfcrun.distributed import DataParallelCurvatureComm, DistributedContext, wrap_data_parallel
from kfcrun.divergence import DivergenceGuard, DivergenceSettings
from kfcrun.errors import CheckpointError, ConfigError, KfcrunError, TrainingDivergedError
from kfcrun.evaluate import batchnorm_statistics_for_current_parameters, evaluate
from kfcrun.launch import context, share_job
from kfcrun.logging import MetricsLogger, read_metrics, run_record, truncate_metrics, write_json
from kfcrun.optim.constraints import apply_max_norm
from kfcrun.optim.lr_schedule import apply_lr_factor, lr_factor
from kfcrun.optim.protocol import TrainingOptimizer
from kfcrun.resume import config_file, config_text, write_config
from kfcrun.settings import LoggerSettings, TrainerSettings, from_section
from kfcrun.signals import GracefulStop, RunInterrupted, signal_name

log = logging.getLogger(__name__)

__all__ = ["Clock", "Trainer", "resolve_device", "total_iterations", "train"]


@dataclass
class Clock:
    """Training wall-clock: the sum of timed step durations, in seconds."""

    device: torch.device
    total_s: float = 0.0
    _start: float | None = field(default=None, repr=False)

    def start(self) -> None:
        """Start timing a step, after waiting for queued device work."""
        synchronize(self.device)
        self._start = time.perf_counter()

    def stop(self) -> None:
        """Wait for the device, then add the seconds since :meth:`start` to ``total_s``."""
        synchronize(self.device)
        assert self._start is not None, "Clock.stop() without start()"
        self.total_s += time.perf_counter() - self._start
        self._start = None


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; a CUDA name without a device is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"config error: trainer.device={name} but no CUDA device is available; allowed here: auto | cpu; "
            "fix: trainer.device=auto"
        )
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dataset_config(cfg: DictConfig) -> DatasetConfig:
    """The ``dataset`` section as :class:`~kfcrun.data.DatasetConfig`."""
    return from_section(DatasetConfig, OmegaConf.to_container(cfg.dataset, resolve=True))  # type: ignore[arg-type]


def load_data(cfg: DictConfig) -> ImageData:
    """The run's dataset, as uint8 tensors (decoded once, then cached)."""
    return dataset_config(cfg).load(seed=cfg.seed, progress=cfg.trainer.progress)


def total_iterations(cfg: DictConfig, batches_per_epoch: int) -> int:
    """``trainer.max_iters`` or ``trainer.max_epochs`` (in updates), whichever comes first."""
    limits = []
    if cfg.trainer.max_iters is not None:
        limits.append(int(cfg.trainer.max_iters))
    if cfg.trainer.max_epochs is not None:
        limits.append(math.ceil(float(cfg.trainer.max_epochs) * batches_per_epoch))
    return min(limits)


class _NoLogger:
    """The metrics logger of ranks other than 0: they write nothing."""

    def row(self, row: dict[str, Any]) -> None:
        """Drop a metrics row."""

    def scalars(self, values: dict[str, Any], step: int, train_time_s: float) -> None:
        """Drop per-step scalars."""

    def close(self) -> None:
        """Nothing to close."""


class RankLostError(KfcrunError):
    """Another rank of a data-parallel run died or became unreachable."""

    exit_code = 4


class Trainer:
    """One training run, as named phases.

    The phases are :meth:`setup`, :meth:`restore_or_start`, :meth:`initialize_optimizer`,
    :meth:`open_run_files`, then :meth:`fit` (steps, logging, evaluation, checkpoints).

    Args:
        cfg: the validated run config.
        run_dir: where everything is written.
        stop: the run's signal handlers (:class:`~kfcrun.signals.GracefulStop`, entered by
            the caller); ``None``: signals are not handled here.
        resume_overrides: for a resumed run, the command's overrides (recorded in ``run.json``).
    """

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: str | Path,
        stop: GracefulStop | None = None,
        resume_overrides: Sequence[str] = (),
        ctx: DistributedContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        #: Rank 0 (or the only process): the one that writes, prints and evaluates.
        self.is_main = ctx is None or ctx.is_main
        self.world_size = 1 if ctx is None else ctx.world_size
        self.rank = 0 if ctx is None else ctx.rank
        self.run_dir = Path(run_dir)
        self.settings: TrainerSettings = from_section(TrainerSettings, cfg.trainer)
        self.logger_settings: LoggerSettings = from_section(LoggerSettings, cfg.logger)
        self.device = resolve_device(self.settings.device)
        if ctx is not None:
            if self.device.type == "cuda":
                self.device = ctx.device  # one GPU per local rank
            ctx.device = self.device
        self.clock = Clock(self.device)
        self.iteration = 0
        self.resumed = cfg.resume is not None
        self.resume_overrides = list(resume_overrides)
        self.checkpoint_file = checkpoint_path(self.run_dir)
        self.last_checkpoint: tuple[int, Path] | None = None
        self.last_row: dict[str, Any] = {}
        self.wall_start = time.perf_counter()
        self.stop = stop if stop is not None else GracefulStop()
        self.guard = DivergenceGuard(
            from_section(DivergenceSettings, cfg.get("divergence") or {}), self._where_and_fix
        )

    # -- phase 1: data, network, optimizer --------------------------------------------------------
    def setup(self) -> None:
        """Load the data onto the device, then build the network and the optimizer (in that order: RNG)."""
        cfg, device, settings = self.cfg, self.device, self.settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        seed_everything(cfg.seed)

        data = load_data(cfg)
        self.data = data
        if settings.batch_size > len(data.train_images):
            raise ConfigError(
                f"config error: trainer.batch_size={settings.batch_size} is larger than the "
                f"{len(data.train_images)} training examples of {data.source}; allowed: at most "
                f"{len(data.train_images)}; fix: e.g. trainer.batch_size={min(128, len(data.train_images))}"
            )
        if settings.batch_size % self.world_size:
            fixed = max(self.world_size, settings.batch_size // self.world_size * self.world_size)
            raise ConfigError(
                f"config error: trainer.batch_size={settings.batch_size} (the global batch) is not a "
                f"multiple of the {self.world_size} ranks; allowed: multiples of {self.world_size}; fix: "
                f"trainer.batch_size={fixed}"
            )
        self.preprocess: Preprocessor = dataset_config(cfg).preprocessor(data.train_images).to(device)
        self.batches = DeviceBatches(
            data.train_images.to(device), data.train_labels.to(device), settings.batch_size, seed=cfg.seed
        )
        subset = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(cfg.seed))
        subset = subset[: settings.train_eval_size]
        test = torch.arange(len(data.test_images))
        if settings.test_eval_size is not None:  # a fixed random subset, for CPU-sized runs
            test = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed + 2))
            test = test[: settings.test_eval_size]
        self.eval_sets = {
            "train": (data.train_images[subset].to(device), data.train_labels[subset].to(device)),
            "test": (data.test_images[test].to(device), data.test_labels[test].to(device)),
        }
        epoch = self.batches.batches_per_epoch
        self.max_iters = total_iterations(cfg, epoch)
        self.eval_every = settings.iterations(settings.eval_every, epoch)
        self.checkpoint_every = (
            None
            if settings.checkpoint_every is None
            else settings.iterations(settings.checkpoint_every, epoch)
        )

        self.augment = dataset_config(cfg).augmentation(cfg.seed)
        self.model = build_model(cfg.model, cfg.dataset).to(device)
        self.optimizer: TrainingOptimizer = build_optimizer(
            cfg.optimizer, self.model, settings.batch_size, seed=cfg.seed
        )
        #: Whether the optimizer averages its iterates (else "averaged" evaluations see the current ones).
        self.averaging = cfg.optimizer.get("avg_timescale") is not None
        #: The module the training forward runs through (DDP in a data-parallel run).
        self.train_model: torch.nn.Module = self.model
        if self.ctx is not None:
            self.train_model = wrap_data_parallel(self.model, self.ctx)
            distribute = getattr(self.optimizer, "distribute", None)  # optimizers with a curvature
            if distribute is not None:
                fraction = float(getattr(self.optimizer, "grad_worker_fraction", 1.0))
                curvature = self.optimizer.curvature  # type: ignore[attr-defined]
                distribute(DataParallelCurvatureComm(self.ctx, curvature.blocks, fraction))
        if settings.compile:
            if getattr(self.optimizer, "stats_from_training", False):
                raise ConfigError(
                    "config error: trainer.compile=true with optimizer.stats_from_training=true: a compiled "
                    "forward cannot record the layers for the statistics; fix: set one of them to false"
                )
            self.train_model = cast("torch.nn.Module", torch.compile(self.train_model))
        #: Autocast dtype of the training forward (``None``: float32) and the fp16 loss scaler.
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
        if settings.lr_schedule != "constant" and not getattr(self.optimizer, "supports_lr_schedule", True):
            raise ConfigError(
                f"config error: trainer.lr_schedule={settings.lr_schedule} but optimizer "
                f"{cfg.optimizer.name} adapts its own step size; allowed: constant; "
                "fix: trainer.lr_schedule=constant"
            )

    # -- phase 2: resume, or start fresh --------------------------------------------------------
    def restore_or_start(self) -> None:
        """Load the last checkpoint of ``cfg.resume``; a fresh run starts at 0 and writes nothing yet.

        ``config.yaml`` is rewritten from the checkpoint's own config, so that it describes
        the state the run continues from even if an earlier process died between writing
        the checkpoint and ``config.yaml``.
        """
        if not self.resumed:
            return
        state = load_checkpoint(self.checkpoint_file, map_location=self.device)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise CheckpointError(
                f"checkpoint {self.checkpoint_file} does not fit this run's config ({first[:200]}); "
                "fix: resume without the overrides that change the network or the optimizer"
            ) from err
        self.batches.load_state_dict(state["batches"])
        self.iteration, self.clock.total_s = state["iteration"], state["train_time_s"]
        set_rng_state(state["rng"])
        self.guard.load_state_dict(state.get("divergence", {}))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world_size and self.is_main:
            log.warning(
                "resuming a run checkpointed on %d rank(s) on %d: it continues correctly but is not "
                "bit-identical to continuing on %d (sums over ranks are taken in a different order)",
                saved_world,
                self.world_size,
                saved_world,
            )
        self.resumed_world_size = saved_world
        metrics = self.run_dir / "metrics.jsonl"
        if not self.is_main:
            self.last_checkpoint = (self.iteration, self.checkpoint_file)
            return
        if isinstance(state.get("config"), dict):
            write_config(self.run_dir, state["config"])
        try:
            truncate_metrics(metrics, self.iteration)
            rows = read_metrics(metrics) if metrics.exists() else []
        except ValueError as err:  # a damaged line other than a torn last one: not ours to guess at
            raise CheckpointError(
                f"{err}; the checkpoint is intact; fix: repair or delete that line, then resume again"
            ) from err
        self.last_row = rows[-1] if rows else {}
        self.last_checkpoint = (self.iteration, self.checkpoint_file)
        self._remember_checkpoint()
        log.info(
            "resuming %s at iteration %d (%.1f s of training)",
            self.run_dir,
            self.iteration,
            self.clock.total_s,
        )

    # -- phase 3: the optimizer's own initialization (on the training clock) --------------------
    def initialize_optimizer(self) -> None:
        """Feed the optimizer ``init_examples`` training examples before the first step.

        KFC-pre estimates its factors on a large training subset (Algorithm 1); that is
        part of the method, so it is on the training clock.
        """
        self.wall_start = time.perf_counter()
        if self.iteration != 0 or self.optimizer.init_examples <= 0:
            return
        count = min(self.optimizer.init_examples, len(self.data.train_images))
        count -= count % self.world_size  # equal shards of every batch (data parallel)
        with tqdm(
            total=count,
            unit="img",
            desc="initial curvature estimate",
            disable=not (self.settings.progress and self.is_main),
            file=sys.stderr,
            dynamic_ncols=True,
        ) as bar:
            self.clock.start()
            self.optimizer.initialize(self._initial_batches(count, bar))
            self.clock.stop()
        log.info("estimated initial curvature factors in %.1f s", self.clock.total_s)

    def _initial_batches(self, count: int, bar: tqdm) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, labels)`` batches of a fixed random training subset.

        The subset is drawn with its own seed (``seed + 1``), apart from the data order.
        """
        images, labels = self.data.train_images, self.data.train_labels
        generator = torch.Generator().manual_seed(self.cfg.seed + 1)
        order = torch.randperm(len(images), generator=generator)[:count]
        size = self.settings.batch_size
        for start in range(0, count, size):
            idx = order[start : start + size][self.rank :: self.world_size]  # this rank's slice
            yield self.preprocess(images[idx].to(self.device)), labels[idx].to(self.device)
            bar.update(len(idx) * self.world_size)  # after the optimizer has used the batch

    # -- phase 4: the run's files ---------------------------------------------------------------
    def open_run_files(self) -> None:
        """Create the run's files: ``config.yaml`` (fresh runs), ``run.json``, the metrics logger.

        This is the first write of a fresh run: everything before it can fail without
        leaving files behind. A resume appends its overrides to ``run.json``. Ranks other
        than 0 write nothing.
        """
        if not self.is_main:
            self.logger: MetricsLogger | _NoLogger = _NoLogger()
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resumed:
            write_config(self.run_dir, self._config())
        record = run_record(
            self.device,
            {
                "run_dir": str(self.run_dir.resolve()),
                "max_iters": self.max_iters,
                "data": self.data.source,
                "world_size": self.world_size,
            },
        )
        _update_run_json(
            self.run_dir,
            record,
            resumed=self.resumed,
            iteration=self.iteration,
            overrides=self.resume_overrides,
        )
        self.logger = MetricsLogger(
            self.run_dir,
            start_walltime=time.time() - self.clock.total_s,
            purge_step=self.iteration + 1 if self.resumed else None,
            tensorboard=self.logger_settings.tensorboard,
        )

    # -- phase 5: the loop ------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``max_iters``: steps, then logging, evaluation and checkpoints when due.

        A signal (:attr:`stop`) ends the loop after the current step with a checkpoint.
        """
        self.model.train()
        self.stop.arm()
        recent_losses: list[torch.Tensor] = []
        bar = tqdm(
            total=self.max_iters,
            initial=self.iteration,
            disable=not (self.settings.progress and self.is_main),
            file=sys.stderr,
            dynamic_ncols=True,
            desc=self.cfg.name,
        )
        try:
            while self.iteration < self.max_iters and not self.out_of_time():
                loss = self.train_step()
                if self.ctx is not None:
                    loss = self._agree_after_step(loss)
                recent_losses.append(loss)
                last = self.iteration == self.max_iters or self.out_of_time()
                eval_due = self.iteration % self.eval_every == 0 or last
                ckpt_due = self.checkpoint_every is not None and (
                    self.iteration % self.checkpoint_every == 0 or last
                )
                if self.iteration % self.settings.log_every == 0 or eval_due or ckpt_due:
                    self.log_steps(torch.stack(recent_losses), bar, final=self.iteration == self.max_iters)
                    recent_losses.clear()
                if eval_due and self.is_main:
                    self.last_row = self.evaluation_row()
                    self.logger.row(self.last_row)
                    self._show(bar, loss)
                if ckpt_due:
                    self.checkpoint()
                bar.update(1)
                if self.stop.requested is not None and self.iteration < self.max_iters:
                    self._stop_on_signal(self.stop.requested)  # (at the last step the run just ends)
        finally:
            bar.close()
            self.logger.close()
        return self.last_row

    def _agree_after_step(self, loss: torch.Tensor) -> torch.Tensor:
        """ONE all-reduce: the global mini-batch loss, and whether any rank was signalled.

        Every rank then holds the same loss (the divergence guard decides alike everywhere)
        and stops after the same step. Under ``trainer.max_train_seconds`` rank 0's clock
        decides for all.
        """
        assert self.ctx is not None
        budget_spent = float(self.is_main and self.out_of_time())
        flags = torch.tensor(
            [float(loss) / self.world_size, float(self.stop.requested is not None), budget_spent],
            dtype=torch.float64,
            device=self.device if self.device.type == "cuda" else torch.device("cpu"),
        )
        self.ctx.all_reduce(flags, "control")
        if flags[1] > 0 and self.stop.requested is None:
            self.stop.requested = signal.SIGTERM  # another rank was signalled: stop with it
        self._budget_spent = bool(flags[2] > 0)
        return flags[0].to(loss.dtype)

    def out_of_time(self) -> bool:
        """Whether ``trainer.max_train_seconds`` of training time are used up (a time budget)."""
        budget = self.settings.max_train_seconds
        if self.ctx is not None and not self.is_main:
            return getattr(self, "_budget_spent", False)
        return budget is not None and self.clock.total_s >= budget

    def train_step(self) -> torch.Tensor:
        """One timed update; returns the mini-batch loss (on the device, no sync)."""
        images, labels = next(self.batches)
        if self.augment is not None:  # a pure function of (seed, iteration): resumes bitwise
            images = self.augment(images, self.iteration + 1)
        if self.world_size > 1:  # this rank's interleaved slice of the global batch
            images, labels = images[self.rank :: self.world_size], labels[self.rank :: self.world_size]
        inputs = self.preprocess(images)  # data preparation stays off the training clock
        settings = self.settings
        if settings.lr_schedule != "constant":
            factor = lr_factor(
                settings.lr_schedule,
                self.iteration + 1,
                self.max_iters,
                settings.lr_milestones,
                settings.lr_decay,
            )
            apply_lr_factor(self.optimizer, factor)  # type: ignore[arg-type]
        self.clock.start()
        self.optimizer.zero_grad(set_to_none=True)
        half = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=half, enabled=half is not None):
            logits = self.train_model(inputs)
            loss = F.cross_entropy(logits, labels)
        scaled = self.scaler.scale(loss)  # the loss itself unless fp16
        backward = getattr(self.optimizer, "backward", None)
        if backward is not None:  # KFC-pre: may take the factor statistics from this pass first
            backward(scaled, logits, labels, scaler=self.scaler)
        else:
            scaled.backward()
        closure = _loss_closure(self.model, inputs, labels) if self.optimizer.needs_closure else None
        targets = labels if self.optimizer.needs_labels else None
        if self.scaler.is_enabled():  # unscales .grad, skips the step if it is not finite
            optimizer = cast("torch.optim.Optimizer", self.optimizer)
            self.scaler.step(optimizer, closure, inputs=inputs, targets=targets)
            self.scaler.update()
        else:
            self.optimizer.step(closure, inputs=inputs, targets=targets)
        if self.cfg.model.max_norm is not None:
            apply_max_norm(self.model, self.cfg.model.max_norm)
        self.clock.stop()
        self.iteration += 1
        return loss.detach()

    def log_steps(self, losses: torch.Tensor, bar: tqdm, final: bool = False) -> None:
        """Check the recent losses and log them with the optimizer's step statistics.

        The check is :class:`~kfcrun.divergence.DivergenceGuard`'s; ``final``: these are the run's last steps.
        """
        self.guard.observe(losses, self.iteration, final=final)
        if not self.is_main:
            return
        self.logger.scalars(
            {
                "train/batch_loss": losses.mean(),
                **{f"kfc/{k}": v for k, v in self.optimizer.step_stats().items()},
            },
            step=self.iteration,
            train_time_s=self.clock.total_s,
        )
        self._show(bar, losses[-1])

    def _show(self, bar: tqdm, loss: torch.Tensor) -> None:
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            test_err=_pct(self.last_row.get("test/error")),
            train_s=f"{self.clock.total_s:.0f}",
            refresh=False,
        )

    def evaluation_row(self) -> dict[str, Any]:
        """Averaged (and current) parameters on the training subset and the test set."""
        row: dict[str, Any] = {
            "iter": self.iteration,
            "examples": self.iteration * self.settings.batch_size,
            "epoch": self.iteration / self.batches.batches_per_epoch,
            "train_time_s": self.clock.total_s,
            "elapsed_s": time.perf_counter() - self.wall_start,
        }
        with self.optimizer.averaged_parameters(), self._batchnorm_for_averaged_parameters():
            row.update(self._evaluate(suffix=""))
        if self.settings.eval_current:
            row.update(self._evaluate(suffix="_current"))
        row.update({f"time/{k}": v for k, v in self.optimizer.phase_times.items()})
        return row

    def _batchnorm_for_averaged_parameters(self) -> AbstractContextManager[None]:
        """BatchNorm statistics recomputed for the averaged parameters (``trainer.averaged_bn``)."""
        if self.settings.averaged_bn == "running" or not self.averaging:
            return nullcontext()
        images, _ = self.eval_sets["train"]
        return batchnorm_statistics_for_current_parameters(
            self.model, images, self.preprocess, self.settings.eval_batch_size
        )

    def _evaluate(self, suffix: str) -> dict[str, Any]:
        out = {}
        for split, (images, labels) in self.eval_sets.items():
            metrics = evaluate(self.model, images, labels, self.preprocess, self.settings.eval_batch_size)
            out.update({f"{split}/{key}{suffix}": value for key, value in metrics.items()})
        return out

    def checkpoint(self) -> bool:
        """Write ``checkpoints/last.pt`` atomically, then ``config.yaml`` from the config stored in it.

        Not while the loss is above the divergence threshold (the last good checkpoint
        stays); never with non-finite parameters. Returns whether a checkpoint was written.
        """
        # Never overwrite the last good checkpoint with parameters that already diverged.
        if not bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()):
            raise TrainingDivergedError(
                f"parameters became non-finite by iteration {self.iteration}; {self._where_and_fix()}"
            )
        if self.guard.suspect:
            log.warning(
                "no checkpoint at iteration %d: the training loss (%.4g) is above the divergence threshold; "
                "%s",
                self.iteration,
                self.guard.last_mean,
                _where(self.last_checkpoint),
            )
            return False
        config = self._config()
        optimizer_state = self.optimizer.state_dict()  # data parallel: may be a collective
        if self.is_main:
            save_checkpoint(
                self.checkpoint_file,
                {
                    "iteration": self.iteration,
                    "train_time_s": self.clock.total_s,
                    "model": self.model.state_dict(),
                    "optimizer": optimizer_state,
                    "batches": self.batches.state_dict(),
                    "rng": rng_state(),
                    "divergence": self.guard.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "config": config,
                    "world_size": self.world_size,
                },
                # renamed right after the checkpoint; a resume rewrites it from the checkpoint's config
                companions={config_file(self.run_dir): config_text(config)},
            )
        self.last_checkpoint = (self.iteration, self.checkpoint_file)
        self._remember_checkpoint()
        return True

    def _config(self) -> dict[str, Any]:
        """The run's config as plain data, interpolations resolved (what ``config.yaml`` holds)."""
        return cast("dict[str, Any]", OmegaConf.to_container(self.cfg, resolve=True))

    def resume_command(self) -> str:
        """The command that continues this run."""
        return f"kfcrun resume={shlex.quote(str(self.run_dir))}"

    def _remember_checkpoint(self) -> None:
        """Tell the signal handler what is on disk (a second signal reports it)."""
        self.stop.on_disk = f"{_where(self.last_checkpoint)}; resume with: {self.resume_command()}"

    def _where_and_fix(self) -> str:
        """The last good checkpoint, and what to change (for divergence messages)."""
        cfg = self.cfg
        return (
            f"{_where(self.last_checkpoint)}; fix: {_knob(cfg)} (now lr={cfg.optimizer.lr}) and start again"
        )

    def _stop_on_signal(self, signum: int) -> None:
        """After the step a signal interrupted: checkpoint, then stop with one line (exit 128 + signum)."""
        name = signal_name(signum)
        if self.guard.suspect:
            saved = (
                "no checkpoint written: the training loss is above the divergence threshold; "
                f"{_where(self.last_checkpoint)}"
            )
        else:
            self.checkpoint()
            saved = f"checkpoint {self.checkpoint_file} written"
        self.logger.close()
        self.stop.finish()  # a launcher's own handler (submitit's requeue) may exit here
        raise RunInterrupted(
            f"stopped by {name} at iteration {self.iteration} of {self.max_iters}; {saved}; "
            f"resume with: {self.resume_command()}",
            signum,
        )

    # -- the end ----------------------------------------------------------------------------------
    def summary_line(self) -> str:
        """The one line printed when the run is done: averaged (reported) and current parameters."""
        cfg, row, it = self.cfg, self.last_row, self.iteration
        per_iter = self.clock.total_s / max(it, 1)
        current = ""
        if "test/error_current" in row:
            current = (
                f"; current parameters: train error {_pct(row.get('train/error_current'))}, "
                f"test error {_pct(row.get('test/error_current'))}, "
                f"test NLL {_num(row.get('test/nll_current'))}"
            )
        return (
            f"kfcrun: {cfg.name} done: {it} iterations ({it * self.settings.batch_size:,} examples) "
            f"in {self.clock.total_s:.1f} s of training ({per_iter:.3f} s/iter); averaged parameters: "
            f"train error {_pct(row.get('train/error'))}, test error {_pct(row.get('test/error'))}, "
            f"test NLL {_num(row.get('test/nll'))}{current}; outputs in {self.run_dir}"
        )


def train(cfg: DictConfig, run_dir: str | Path, resume_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train as ``cfg`` says, writing everything under ``run_dir``; returns the final metrics row.

    SIGINT, SIGTERM and SIGUSR2 stop the run gracefully (:mod:`kfcrun.signals`):
    :class:`~kfcrun.signals.RunInterrupted` is raised after the checkpoint.
    """
    ctx = context()
    cfg, run_dir, overrides = share_job(cfg, Path(run_dir), list(resume_overrides))
    with GracefulStop() as stop:
        trainer = Trainer(cfg, run_dir, stop=stop, resume_overrides=overrides, ctx=ctx)
        trainer.setup()
        trainer.restore_or_start()
        trainer.initialize_optimizer()
        trainer.open_run_files()
        try:
            row = trainer.fit()
        except (RuntimeError, ConnectionError) as err:
            if ctx is None or isinstance(err, KfcrunError) or not _lost_peer(err):
                raise
            raise RankLostError(
                f"rank {ctx.rank} lost contact with another rank at iteration {trainer.iteration} "
                f"({_first_line(err)}): a rank died or was killed; {_where(trainer.last_checkpoint)}; "
                f"resume with: {trainer.resume_command()}"
            ) from err
    if trainer.is_main:
        print(trainer.summary_line(), flush=True)
    return row


def _lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because a peer process went away."""
    text = f"{type(err).__name__} {err}".lower()
    markers = ("connection", "closed", "reset by peer", "broken pipe", "timed out", "timeout", "gloo", "nccl")
    return "distbackenderror" in text or any(m in text for m in markers)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:160]


def _loss_closure(
    model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """The mini-batch's mean loss at the model's current parameters (K-FAC evaluates it after its update)."""
    return lambda: F.cross_entropy(model(inputs), labels)


def _where(last_checkpoint: tuple[int, Path] | None) -> str:
    if last_checkpoint is None:
        return "no checkpoint was written before it"
    return f"the last good checkpoint is {last_checkpoint[1]} (iteration {last_checkpoint[0]})"


def _knob(cfg: DictConfig) -> str:
    if "damping" in cfg.optimizer:
        return "raise optimizer.damping or lower optimizer.lr"
    return "lower optimizer.lr"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _num(value: float | str | None) -> str:
    if value is None:
        return "n/a"
    return f"{float(value):.3f}"  # metrics.jsonl spells non-finite values as strings ("inf")


def _update_run_json(
    run_dir: Path, record: dict[str, Any], resumed: bool, iteration: int, overrides: Sequence[str] = ()
) -> None:
    """Write ``run.json``; a resume appends ``{at_iter, overrides, ...record}`` to its ``resumes`` list."""
    path = run_dir / "run.json"
    if resumed and path.exists():
        payload = json.loads(path.read_text())
        payload.setdefault("resumes", []).append(
            {"at_iter": iteration, "overrides": list(overrides), **record}
        )
    else:
        payload = record
    write_json(path, payload)
