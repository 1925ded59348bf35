"""Resuming a run: its effective config, which overrides are safe, and what is recorded.

``kfcrun resume=<run dir> [key=value ...]`` continues a run from its last checkpoint.
The base config is the one stored IN that checkpoint (the config that produced the
state), so a resume that changed a key and was killed later resumes with that change;
``config.yaml`` is rewritten from the checkpoint's config whenever a checkpoint is
written (:func:`write_config`), so the two never disagree. Each resume appends its
overrides to ``run.json`` (``resumes``).

Any key may be overridden on resume (e.g. ``trainer.max_iters=5000`` to extend it,
``optimizer.damping=2`` or ``optimizer.lr=0.001`` to change the optimizer's settings)
except the ones whose change would make the checkpoint mean something else
(:data:`FROZEN`): the experiment and other config-group choices, the network
(``model.*``), the data (``dataset.*``), the seed, the batch size and the optimizer's
kind and structure. Those are refused in one line that names the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from kfcrun.checkpoint import checkpoint_path, load_checkpoint
from kfcrun.errors import ConfigError
from kfcrun.schema import show

__all__ = [
    "CONFIG_FILE",
    "FROZEN",
    "RESUME_SAFE",
    "ResumeRequest",
    "config_file",
    "config_text",
    "frozen_reason",
    "resumed_config",
    "write_config",
]

CONFIG_FILE = "config.yaml"

#: Keys (a trailing ``.`` means a whole section) that a resume must not change, and why.
FROZEN: dict[str, str] = {
    "task": "a resumed run continues training",
    "seed": "it fixed the run's initialization, data order and evaluation subset",
    "model.": "the checkpoint holds this network's weights",
    "dataset.": "the run was trained and evaluated on this data",
    "trainer.batch_size": "the run's iteration, epoch and example counts and its averaging assume it",
    "optimizer._target_": "the checkpoint holds this optimizer's state",
    "optimizer.name": "the checkpoint holds this optimizer's state",
    "optimizer.damping_mode": "the checkpoint holds this damping mode's inverses",
    "optimizer.approx": "the checkpoint's factors belong to this approximation",
}
#: Keys inside frozen sections that say where things are or how they are constrained,
#: not what the network or the data is.
RESUME_SAFE = frozenset({"dataset.root", "dataset.cache_dir", "dataset.download", "model.max_norm"})


def frozen_reason(key: str) -> str | None:
    """Why ``key`` cannot change on resume, or ``None`` if it may."""
    if key in RESUME_SAFE:
        return None
    for frozen, reason in FROZEN.items():
        if key == frozen or (frozen.endswith(".") and key.startswith(frozen)):
            return reason
    return None


@dataclass(frozen=True)
class ResumeRequest:
    """A resume as the command line asked for it.

    Attributes:
        run_dir: the run to continue.
        overrides: this command's ``key=value`` overrides (besides ``resume=``).
        cfg: the effective config: the checkpoint's config with the overrides applied.
    """

    run_dir: Path
    overrides: tuple[str, ...]
    cfg: DictConfig


def _saved_config(run_dir: Path, key_value: str) -> DictConfig:
    """The config stored in the run's checkpoint (else its ``config.yaml``)."""
    ckpt = checkpoint_path(run_dir)
    if ckpt.is_file():
        saved = load_checkpoint(ckpt).get("config")
        if isinstance(saved, Mapping):
            return OmegaConf.create(dict(saved))
    saved_file = run_dir / CONFIG_FILE
    if not saved_file.is_file():
        raise ConfigError(
            f"config error: {key_value} has no {CONFIG_FILE}; allowed: a run directory written by kfcrun; "
            "fix: resume=<that run's directory>"
        )
    loaded = OmegaConf.load(saved_file)
    assert isinstance(loaded, DictConfig)
    return loaded


def resumed_config(resume: str, overrides: Sequence[str], config_groups: Sequence[str]) -> ResumeRequest:
    """The effective config of ``kfcrun resume=<resume> <overrides>``; refuse unsafe overrides (one line).

    ``config_groups`` are the config group names (``experiment``, ``optimizer``, ...): a
    group choice cannot change on resume.
    """
    run_dir = Path(resume).expanduser()
    key_value = f"resume={resume}"
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    for override in parsed:
        key = override.get_key_element()
        line = override.input_line
        if key.split("/")[0].lstrip("+~").startswith("hydra"):
            raise ConfigError(
                f"config error: {line} has no effect on resume: the run continues in {run_dir}; fix: drop it"
            )
        if override.is_sweep_override():
            raise ConfigError(
                f"config error: {line} lists several values, but resume= continues one run; "
                "fix: give one value"
            )
        bare = key.lstrip("+~").split("@")[0]
        if bare in config_groups:
            raise ConfigError(
                f"config error: {line} cannot change on resume: {run_dir} keeps the {bare} it was started "
                f"with; fix: drop it, or start a new run with {line}"
            )
        if override.is_delete():
            raise ConfigError(f"config error: {line} deletes a key, which a resume cannot; fix: drop it")

    saved = _saved_config(run_dir, key_value)
    OmegaConf.set_struct(saved, False)
    _add_new_runner_keys(saved)
    for override in parsed:
        key = override.get_key_element().lstrip("+")
        value = override.value()
        reason = frozen_reason(key)
        if reason is not None:
            before = OmegaConf.select(saved, key, default=None)
            if before != value:
                raise ConfigError(
                    f"config error: {key}={show(value)} cannot change on resume: {reason} "
                    f"({key}={show(before)}); fix: drop it, or start a new run with {key}={show(value)}"
                )
        if key == "resume":
            continue
        OmegaConf.update(saved, key, value, merge=True, force_add=True)
    with open_dict(saved):
        saved.resume = str(run_dir)
    lines = tuple(str(o.input_line) for o in parsed if o.get_key_element() != "resume")
    return ResumeRequest(run_dir, lines, saved)


def config_text(config: Mapping[str, Any] | DictConfig) -> str:
    """``config`` as the YAML of ``config.yaml`` (interpolations resolved)."""
    node = config if isinstance(config, DictConfig) else OmegaConf.create(dict(config))
    return OmegaConf.to_yaml(node, resolve=True)


def config_file(run_dir: str | Path) -> Path:
    """``<run_dir>/config.yaml``."""
    return Path(run_dir) / CONFIG_FILE


def _add_new_runner_keys(saved: DictConfig) -> None:
    """Give a run saved before a runner key existed that key's default (e.g. the ``divergence`` section)."""
    from kfcrun.divergence import DivergenceSettings
    from kfcrun.settings import LoggerSettings, TrainerSettings

    for section, settings in (
        ("trainer", TrainerSettings),
        ("logger", LoggerSettings),
        ("divergence", DivergenceSettings),
    ):
        defaults = dataclasses.asdict(settings())
        node = saved.get(section)
        if node is None:
            saved[section] = defaults
            continue
        for key, value in defaults.items():
            if key not in node:
                node[key] = value


def write_config(run_dir: str | Path, config: Mapping[str, Any] | DictConfig) -> None:
    """Write ``<run_dir>/config.yaml`` atomically (temp file, fsync, rename)."""
    path = config_file(run_dir)
    text = config_text(config)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
