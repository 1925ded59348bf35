"""The ``kfcrun`` command: a thin wrapper around ``@hydra.main``.

Before Hydra creates any output directory, :func:`preflight` composes the config the
same way Hydra will (for a sweep: once per swept value) and validates it, so that an
unknown key, an unknown experiment or an out-of-range value stops the command with
one line and nothing written. Errors the user can fix (:class:`KfcrunError`) are
printed as one line and exit non-zero; ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from kfcrun.errors import ConfigError, KfcrunError

log = logging.getLogger("kfcrun")

CONFIG_MODULE = "kfcrun.configs"
CONFIG_NAME = "config"
CONFIG_GROUPS = ("dataset", "model", "optimizer", "trainer", "logger", "experiment", "sweep", "debug")

# One id per process: two runs started in the same second get different directories.
_RUN_UID = f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"


OmegaConf.register_new_resolver("kfcrun_uid", lambda: _RUN_UID, replace=True)

#: Jobs of this process's sweep that stopped with a KfcrunError: (run dir, message).
FAILED_JOBS: list[tuple[str, str]] = []

# Flags after which we leave everything to Hydra (they print and exit, or need a config
# search path we do not reproduce here).
_PASSTHROUGH_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--resolve",
    "--experimental-rerun",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
}


# ---------------------------------------------------------------------------------------------
# preflight: compose and validate before Hydra writes anything
# ---------------------------------------------------------------------------------------------
def preflight(argv: Sequence[str]) -> None:
    """Compose every config this command will run and validate it; raise :class:`ConfigError`."""
    multirun = False
    overrides: list[str] = []
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag in _PASSTHROUGH_FLAGS:
            return
        if token in ("-m", "--multirun"):
            multirun = True
        elif token.startswith("-"):
            return  # an option Hydra knows and we do not; let it handle the command
        else:
            overrides.append(token)

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(
            f"config error: cannot parse the command line ({_one_line(err)}); fix: use key=value"
        ) from err

    base = [_input_line(o) for o in parsed if not o.is_sweep_override()]
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        # Hydra would refuse it too; this is friendlier.
        line = sweeps[0].input_line
        raise ConfigError(
            f"config error: {line} lists several values but this is a single run; fix: add -m to sweep over "
            f"them, or quote the value ('{line}') to use it as a string"
        )

    cfg = _compose(base)
    variants: list[list[str]] = []
    sweep_lines = list(sweeps)
    if multirun:
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        cmdline_keys = {o.get_key_element() for o in sweeps}
        for key, value in params.items():
            if key not in cmdline_keys:
                sweep_lines.extend(parser.parse_overrides([f"{key}={value}"]))
    for sweep in sweep_lines:
        if not sweep.is_sweep_override():
            variants.append([_input_line(sweep)])
            continue
        try:
            values = list(sweep.sweep_string_iterator())
        except Exception:
            continue  # e.g. an interval for Optuna: its values are chosen at run time
        key = sweep.get_key_element()
        variants.extend([f"{key}={value}"] for value in values)

    _validate(cfg)
    for extra in variants:
        _validate(_compose(base + extra))


def _input_line(override: Override) -> str:
    """The override as written on the command line (``parse_overrides`` always records it)."""
    assert override.input_line is not None
    return override.input_line


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3", job_name="kfcrun"):
            return compose(CONFIG_NAME, overrides=overrides, return_hydra_config=True)
    except HydraException as err:
        raise _explain_hydra_error(err, overrides) from err
    except Exception as err:  # OmegaConf errors while merging overrides
        raise ConfigError(
            f"config error: {_one_line(err)}; fix: check the overrides {' '.join(overrides)}"
        ) from err


def compose_run_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The validated run config for ``overrides``, as ``kfcrun <overrides>`` would run it (no ``hydra`` node).

    For scripts and notebooks that want an experiment's settings without running Hydra.
    """
    cfg = _compose(list(overrides))
    _validate(cfg)
    container = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=False))
    container.pop("hydra", None)
    return OmegaConf.create(container)


def _validate(cfg: DictConfig) -> None:
    from kfcrun.config import validate_config

    container = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=False))
    container.pop("hydra", None)
    plain = OmegaConf.create(container)
    validate_config(plain)
    _validate_layer_names(plain)


def _validate_layer_names(cfg: DictConfig) -> None:
    """``optimizer.layer_weight_decay`` and ``optimizer.skip_layers`` must name layers of the network."""
    decays = cfg.optimizer.get("layer_weight_decay")
    skip = list(cfg.optimizer.get("skip_layers") or [])
    if not decays and not skip:
        return
    import torch

    from kfcrun.builders import build_model
    from kfcrun.curvature.coverage import canonical_name, unmatched_patterns
    from kfcrun.optim.param_groups import layer_weight_decays

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.dataset)
    if decays:
        layer_weight_decays(model, 0.0, dict(decays))
    unknown = unmatched_patterns(model, skip)
    if unknown:
        names = [canonical_name(n) for n, m in model.named_modules() if n and not list(m.children())]
        raise ConfigError(
            f"config error: optimizer.skip_layers entries {unknown} name no module of {cfg.model.name}; "
            f"allowed: module names or patterns such as {', '.join(names[:3])}, 'layer4.*'; "
            "fix: correct them or remove them"
        )


def _explain_hydra_error(err: Exception, overrides: list[str]) -> ConfigError:
    """Turn Hydra's multi-line composition errors into one actionable line."""
    message = str(err)
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", message)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", message, flags=re.MULTILINE)
        allowed = ", ".join(options) if options else f"the files in configs/{group}/"
        return ConfigError(
            f"config error: unknown {group} '{option}'; allowed: {allowed}; fix: {group}=<one of those>"
        )
    unknown = re.search(r"Could not override '([^']+)'", message)
    if unknown:
        key = unknown.group(1)
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key), "?")
        return ConfigError(
            f"config error: unknown key {key} (value {value}); "
            "allowed: the keys shown by `kfcrun --cfg job`; "
            f"fix: correct the spelling, or add a new key with +{key}={value}"
        )
    return ConfigError(f"config error: {_one_line(err)}")


def _one_line(err: BaseException) -> str:
    """The error's message (or, if it has none, its cause's) on one line."""
    while not str(err).strip() and err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(err).__name__


# ---------------------------------------------------------------------------------------------
# the Hydra task
# ---------------------------------------------------------------------------------------------
def resumed_config(cfg: DictConfig, task_overrides: Sequence[str]) -> DictConfig:
    """The config of the run in ``cfg.resume``, with this command's plain ``key=value`` overrides on top.

    The saved run's own resolved ``config.yaml`` is the base, so ``kfcrun resume=<dir>``
    needs no other argument; ``kfcrun resume=<dir> trainer.max_iters=5000`` extends it.
    Config-group choices cannot change on resume.
    """
    run_dir = Path(cfg.resume).expanduser()
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError(
            f"config error: resume={cfg.resume} has no config.yaml; "
            "allowed: a run directory written by kfcrun; "
            "fix: resume=<that run's directory>"
        )
    saved = cast(DictConfig, OmegaConf.load(saved_file))  # a run's config.yaml is a mapping
    parser = OverridesParser.create()
    for override in parser.parse_overrides(list(task_overrides)):
        key = override.get_key_element().lstrip("+~")
        if key in ("resume", "experiment"):
            continue
        if key.split("@")[0] in CONFIG_GROUPS:
            raise ConfigError(
                f"config error: {override.input_line} changes a config group while resuming; allowed: plain "
                "key=value overrides such as trainer.max_iters=5000; fix: drop it, or start a new run"
            )
        OmegaConf.update(saved, key, override.value(), merge=True, force_add=override.is_add())
    with open_dict(saved):
        saved.resume = str(run_dir)
    return saved


def _train_task(cfg: DictConfig, run_dir: Path) -> float | None:
    from kfcrun.train import train

    row = train(cfg, run_dir)
    value = row.get(cfg.objective)
    return None if value is None else float(value)


def _assumptions_task(cfg: DictConfig, run_dir: Path) -> float | None:
    from kfcrun.studies.assumptions import run_assumption_study

    run_assumption_study(cfg, run_dir)
    return None


#: ``task=<name>`` -> the function that runs it in ``run_dir`` and returns the sweep objective.
TASKS: dict[str, Callable[[DictConfig, Path], float | None]] = {
    "train": _train_task,
    "assumptions": _assumptions_task,
}


def run_task(cfg: DictConfig) -> float | None:
    """Run one job: validate, then dispatch ``cfg.task`` through :data:`TASKS`. Returns the objective."""
    from kfcrun.config import validate_config

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        if cfg.resume is not None:
            cfg = resumed_config(cfg, hydra_cfg.overrides.task)
            run_dir = Path(cfg.resume)
        validate_config(cfg)
        return TASKS[cfg.task](cfg, run_dir)
    except KfcrunError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if not multirun:
            _print_error(err)
            sys.exit(err.exit_code)
        # In a sweep, one bad job must not stop the others; main() reports it at the end.
        log.error("kfcrun: %s", err)
        (run_dir / "error.txt").write_text(f"{err}\n")
        FAILED_JOBS.append((str(run_dir), str(err)))
        return float("nan")


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> float | None:
    return run_task(cfg)


def _print_error(err: KfcrunError) -> None:
    print(f"kfcrun: {err}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``kfcrun``."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        preflight(sys.argv[1:])
    except KfcrunError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _print_error(err)
        sys.exit(err.exit_code)
    _hydra_main()
    if FAILED_JOBS:
        print(f"kfcrun: {len(FAILED_JOBS)} sweep job(s) failed:", file=sys.stderr)
        for run_dir, message in FAILED_JOBS:
            print(f"  {run_dir}: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
