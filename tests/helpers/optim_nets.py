"""Tiny float64 networks and batches shared by the optimizer tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def tiny_net(seed: int = 0, batch_norm: bool = False) -> nn.Sequential:
    """conv(2->3, 3x3, pad 1) -> [BN] -> ReLU -> maxpool 2 -> Linear(12 -> 4), float64."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(2, 3, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 4)]
    net = nn.Sequential(*layers)
    for name, p in net.named_parameters():
        if "1." not in name or not batch_norm:
            nn.init.normal_(p, std=0.5)
    return net.double()


def batch(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def model_at(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat, twin.parameters())
    return twin
