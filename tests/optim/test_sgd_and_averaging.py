"""SGD baseline, per-parameter settings and the shared iterate averaging, against hand computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from kfcrun.models import CudaConvnetCifar10
from kfcrun.optim import SGD, averaging_decay, build_param_groups
from kfcrun.optim.averaging import IterateAveraging
from kfcrun.optim.constraints import apply_max_norm


def test_averaging_decay_uses_examples():
    # one CIFAR-10 epoch at batch 512: xi = exp(-512/50000),
    # i.e. Algorithm 1's exp(-1/tau) with tau = 97.66 batches
    assert averaging_decay(512, 50_000) == pytest.approx(math.exp(-1 / (50_000 / 512)))


def _run_sgd(mode: str, start: int, steps: int = 6):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, dtype=torch.float64))
    xi = 0.8
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, avg_decay=xi, avg_mode=mode, avg_start=start)
    iterates = [p.detach().clone()]
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(steps)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
        iterates.append(p.detach().clone())
    with opt.averaged_parameters():
        averaged = p.detach().clone()
    return p, opt, iterates, grads, averaged, xi


def test_sgd_update_matches_momentum_rule():
    p, _, iterates, grads, _, _ = _run_sgd("paper", 0)
    theta, velocity = iterates[0].clone(), torch.zeros(5, dtype=torch.float64)
    for g in grads:
        # cuda-convnet: inc = mom*inc - wc*eps*W + eps*grad (signs for descent); theta += inc
        velocity = 0.9 * velocity - 0.1 * (g + 0.01 * theta)
        theta = theta + velocity
    torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-12)


def test_paper_average_is_hand_computed_ema():
    p, _, iterates, _, averaged, xi = _run_sgd("paper", 0)
    expected = iterates[0].clone()  # theta_avg(0) = theta(0)
    for theta in iterates[1:]:
        expected = xi * expected + (1 - xi) * theta
    torch.testing.assert_close(averaged, expected, rtol=1e-12, atol=1e-12)
    # the model gets its current parameters back after evaluation
    torch.testing.assert_close(p.detach(), iterates[-1], rtol=0, atol=0)


def test_debiased_average_excludes_the_initial_iterate():
    _, _, iterates, _, averaged, xi = _run_sgd("debiased", 0)
    k = len(iterates) - 1
    weights = torch.tensor([xi ** (k - i) for i in range(1, k + 1)], dtype=torch.float64)
    expected = sum(w * t for w, t in zip(weights, iterates[1:], strict=True)) / weights.sum()
    torch.testing.assert_close(averaged, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["paper", "debiased"])
def test_average_start_restarts_from_that_iterate(mode):
    start = 3
    _, _, iterates, _, averaged, xi = _run_sgd(mode, start)
    expected = iterates[start].clone()
    if mode == "paper":
        for theta in iterates[start + 1 :]:
            expected = xi * expected + (1 - xi) * theta
    else:
        terms = iterates[start:]
        n = len(terms)
        weights = torch.tensor([xi ** (n - 1 - i) for i in range(n)], dtype=torch.float64)
        expected = sum(w * t for w, t in zip(weights, terms, strict=True)) / weights.sum()
    torch.testing.assert_close(averaged, expected, rtol=1e-12, atol=1e-12)


def test_sgd_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, avg_decay=0.9)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(6)]

    def steps(m, o, gs):
        for g in gs:
            for p, gi in zip(m.parameters(), g, strict=True):
                p.grad = gi.clone()
            o.step()

    steps(model, opt, grads[:3])
    clone = copy.deepcopy(model)
    clone_opt = SGD(clone.parameters(), lr=0.1, momentum=0.9, avg_decay=0.9)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert clone_opt.iteration == 3
    steps(model, opt, grads[3:])
    steps(clone, clone_opt, grads[3:])
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
    with opt.averaged_parameters(), clone_opt.averaged_parameters():
        for a, b in zip(model.parameters(), clone.parameters(), strict=True):
            assert torch.equal(a, b)


def test_param_groups_carry_cuda_convnet_settings():
    model = CudaConvnetCifar10()
    groups = build_param_groups(
        model, 0.001, weight_decay=0.004, layer_weight_decay={"fc10": 1.0}, bias_lr_scale=2.0
    )
    by_name = {g["name"]: g for g in groups}
    assert by_name["conv1.weight"]["weight_decay"] == 0.004 and by_name["conv1.weight"]["lr"] == 0.001
    assert by_name["fc10.weight"]["weight_decay"] == 1.0
    assert (
        by_name["conv2.bias"]["lr"] == pytest.approx(0.002) and by_name["conv2.bias"]["weight_decay"] == 0.0
    )
    assert len(groups) == 8


def test_param_groups_leave_batch_norm_undecayed():
    model = CudaConvnetCifar10(batch_norm=True)
    groups = build_param_groups(model, 0.01, weight_decay=0.1)
    bn = [g for g in groups if g["name"].startswith("bn")]
    assert len(bn) == 6 and all(g["weight_decay"] == 0.0 and g["lr"] == 0.01 for g in bn)


def test_unknown_layer_in_layer_weight_decay_is_a_config_error():
    from kfcrun.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"unknown layer\(s\) \['fc11'\].*allowed: \['conv1', 'conv2', 'conv3', 'fc10'\]"
    ):
        build_param_groups(CudaConvnetCifar10(), 0.1, layer_weight_decay={"fc11": 1.0})


def test_iterate_averaging_rejects_bad_settings():
    with pytest.raises(ValueError):
        IterateAveraging(None, 0.5, mode="polyak")
    with pytest.raises(ValueError):
        IterateAveraging(None, 1.5)


def test_max_norm_caps_each_unit():
    layer = nn.Linear(10, 4)
    with torch.no_grad():
        layer.weight.mul_(100)
        layer.weight[0].mul_(0.0001)
    small_row = layer.weight[0].clone()
    apply_max_norm(layer, 4.0)
    norms = layer.weight.norm(dim=1)
    assert torch.all(norms <= 4.0 + 1e-5)
    assert norms[1:].sub(4.0).abs().max() < 1e-5
    assert torch.equal(layer.weight[0], small_row)
