"""Validation of a composed run config, before anything is written.

Every rule names its key, what is allowed and an example of a fix, so that a bad
value stops the run with ONE line, e.g.::

    kfcrun: config error: optimizer.lr=-1 is out of range; allowed: a number > 0; fix: e.g. optimizer.lr=0.003

The rules are not written here: each section's knobs are declared once, beside the code
that uses them (:mod:`kfcrun.schema`): the top level, ``trainer`` and ``logger`` in
:mod:`kfcrun.settings`, ``divergence`` in :class:`kfcrun.divergence.DivergenceSettings`,
``dataset`` in :class:`kfcrun.data.DatasetConfig`, ``model`` and
``optimizer`` in the annotated signature of the constructor their ``_target_`` names
(:mod:`kfcrun.builders`), ``assumptions`` in :class:`kfcrun.studies.assumptions.AssumptionSettings`.
This module only walks the config and words the errors; the relations between keys
(:func:`_validate_relations`) are the one thing it adds.

Unknown keys are refused too: Hydra refuses unknown command-line keys itself (the
config is in struct mode), and :func:`validate_config` refuses keys that a
hand-written experiment file adds, which Hydra would merge silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from kfcrun.builders import model_rules, optimizer_rules
from kfcrun.data import DatasetConfig
from kfcrun.divergence import DivergenceSettings
from kfcrun.errors import ConfigError
from kfcrun.schema import Rule, rules_of, show
from kfcrun.settings import LoggerSettings, RunSettings, TrainerSettings

#: Keys whose value is a free-form mapping (its own keys are not checked against a schema).
MAPPING_KEYS = {"optimizer.layer_weight_decay"}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path not in MAPPING_KEYS:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def rules_for(cfg: Mapping[str, Any]) -> dict[str, Rule]:
    """Every key's rule for this config (the model and optimizer rules depend on their ``_target_``)."""
    from kfcrun.studies.assumptions import AssumptionSettings

    return {
        **rules_of(RunSettings),
        **rules_of(DatasetConfig, "dataset."),
        **model_rules(cfg.get("model") or {}),
        **optimizer_rules(cfg.get("optimizer") or {}),
        **rules_of(TrainerSettings, "trainer."),
        **rules_of(LoggerSettings, "logger."),
        **rules_of(DivergenceSettings, "divergence."),
        **rules_of(AssumptionSettings, "assumptions."),
    }


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` (one line) for the first invalid, missing or unknown key."""
    container: dict[str, Any] = (
        cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))
        if isinstance(cfg, DictConfig)
        else dict(cfg)
    )
    container.pop("hydra", None)
    values = _flatten(container)
    rules = rules_for(container)

    for key in values:
        if key not in rules:
            section = key.split(".")[0]
            known = sorted(k for k in rules if k.startswith(section + "."))
            if not known:  # not even the section exists: list the sections
                known = sorted({k.split(".")[0] + (".*" if "." in k else "") for k in rules})
            raise ConfigError(
                f"config error: unknown key {key} (value {show(values[key])}); allowed keys here: "
                f"{', '.join(known)}; fix: correct the spelling or remove it"
            )
    for key, rule in rules.items():
        if key not in values:
            if key.removeprefix("dataset.") in DatasetConfig.SYNTHETIC_ONLY:
                continue  # only the synthetic dataset has these
            raise ConfigError(
                f"config error: missing key {key}; allowed: {rule.allowed}; fix: add {key}={rule.example} "
                f"(or +{key}=... on the command line)"
            )
        value = values[key]
        problem = rule.problem(value)
        if problem is not None:
            raise ConfigError(
                f"config error: {key}={show(value)} {problem}; allowed: {rule.allowed}; "
                f"fix: e.g. {key}={rule.example}"
            )
    _validate_relations(values)


def _validate_relations(values: Mapping[str, Any]) -> None:
    if values["trainer.max_iters"] is None and values["trainer.max_epochs"] is None:
        raise ConfigError(
            "config error: trainer.max_iters and trainer.max_epochs are both null; allowed: at least one "
            "set; fix: e.g. trainer.max_iters=1000"
        )
    if values["dataset.name"] != "synthetic" and not values["dataset.root"]:
        raise ConfigError(
            f"config error: dataset.root=null for dataset {values['dataset.name']}; allowed: a directory; "
            "fix: dataset.root=<dir with the data> (add dataset.download=true to fetch it)"
        )
    if values["dataset.name"] == "synthetic" and "dataset.num_train" not in values:
        raise ConfigError(
            "config error: dataset.num_train is missing for the synthetic dataset; "
            "fix: +dataset.num_train=2048"
        )
    if values["task"] == "train" and values["resume"] is not None:
        require_run_dir("resume", values["resume"])
    if values["task"] == "assumptions" and values["checkpoint"] is None and values["resume"] is None:
        pass  # the assumptions task trains a network first when no checkpoint is given
    if values["checkpoint"] is not None:
        require_run_dir("checkpoint", values["checkpoint"])
    if values["task"] == "assumptions" and values.get("assumptions.checkpoint_avg") is not None:
        require_run_dir("assumptions.checkpoint_avg", values["assumptions.checkpoint_avg"])


def require_run_dir(key: str, value: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a run directory with a checkpoint (or such a file)."""
    from kfcrun.checkpoint import checkpoint_path, find_checkpoint

    if find_checkpoint(value) is None:
        target = checkpoint_path(Path(value).expanduser())
        raise ConfigError(
            f"config error: {key}={value} has no checkpoint ({target} not found); allowed: a run directory "
            "with checkpoints/last.pt or a checkpoint file; fix: point to an existing run, e.g. "
            f"{key}=outputs/<date>/<time>-<name>-<id>"
        )
