"""The training loop, readable top to bottom.

One run: load the data once as tensors on the device, build the network and the
optimizer, optionally restore a checkpoint, then iterate

    batch -> forward -> loss -> backward -> optimizer.step()

and every ``trainer.eval_every`` iterations evaluate the AVERAGED parameters (the
reported result, paper App. A.1) and the current ones on a fixed training subset and
on the full test set.

The training clock (``train_time_s``) counts only the training steps: the device is
synchronized before the clock is read, and data preparation, evaluation, logging and
checkpointing happen outside the timed region (paper Sec. 5.2 plots against it).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from kfcrun.checkpoint import checkpoint_path, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kfcrun.data import DeviceBatches, ImageData, Preprocessor, load_dataset
from kfcrun.errors import ConfigError, TrainingDivergedError
from kfcrun.evaluate import evaluate
from kfcrun.logging import MetricsLogger, run_record, truncate_metrics, write_json
from kfcrun.models import model_from_config
from kfcrun.optim import build_optimizer
from kfcrun.optim.constraints import apply_max_norm

log = logging.getLogger(__name__)


@dataclass
class Clock:
    """Training wall-clock: the sum of timed step durations, in seconds."""

    device: torch.device
    total_s: float = 0.0
    _start: float | None = field(default=None, repr=False)

    def start(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def stop(self) -> None:
        synchronize(self.device)
        assert self._start is not None, "Clock.stop() without start()"
        self.total_s += time.perf_counter() - self._start
        self._start = None


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"config error: trainer.device={name} but no CUDA device is available; allowed here: auto | cpu; "
            "fix: trainer.device=auto"
        )
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(cfg: DictConfig) -> ImageData:
    d = cfg.dataset
    synthetic = None
    if d.name == "synthetic":
        synthetic = {
            "num_train": d.num_train,
            "num_test": d.num_test,
            "num_classes": d.num_classes,
            "channels": d.channels,
            "image_size": d.image_size,
            "seed": cfg.seed,
        }
    return load_dataset(
        d.name,
        d.root,
        download=d.download,
        cache_dir=Path(d.cache_dir).expanduser() if d.cache_dir else None,
        format=d.format,
        use_extra=d.use_extra,
        synthetic=synthetic,
        progress=cfg.trainer.progress,
    )


def total_iterations(cfg: DictConfig, batches_per_epoch: int) -> int:
    """``trainer.max_iters`` or ``trainer.max_epochs`` (in updates), whichever comes first."""
    limits = []
    if cfg.trainer.max_iters is not None:
        limits.append(int(cfg.trainer.max_iters))
    if cfg.trainer.max_epochs is not None:
        limits.append(math.ceil(float(cfg.trainer.max_epochs) * batches_per_epoch))
    return min(limits)


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train as ``cfg`` says, writing everything under ``run_dir``; returns the final metrics row."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.seed)

    # ---- data: decoded once, kept whole on the device, shuffled by permutation -------------
    data = load_data(cfg)
    preprocess = Preprocessor.fit(
        data.train_images, mean=cfg.dataset.mean, std=cfg.dataset.std, pixel_scale=cfg.dataset.pixel_scale
    ).to(device)
    batches = DeviceBatches(
        data.train_images.to(device), data.train_labels.to(device), cfg.trainer.batch_size, seed=cfg.seed
    )
    subset = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(cfg.seed))
    subset = subset[: cfg.trainer.train_eval_size]
    eval_sets = {
        "train": (data.train_images[subset].to(device), data.train_labels[subset].to(device)),
        "test": (data.test_images.to(device), data.test_labels.to(device)),
    }
    max_iters = total_iterations(cfg, batches.batches_per_epoch)

    # ---- model and optimizer ----------------------------------------------------------------
    model = model_from_config(cfg.model, cfg.dataset).to(device)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.trainer.batch_size, seed=cfg.seed)

    # ---- resume, or start fresh ---------------------------------------------------------------
    iteration, clock = 0, Clock(device)
    ckpt_file = checkpoint_path(run_dir)
    if cfg.resume is not None:
        state = load_checkpoint(ckpt_file, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        iteration, clock.total_s = state["iteration"], state["train_time_s"]
        set_rng_state(state["rng"])
        truncate_metrics(run_dir / "metrics.jsonl", iteration)
        log.info("resuming %s at iteration %d (%.1f s of training)", run_dir, iteration, clock.total_s)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    record = run_record(
        device, {"run_dir": str(run_dir.resolve()), "max_iters": max_iters, "data": data.source}
    )
    _update_run_json(run_dir, record, resumed=cfg.resume is not None, iteration=iteration)

    logger = MetricsLogger(
        run_dir,
        start_walltime=time.time() - clock.total_s,
        purge_step=iteration + 1 if cfg.resume is not None else None,
        tensorboard=cfg.logger.tensorboard,
    )
    last_checkpoint: tuple[int, Path] | None = (iteration, ckpt_file) if cfg.resume is not None else None

    def checkpoint() -> None:
        nonlocal last_checkpoint
        # Never overwrite the last good checkpoint with parameters that already diverged.
        if not bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all()):
            raise TrainingDivergedError(
                f"parameters became non-finite by iteration {iteration}; "
                f"{_where(last_checkpoint)}; fix: {_knob(cfg)} (now lr={cfg.optimizer.lr}) and start again"
            )
        save_checkpoint(
            ckpt_file,
            {
                "iteration": iteration,
                "train_time_s": clock.total_s,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "batches": batches.state_dict(),
                "rng": rng_state(),
                "config": OmegaConf.to_container(cfg, resolve=True),
            },
        )
        last_checkpoint = (iteration, ckpt_file)

    def evaluation_row() -> dict[str, Any]:
        row: dict[str, Any] = {
            "iter": iteration,
            "examples": iteration * cfg.trainer.batch_size,
            "epoch": iteration / batches.batches_per_epoch,
            "train_time_s": clock.total_s,
            "elapsed_s": time.perf_counter() - wall_start,
        }
        with optimizer.averaged_parameters():
            for split, (images, labels) in eval_sets.items():
                for key, value in evaluate(
                    model, images, labels, preprocess, cfg.trainer.eval_batch_size
                ).items():
                    row[f"{split}/{key}"] = value
        if cfg.trainer.eval_current:
            for split, (images, labels) in eval_sets.items():
                for key, value in evaluate(
                    model, images, labels, preprocess, cfg.trainer.eval_batch_size
                ).items():
                    row[f"{split}/{key}_current"] = value
        row.update({f"time/{k}": v for k, v in optimizer_times(optimizer).items()})
        return row

    # KFC-pre estimates its factors on a large training subset before the first step
    # (Algorithm 1); that is part of the method, so it is on the training clock.
    wall_start = time.perf_counter()
    if iteration == 0 and optimizer.init_examples > 0:
        clock.start()
        optimizer.initialize(_initial_batches(cfg, optimizer, data, preprocess, device))
        clock.stop()
        log.info("estimated initial curvature factors in %.1f s", clock.total_s)

    # ---- the loop -----------------------------------------------------------------------------
    model.train()
    recent_losses: list[torch.Tensor] = []
    last_row: dict[str, Any] = {}
    bar = tqdm(
        total=max_iters,
        initial=iteration,
        disable=not cfg.trainer.progress,
        file=sys.stderr,
        dynamic_ncols=True,
        desc=cfg.name,
    )
    try:
        while iteration < max_iters:
            images, labels = next(batches)
            inputs = preprocess(images)  # data preparation stays off the training clock

            clock.start()
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step(inputs=inputs, targets=labels if optimizer.needs_labels else None)
            if cfg.model.max_norm is not None:
                apply_max_norm(model, cfg.model.max_norm)
            clock.stop()
            iteration += 1
            recent_losses.append(loss.detach())

            eval_due = iteration % cfg.trainer.eval_every == 0 or iteration == max_iters
            ckpt_due = cfg.trainer.checkpoint_every is not None and (
                iteration % cfg.trainer.checkpoint_every == 0 or iteration == max_iters
            )
            if iteration % cfg.trainer.log_every == 0 or eval_due or ckpt_due:
                losses = torch.stack(recent_losses)
                _check_finite(losses, iteration, last_checkpoint, cfg)
                logger.scalars(
                    {
                        "train/batch_loss": losses.mean(),
                        **{f"kfc/{k}": v for k, v in optimizer.step_stats().items()},
                    },
                    step=iteration,
                    train_time_s=clock.total_s,
                )
                bar.set_postfix(
                    loss=f"{losses[-1].item():.3f}",
                    test_err=_pct(last_row.get("test/error")),
                    train_s=f"{clock.total_s:.0f}",
                    refresh=False,
                )
                recent_losses.clear()
            if eval_due:
                last_row = evaluation_row()
                logger.row(last_row)
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    test_err=_pct(last_row["test/error"]),
                    train_s=f"{clock.total_s:.0f}",
                    refresh=False,
                )
            if ckpt_due:
                checkpoint()
            bar.update(1)
    finally:
        bar.close()
        logger.close()

    per_iter = clock.total_s / max(iteration, 1)
    print(
        f"kfcrun: {cfg.name} done: {iteration} iterations ({iteration * cfg.trainer.batch_size:,} examples) "
        f"in {clock.total_s:.1f} s of training ({per_iter:.3f} s/iter); averaged parameters: "
        f"train error {_pct(last_row.get('train/error'))}, test error {_pct(last_row.get('test/error'))}, "
        f"test NLL {last_row.get('test/nll', float('nan')):.3f}; outputs in {run_dir}",
        flush=True,
    )
    return last_row


def optimizer_times(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Cumulative seconds per optimizer phase, if the optimizer keeps them (KFC-pre does)."""
    times = getattr(optimizer, "phase_times", None)
    return dict(times) if times else {}


def _initial_batches(
    cfg: DictConfig, optimizer: Any, data: ImageData, preprocess: Preprocessor, device: torch.device
):
    """``(inputs, labels)`` batches of a fixed random training subset: KFC-pre's initial factor estimate."""
    count = min(optimizer.init_examples, len(data.train_images))
    order = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(cfg.seed + 1))[
        :count
    ]
    size = cfg.trainer.batch_size
    for start in range(0, count, size):
        idx = order[start : start + size]
        yield preprocess(data.train_images[idx].to(device)), data.train_labels[idx].to(device)


def _check_finite(
    losses: torch.Tensor, iteration: int, last_checkpoint: tuple[int, Path] | None, cfg: DictConfig
) -> None:
    """Stop with one clear line if any recent loss is NaN or infinite."""
    finite = torch.isfinite(losses)
    if bool(finite.all()):
        return
    first_bad = iteration - len(losses) + 1 + int((~finite).nonzero()[0])
    value = losses[~finite][0].item()
    raise TrainingDivergedError(
        f"training loss became {value} at iteration {first_bad}; {_where(last_checkpoint)}; "
        f"fix: {_knob(cfg)} (now lr={cfg.optimizer.lr}) and start again"
    )


def _where(last_checkpoint: tuple[int, Path] | None) -> str:
    if last_checkpoint is None:
        return "no checkpoint was written before it"
    return f"the last good checkpoint is {last_checkpoint[1]} (iteration {last_checkpoint[0]})"


def _knob(cfg: DictConfig) -> str:
    if cfg.optimizer.name == "kfc_pre":
        return "raise optimizer.damping or lower optimizer.lr"
    return "lower optimizer.lr"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _update_run_json(run_dir: Path, record: dict[str, Any], resumed: bool, iteration: int) -> None:
    import json

    path = run_dir / "run.json"
    if resumed and path.exists():
        payload = json.loads(path.read_text())
        payload.setdefault("resumes", []).append({"at_iter": iteration, **record})
    else:
        payload = record
    write_json(path, payload)


__all__ = ["Clock", "resolve_device", "total_iterations", "train"]
