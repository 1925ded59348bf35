"""Data parallel on 2 gloo ranks with global batch B equals 1 process with batch B (float64, no BN).

Each case spawns two processes (~15 s on a loaded 2-core machine); the default suite runs one
case per method, ``-m slow`` the other ``grad_worker_fraction`` ends and exact damping.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.workers import run


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    den = sum(float(b[k].norm() ** 2) for k in b) ** 0.5
    return num / den


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "sgd"},
        pytest.param({"method": "kfc_pre", "fraction": 1.0}, marks=pytest.mark.slow),
        {"method": "kfc_pre", "fraction": 0.0},
        pytest.param(
            {"method": "kfc_pre", "fraction": 1.0, "damping_mode": "exact", "init": 32},
            marks=pytest.mark.slow,
        ),
        {"method": "kfac", "fraction": 1.0},
        pytest.param({"method": "kfac", "fraction": 0.0}, marks=pytest.mark.slow),
    ],
    ids=["sgd", "kfc_pre-f1", "kfc_pre-f0", "kfc_pre-exact-init", "kfac-f1", "kfac-f0"],
)
def test_two_ranks_equal_one(tmp_path: Path, spec: dict) -> None:
    spec = {"steps": 10, "batch": 16, **spec}
    one, info_one = run(1, spec, tmp_path / "one.pt")
    two, info_two = run(2, spec, tmp_path / "two.pt")
    start = {k: v for k, v in one.items()}
    assert _relative(two, one) < 1e-6
    # the runs moved (a test that can fail): parameters differ from the initial network
    from tests.helpers.nets import two_conv_net

    init = dict(two_conv_net(0).named_parameters())
    assert _relative({k: init[k].detach() for k in start}, start) > 1e-3
    if spec["method"] != "sgd":
        # one all-reduce per statistics update on 2 ranks (none in one process)
        assert info_two["stats_calls"] and set(info_two["stats_calls"]) == {1}
        assert set(info_one["stats_calls"]) == {0}
        assert info_two["inverse_updates"] == info_one["inverse_updates"] > 1
        assert info_two["has_all_inverses"]
