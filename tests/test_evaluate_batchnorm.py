"""BatchNorm statistics recomputed for the averaged parameters (``trainer.averaged_bn``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kfcrun.checkpoint import load_checkpoint
from kfcrun.evaluate import batchnorm_statistics_for_current_parameters, evaluate
from kfcrun.logging import read_metrics
from tests.helpers.runs import train_in_process


def _net() -> nn.Sequential:
    # A dropout before a BatchNorm: if it ran in training mode the statistics would change.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Dropout2d(0.5),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
        nn.BatchNorm1d(3),
    ).double()


def _brute_force_statistics(net: nn.Sequential, images: torch.Tensor, batch: int) -> list[tuple]:
    """Per BN layer: the mean over batches of the batch means and of the unbiased batch variances."""
    conv, _, bn2, _, _, _, linear, _ = net
    sums = {
        name: [torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)]
        for name, c in (("bn2", 4), ("bn1", 3))
    }
    batches = range(0, len(images), batch)
    for start in batches:
        x = images[start : start + batch]
        h = conv(x)  # dropout off
        rows = h.permute(1, 0, 2, 3).reshape(4, -1)  # channel x (examples * positions)
        sums["bn2"][0] += rows.mean(dim=1)
        sums["bn2"][1] += rows.var(dim=1, unbiased=True)
        normalized = (h - rows.mean(dim=1)[:, None, None]) / torch.sqrt(
            rows.var(dim=1, unbiased=False)[:, None, None] + bn2.eps
        )
        z = linear(F.relu(normalized * bn2.weight[:, None, None] + bn2.bias[:, None, None]).mean(dim=(2, 3)))
        sums["bn1"][0] += z.mean(dim=0)
        sums["bn1"][1] += z.var(dim=0, unbiased=True)
    n = len(batches)
    return [(m / n, v / n) for m, v in (sums["bn2"], sums["bn1"])]


def test_recomputed_statistics_are_the_batch_averages_and_everything_is_restored() -> None:
    net = _net()
    with torch.no_grad():  # parameters and running statistics far from their defaults
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        for bn in (net[2], net[7]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(17)
    net[7].momentum = 0.3
    net.train()
    net[5].eval()  # a submodule whose own mode must survive
    images = torch.randn(20, 3, 6, 6, dtype=torch.float64)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()

    expected = _brute_force_statistics(net, images, batch=8)  # batches of 8, 8 and 4
    with batchnorm_statistics_for_current_parameters(net, images, lambda x: x, batch_size=8):
        for bn, (mean, var) in zip((net[2], net[7]), expected, strict=True):
            torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
            assert int(bn.num_batches_tracked) == 3
        assert net.training and not net[5].training and net[2].training  # modes as they were
        inside = evaluate(net, images, torch.zeros(20, dtype=torch.long), lambda x: x)

    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers drawn (dropout stayed off)
    for key, value in net.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert net[2].momentum == 0.1 and net[7].momentum == 0.3
    assert net.training and not net[5].training
    outside = evaluate(net, images, torch.zeros(20, dtype=torch.long), lambda x: x)
    assert inside["nll"] != outside["nll"]  # the recomputed statistics were the ones evaluated


def test_a_network_without_batchnorm_is_left_alone() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).double()
    before = [p.clone() for p in net.parameters()]
    images = torch.randn(4, 3, dtype=torch.float64)
    rng = torch.get_rng_state()
    with batchnorm_statistics_for_current_parameters(net, images, lambda x: x):
        assert net.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_averaged_bn_changes_only_the_averaged_evaluation(tmp_path: Path, cache_dir: Path) -> None:
    """A BN network: recomputing for the averaged parameters leaves training and the current ones alone."""
    bn = ["model.batch_norm=true", "optimizer.lr=0.01", "optimizer.avg_timescale=128"]
    runs = {
        mode: train_in_process(tmp_path / mode, cache_dir, *bn, f"trainer.averaged_bn={mode}")
        for mode in ("recompute", "running")
    }
    rows = {mode: read_metrics(run / "metrics.jsonl")[-1] for mode, run in runs.items()}
    assert rows["recompute"]["iter"] == rows["running"]["iter"] == 4
    for key in ("train/nll_current", "test/error_current", "train/error_current"):
        assert rows["recompute"][key] == rows["running"][key], key
    assert math.isfinite(rows["recompute"]["train/nll"])
    assert abs(rows["recompute"]["train/nll"] - rows["running"]["train/nll"]) > 1e-6
    last = {mode: load_checkpoint(run / "checkpoints" / "last.pt")["model"] for mode, run in runs.items()}
    for key, value in last["recompute"].items():
        assert torch.equal(value, last["running"][key]), key  # the run's own BN statistics too
