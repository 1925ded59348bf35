"""Configs compose, validate, and refuse bad values with one clear line before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from kfcrun.cli import _compose, _validate, preflight
from kfcrun.errors import ConfigError
from tests.conftest import run_cli
from tests.helpers.configs import EXPERIMENTS


def test_experiment_list_is_what_the_issues_ask_for():
    assert {"smoke", "cifar10_sgd", "svhn_sgd", "cifar10_bn_sgd"} <= set(EXPERIMENTS)
    assert {"cifar10_resnet18_sgd", "cifar10_resnet18_kfc"} <= set(EXPERIMENTS)  # issue 11


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = _compose([f"experiment={experiment}"])
    _validate(cfg)
    assert cfg.name == experiment
    for key in (
        "dataset.root",
        "dataset.download",
        "trainer.batch_size",
        "trainer.max_iters",
        "trainer.max_epochs",
        "trainer.eval_every",
        "trainer.device",
        "trainer.checkpoint_every",
        "optimizer.lr",
        "optimizer.momentum",
        "optimizer.weight_decay",
        "optimizer.avg_timescale",
        "seed",
        "resume",
    ):
        node, _, leaf = key.rpartition(".")
        assert leaf in (cfg[node] if node else cfg), f"{experiment} lacks the contract key {key}"


def test_paper_settings_of_the_baselines():
    sgd = _compose(["experiment=cifar10_sgd"])
    assert sgd.trainer.batch_size == 128 and sgd.optimizer.momentum == 0.9
    assert sgd.optimizer.weight_decay == 0.004 and sgd.optimizer.layer_weight_decay.fc10 == 1.0
    assert sgd.optimizer.bias_lr_scale == 2.0 and sgd.optimizer.avg_timescale == 50_000
    assert sgd.dataset.pixel_scale == 1.0 and sgd.dataset.mean == "image"
    bn = _compose(["experiment=cifar10_bn_sgd"])
    assert (
        bn.model.batch_norm is True
        and bn.optimizer.weight_decay == 0.0
        and not bn.optimizer.layer_weight_decay
    )
    svhn = _compose(["experiment=svhn_sgd"])
    assert svhn.model.name == "srivastava_svhn" and svhn.model.max_norm == 4.0


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["optimizer.lr=-1"],
            r"optimizer\.lr=-1 is out of range; allowed: a number > 0; fix: e\.g\. optimizer\.lr=",
        ),
        (["trainer.batch_size=0"], r"trainer\.batch_size=0 is out of range; allowed: an integer >= 1"),
        (["trainer.batch_size=abc"], r"trainer\.batch_size=abc has the wrong type; allowed: an integer >= 1"),
        (
            ["optimizer.momentum=1.0"],
            r"optimizer\.momentum=1\.0 is out of range; allowed: a number >= 0 and < 1",
        ),
        (["trainer.device=gpu"], r"trainer\.device=gpu .*allowed: auto \| cpu \| cuda \| cuda:N"),
        (["dataset.mean=median"], r"dataset\.mean=median .*allowed: one of image \| channel \| none"),
        (["foo=1"], r"unknown key foo \(value 1\).*fix: .*\+foo=1"),
        (["+foo.bar=1"], r"unknown key foo\.bar \(value 1\); allowed keys here: .*dataset\.\*"),
        (["experiment=nope"], r"unknown experiment 'nope'; allowed: .*cifar10_sgd.*fix: experiment="),
        (["optimizer=adam"], r"unknown optimizer 'adam'; allowed: .*sgd"),
        (["trainer.max_iters=null", "trainer.max_epochs=null"], r"both null"),
        (["resume=/nonexistent/run"], r"resume=/nonexistent/run has no checkpoint"),
        (["+optimizer.layer_weight_decay.fc11=1"], r"unknown layer\(s\) \['fc11'\]"),
        (["optimizer.lr=0.1,0.2"], r"lists several values but this is a single run; fix: add -m"),
        (
            ["optimizer=kfc_pre", "optimizer.refresh_until=-1"],
            r"optimizer\.refresh_until=-1 is out of range; allowed: an integer >= 0",
        ),
        (
            ["optimizer=kfc_pre", "optimizer.skip_layers=[fc11]"],
            r"skip_layers entries \['fc11'\] name no module",
        ),
        (
            ["optimizer=kfc_pre", "optimizer.likelihood=poisson"],
            r"optimizer\.likelihood=poisson is out of range; allowed: one of cross_entropy",
        ),
        (["optimizer=kfc_pre", "optimizer.inverse_dtype=float16"], r"optimizer\.inverse_dtype=float16"),
        (["trainer.lr_schedule=linear"], r"trainer\.lr_schedule=linear"),
        (["model=torchvision", "model.arch=resnet19"], r"model\.arch=resnet19"),
    ],
)
def test_bad_settings_are_refused_with_one_line(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        preflight(["experiment=smoke", *overrides])
    assert "\n" not in str(info.value)


def test_every_swept_value_is_checked():
    with pytest.raises(ConfigError, match=r"optimizer\.lr=-2 is out of range"):
        preflight(["-m", "experiment=smoke", "optimizer.lr=0.1,-2"])
    preflight(["-m", "experiment=smoke", "optimizer.lr=0.1,0.2", "seed=0,1"])


def test_cli_refuses_before_writing_anything(tmp_path: Path, cache_dir: Path):
    result = run_cli(["experiment=smoke", "optimizer.lr=-1"], cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "kfcrun: config error: optimizer.lr=-1 is out of range; allowed: a number > 0; "
        "fix: e.g. optimizer.lr=0.003"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/ directory was created


def test_cli_shows_the_traceback_with_hydra_full_error(tmp_path: Path, cache_dir: Path):
    result = run_cli(["experiment=nope"], cwd=tmp_path, cache=cache_dir, HYDRA_FULL_ERROR="1")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_lr_grid_sweep_is_the_papers_grid():
    cfg = _compose(["experiment=cifar10_kfc", "+sweep=lr_grid"])
    grid = [float(v) for v in cfg.hydra.sweeper.params["optimizer.lr"].split(",")]
    assert grid == [0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003]
    preflight(["-m", "experiment=cifar10_kfc", "+sweep=lr_grid"])
