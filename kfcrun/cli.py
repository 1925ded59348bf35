"""The ``kfcrun`` command: a thin wrapper around ``@hydra.main``.

Before Hydra creates any output directory, :func:`preflight` composes the config the
same way Hydra will (for a sweep: once per swept value) and validates it, so that an
unknown key, an unknown experiment or an out-of-range value stops the command with
one line and nothing written. It also decides where the run goes and refuses a
directory that already holds a run (:mod:`kfcrun.run_dir`). If the job then fails
before training starts, :func:`run_task` removes what Hydra created for it.

``kfcrun resume=<run dir> [key=value ...]`` does not go through Hydra: the run's own
config (from its checkpoint) with the overrides on top is validated and trained in
the run's directory (:mod:`kfcrun.resume`).

Errors the user can fix (:class:`KfcrunError`) are printed as one line and exit
non-zero; ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from kfcrun.errors import ConfigError, KfcrunError, TrainingDivergedError
from kfcrun.resume import ResumeRequest, resumed_config
from kfcrun.run_dir import (
    PlannedRunDir,
    holds_run,
    only_stub,
    plan_run_dir,
    refuse_existing_run,
    remove_stub,
    writable_ancestor,
)

log = logging.getLogger("kfcrun")

CONFIG_MODULE = "kfcrun.configs"
CONFIG_NAME = "config"
CONFIG_GROUPS = (
    "dataset",
    "model",
    "optimizer",
    "trainer",
    "logger",
    "experiment",
    "sweep",
    "debug",
    "cluster",
)

# One id per process: two runs started in the same second get different directories.
_RUN_UID = f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"


# use_cache: a launcher that re-composes a job's config in another process (submitit, also
# when it requeues a job) copies the resolved value along and finds the same directory.
OmegaConf.register_new_resolver("kfcrun_uid", lambda: _RUN_UID, replace=True, use_cache=True)

#: Jobs of this process's sweep that stopped with a KfcrunError: (run dir, message).
FAILED_JOBS: list[tuple[str, str]] = []
#: Where this command's run goes, as preflight planned it (for removing a failed start's stub).
PLANNED_RUN_DIR: PlannedRunDir | None = None
#: The job log Hydra writes into the run directory (``hydra.job.name`` is ``kfcrun``); a resume appends to it.
LOG_FILE = "kfcrun.log"

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
@dataclass(frozen=True)
class Plan:
    """What preflight found the command will do.

    Attributes:
        resume: for ``resume=<dir>``, the validated resume (run without Hydra).
        run_dir: for a new run (or sweep), its directory as planned before Hydra creates it.
    """

    resume: ResumeRequest | None = None
    run_dir: PlannedRunDir | None = None


def preflight(argv: Sequence[str]) -> Plan | None:
    """Compose every config this command will run and validate it; raise :class:`ConfigError`.

    Returns ``None`` for commands left to Hydra (``--help``, ``--cfg``, ...).
    """
    multirun = False
    overrides: list[str] = []
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag in _PASSTHROUGH_FLAGS:
            return None
        if token in ("-m", "--multirun"):
            multirun = True
        elif token.startswith("-"):
            return None  # an option Hydra knows and we do not; let it handle the command
        else:
            overrides.append(token)

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(
            f"config error: cannot parse the command line ({_one_line(err)}); fix: use key=value"
        ) from err

    resume = next((o for o in parsed if o.get_key_element().lstrip("+") == "resume"), None)
    if resume is not None and resume.value() is not None:
        if multirun or resume.is_sweep_override():
            raise ConfigError(
                f"config error: {resume.input_line} with -m or several values; resume= continues one run; "
                "fix: one command per run, without -m"
            )
        return Plan(resume=_preflight_resume(str(resume.value()), overrides))

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
    return Plan(run_dir=_plan_output_dir(cfg, multirun))


def _preflight_resume(value: str, overrides: Sequence[str]) -> ResumeRequest:
    """Validate ``resume=<value>`` with the other overrides, and check the run can be written."""
    from kfcrun.config import require_run_dir

    require_run_dir("resume", value)
    others = [o for o in overrides if o.split("=", 1)[0].lstrip("+") != "resume"]
    request = resumed_config(value, others, CONFIG_GROUPS)
    _validate(request.cfg)
    for folder in (request.run_dir, request.run_dir / "checkpoints"):
        problem = _not_writable(folder)
        if problem:
            raise ConfigError(
                f"config error: resume={value}: cannot write in {folder} ({problem}); a resumed run writes "
                "its checkpoint, metrics and config there; fix: make it writable "
                f"(chmod -R u+w {request.run_dir}) or copy the run to a writable place and resume the copy"
            )
    return request


def _plan_output_dir(cfg: DictConfig, multirun: bool) -> PlannedRunDir | None:
    """Where Hydra will write; refuse one that holds a run, or that cannot be created."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the directory's pattern
        path = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:
        return None  # resolvable only inside the job (run_task refuses there)
    if not path:
        return None
    planned = plan_run_dir(str(path))
    refuse_existing_run(Path(str(path)), key, sweep=multirun)  # as the user spelled it
    ancestor = writable_ancestor(planned.path)
    problem = _not_writable(ancestor)
    if problem:
        raise ConfigError(
            f"config error: {key}={planned.path} cannot be created: {ancestor} is not writable ({problem}); "
            f"fix: {key}=<a directory you can write>"
        )
    return planned


def _not_writable(folder: Path) -> str | None:
    """Why nothing can be created in ``folder``, or ``None``.

    Tried, not guessed from the permission bits, which do not apply to root.
    """
    if not folder.is_dir():
        return None
    try:
        probe = tempfile.mkdtemp(prefix=".kfcrun-write-test-", dir=folder)
    except OSError as err:
        return err.strerror or str(err)
    os.rmdir(probe)
    return None


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
# the tasks
# ---------------------------------------------------------------------------------------------
def _train_task(cfg: DictConfig, run_dir: Path, resume_overrides: Sequence[str] = ()) -> float | None:
    from kfcrun.train import train

    row = train(cfg, run_dir, resume_overrides=resume_overrides)
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
    """Run one Hydra job: validate, then dispatch ``cfg.task`` through :data:`TASKS`. Returns the objective.

    A single run that fails before the trainer wrote anything leaves no directory behind.
    """
    from kfcrun import launch
    from kfcrun.config import validate_config
    from kfcrun.signals import RunInterrupted

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if launch.is_follower():
        _leave_the_log_file_to_rank_zero()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    resume_overrides: list[str] = []
    try:
        if cfg.resume is not None:  # normally handled before Hydra (main); kept for launchers
            request = resumed_config(
                str(cfg.resume),
                [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+") != "resume"],
                CONFIG_GROUPS,
            )
            cfg, run_dir, resume_overrides = request.cfg, request.run_dir, list(request.overrides)
        elif cfg.task == "train" and not launch.is_follower():
            # (a Slurm task other than rank 0 takes rank 0's decision: kfcrun.launch.share_job)
            cfg = _continue_if_requeued(cfg, run_dir)
        validate_config(cfg)
        if resume_overrides:
            return _train_task(cfg, run_dir, resume_overrides)  # recorded in run.json
        return TASKS[cfg.task](cfg, run_dir)
    except (KfcrunError, OSError) as err:
        error = _user_error(err)
        if error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if not multirun or isinstance(error, RunInterrupted):
            _print_error(error)
            sys.exit(error.exit_code)
        # In a sweep, one bad job must not stop the others; main() reports it at the end.
        log.error("kfcrun: %s", error)
        (run_dir / "error.txt").write_text(f"{error}\n")
        FAILED_JOBS.append((str(run_dir), str(error)))
        return float("nan")
    finally:
        if not multirun:
            _remove_failed_start(run_dir, hydra_cfg)


def _remove_failed_start(run_dir: Path, hydra_cfg: Any) -> None:
    """Close the job log and remove what Hydra created, if the job wrote nothing of its own."""
    log_files = [f"{hydra_cfg.job.name}.log"]
    if not only_stub(run_dir, log_files, hydra_cfg.output_subdir):
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if (
            isinstance(handler, logging.FileHandler)
            and Path(handler.baseFilename).parent == run_dir.absolute()
        ):
            root.removeHandler(handler)
            handler.close()
    remove_stub(run_dir, log_files, hydra_cfg.output_subdir, PLANNED_RUN_DIR)


def _continue_if_requeued(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """A new job whose directory already holds a run: continue it if it is the same job, else refuse.

    Preflight refuses such a directory on the command line; a job gets here when a launcher
    runs it again without preflight (submitit requeues a preempted job with the same config),
    or when the directory's pattern could only be resolved inside the job.
    """
    from kfcrun.checkpoint import find_checkpoint, load_checkpoint

    if not holds_run(run_dir):
        return cfg
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint).get("config")
        ours = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))
        if isinstance(saved, dict) and {**saved, "resume": None} == {**ours, "resume": None}:
            log.info("%s holds this job's run (same config): continuing it from its checkpoint", run_dir)
            with open_dict(cfg):
                cfg.resume = str(run_dir)
            return cfg
    refuse_existing_run(run_dir, "hydra.run.dir")
    return cfg


def _user_error(err: BaseException) -> KfcrunError | None:
    """The one-line error for ``err``: itself for a :class:`KfcrunError`, a line for a failed write."""
    if isinstance(err, KfcrunError):
        return err
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
        where = err.filename or "the run directory"
        return KfcrunError(
            f"cannot write {where} ({err.strerror}); fix: free space or make the run directory writable, "
            "or run elsewhere with hydra.run.dir=<a writable directory>"
        )
    return None


def run_resumed(request: ResumeRequest) -> None:
    """Continue the run ``request`` describes, in its own directory (no Hydra, no new directory)."""
    _log_to(request.run_dir / LOG_FILE)
    log.info("resume=%s %s", request.run_dir, " ".join(request.overrides))
    try:
        _train_task(request.cfg, request.run_dir, request.overrides)
    except (KfcrunError, OSError) as err:
        error = _user_error(err)
        if error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _print_error(error)
        sys.exit(error.exit_code)


def _leave_the_log_file_to_rank_zero() -> None:
    """A submitit task other than rank 0 ran Hydra's job logging too: detach its log-file handler.

    Every task of a submitit job shares rank 0's run directory, so without this each rank
    would append its lines (submitit's among them) to rank 0's ``kfcrun.log``.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def _log_to(log_file: Path) -> None:
    """Log as Hydra's job logging does (stdout and the run's log file), for runs outside Hydra."""
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_file, mode="a")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> float | None:
    return run_task(cfg)


def _print_error(err: KfcrunError) -> None:
    from kfcrun import launch

    if launch.is_follower():
        # Rank 0 reports what every rank agrees on (a signal, divergence, a lost rank) in one line.
        from kfcrun.signals import RunInterrupted
        from kfcrun.train import RankLostError

        if isinstance(err, (RunInterrupted, TrainingDivergedError, RankLostError)):
            return
        print(f"kfcrun: rank {os.environ.get('RANK', '?')}: {err}", file=sys.stderr, flush=True)
        return
    print(f"kfcrun: {err}", file=sys.stderr, flush=True)


def _follow() -> None:
    """A rank other than 0 under torchrun: no Hydra, no preflight; train rank 0's job."""
    import warnings

    from kfcrun import launch

    warnings.filterwarnings("ignore")  # rank 0 shows the run's warnings once
    logging.getLogger().setLevel(logging.ERROR)

    def train_job(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
        try:
            _train_task(cfg, run_dir, overrides)
        except (KfcrunError, OSError) as err:
            error = _user_error(err)
            if error is None:
                raise
            _print_error(error)
            sys.exit(error.exit_code)

    launch.follow(train_job)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``kfcrun``."""
    global PLANNED_RUN_DIR
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    from kfcrun import launch

    if launch.launched_world_size() > 1:
        launch.context()  # join the process group before anything else (every rank)
        if launch.is_follower():
            _follow()
            return
        try:
            _refuse_sweep_under_torchrun(sys.argv[1:])
            _main()
        except SystemExit as stop:
            launch.record_exit_code(stop.code if isinstance(stop.code, int) else 1)
            raise
        return
    _main()


def _refuse_sweep_under_torchrun(argv: Sequence[str]) -> None:
    if "-m" in argv or "--multirun" in argv:
        err = ConfigError(
            "config error: -m (a sweep) under torchrun: every process would run every job; "
            "fix: run the sweep with +cluster=slurm or +cluster=local (one data-parallel job per value), "
            "or one torchrun per value"
        )
        _print_error(err)
        sys.exit(err.exit_code)


def _main() -> None:
    """Preflight, then Hydra (a new run or sweep) or a resume (rank 0 of a data-parallel run too)."""
    global PLANNED_RUN_DIR
    try:
        try:
            plan = preflight(sys.argv[1:])
        except KfcrunError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _print_error(err)
            sys.exit(err.exit_code)
        if plan is not None and plan.resume is not None:
            run_resumed(plan.resume)
            return
        PLANNED_RUN_DIR = plan.run_dir if plan is not None else None
        _hydra_main()
    except KeyboardInterrupt:  # Ctrl-C outside a run (while composing, importing): one line
        print("kfcrun: interrupted by SIGINT before the run started; nothing was written", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # `kfcrun --help | head`: the reader left. Point stdout at /dev/null so that Python's
        # final flush does not fail again, and exit as a process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    if FAILED_JOBS:
        print(f"kfcrun: {len(FAILED_JOBS)} sweep job(s) failed:", file=sys.stderr)
        for run_dir, message in FAILED_JOBS:
            print(f"  {run_dir}: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
