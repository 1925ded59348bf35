"""The ``assumptions`` config section: its rules live on :class:`AssumptionSettings`."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from kfcrun.schema import rules_of
from kfcrun.studies.assumptions import AssumptionSettings
from tests.conftest import REPO_ROOT

#: (allowed, example) of every key, as config errors show them.
EXPECTED_RULES = {
    "assumptions.num_examples": ("an integer >= 1", "2000"),
    "assumptions.batch_size": ("an integer >= 1", "250"),
    "assumptions.max_offset": ("an integer >= 1", "4"),
    "assumptions.feature_maps": ("a non-empty list, each entry an integer >= 0", "[0,1,2]"),
    "assumptions.poolings": ("a non-empty list, each entry one of paper | max | avg", "[paper,avg]"),
    "assumptions.checkpoint_avg": ("a string or null", "outputs/<date>/<run>"),
    "assumptions.train_iters": ("an integer >= 1", "2000"),
    "assumptions.mode": ("one of eval | train", "eval"),
}


def test_every_field_has_its_rule():
    rules = rules_of(AssumptionSettings, "assumptions.")
    assert {k: (r.allowed, r.example) for k, r in rules.items()} == EXPECTED_RULES
    assert list(rules) == [f"assumptions.{f.name}" for f in dataclasses.fields(AssumptionSettings)]


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("num_examples", 1, 0),
        ("batch_size", 250, True),
        ("max_offset", 4, 0),
        ("feature_maps", [0, 1, 2], [0, -1]),
        ("feature_maps", [0], []),
        ("poolings", ["paper", "max", "avg"], ["maxx"]),
        ("checkpoint_avg", None, 3),
        ("checkpoint_avg", "outputs/run", ["outputs/run"]),
        ("train_iters", 2000, 2.5),
        ("mode", "train", "test"),
    ],
)
def test_rules_accept_and_refuse(key: str, good, bad):
    rule = rules_of(AssumptionSettings)[key]
    assert rule.problem(good) is None
    assert rule.problem(bad) is not None


def test_defaults_are_those_of_the_config_file():
    section = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "configs" / "config.yaml").assumptions)
    assert AssumptionSettings(**section) == AssumptionSettings()
    for name, rule in rules_of(AssumptionSettings).items():
        assert rule.problem(getattr(AssumptionSettings(), name)) is None, name


def test_from_config_reads_the_assumptions_section():
    cfg = OmegaConf.create(
        {"seed": 0, "assumptions": {**dataclasses.asdict(AssumptionSettings()), "mode": "train"}}
    )
    assert AssumptionSettings.from_config(cfg) == AssumptionSettings(mode="train")
