"""The single-process pieces of data parallelism, against their definitions."""

from __future__ import annotations

import itertools

import pytest
import torch

from kfcrun.curvature import BatchShard, ExampleDraws, KFCCurvature, SoftmaxCrossEntropy
from kfcrun.curvature.likelihoods import Bernoulli, Gaussian
from kfcrun.distributed import assign_by_cost, block_cost, gradient_workers, load_per_rank
from kfcrun.distributed.buckets import pack_bytes, pack_triangles, unpack_bytes, unpack_triangles
from kfcrun.errors import ConfigError
from kfcrun.models.resnet import ResNet18Cifar


def _symmetric(*shape: int) -> torch.Tensor:
    a = torch.randn(*shape, dtype=torch.float64)
    return a @ a.transpose(-1, -2)


def test_triangles_round_trip_and_are_half_the_numbers():
    tensors = [_symmetric(5, 5), _symmetric(3, 4, 4), torch.randn(7, dtype=torch.float32), torch.randn(2, 3)]
    buffer, layouts = pack_triangles(tensors)
    assert buffer.numel() == 15 + 3 * 10 + 7 + 6
    assert buffer.dtype == torch.float64
    back = unpack_triangles(buffer, layouts)
    for a, b in zip(tensors, back, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_bytes_round_trip_bitwise():
    tensors = [torch.randn(3, 4, dtype=torch.float64), torch.arange(5), torch.tensor(2.5), torch.randn(2)]
    buffer, layouts = pack_bytes(tensors, torch.device("cpu"))
    assert buffer.dtype == torch.uint8 and buffer.numel() == 96 + 40 + 4 + 8
    for a, b in zip(tensors, unpack_bytes(buffer, layouts, torch.device("cpu")), strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype


@pytest.mark.parametrize("world", [2, 3])
def test_draws_by_global_index_do_not_depend_on_the_world_size(world: int):
    """Each rank's targets are the rows ``r, r+P, ...`` of the 1-process targets for the global batch."""
    logits = torch.randn(12, 5, dtype=torch.float64)
    for lik in (SoftmaxCrossEntropy(), Gaussian(), Bernoulli()):
        one = lik.sample(logits, torch.Generator().manual_seed(3))
        for rank in range(world):
            shard = BatchShard(rank, world)
            draws = ExampleDraws(torch.Generator().manual_seed(3), shard, 12)
            mine = lik.sample(logits[shard.rows(12)], draws)
            assert torch.equal(mine, one[rank::world]), (type(lik).__name__, rank)


def test_inverse_cdf_sampling_has_the_softmax_frequencies():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]], dtype=torch.float64).expand(40000, 4)
    draws = SoftmaxCrossEntropy().sample(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    p = torch.softmax(logits[0], 0)
    # 5 standard errors of a binomial proportion
    assert torch.all((freq - p).abs() < 5 * (p * (1 - p) / draws.numel()).sqrt())


def test_leading_subsets_are_spread_over_the_ranks():
    for world, total in [(2, 16), (3, 10), (4, 5)]:
        counts = [BatchShard(r, world).local_count(total) for r in range(world)]
        assert sum(counts) == total and max(counts) - min(counts) <= 1


def _optimal_max_load(costs: list[float], world: int) -> float:
    best = float("inf")
    for owners in itertools.product(range(world), repeat=len(costs)):
        loads = [0.0] * world
        for c, r in zip(costs, owners, strict=True):
            loads[r] += c
        best = min(best, max(loads))
    return best


def test_greedy_assignment_is_within_four_thirds_of_the_best():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        costs = (torch.randint(1, 30, (7,), generator=gen).double() ** 3).tolist()
        names = {f"l{i}": c for i, c in enumerate(costs)}
        owners = assign_by_cost(names, 3)
        assert max(load_per_rank(names, owners, 3)) <= 4 / 3 * _optimal_max_load(costs, 3) + 1e-9


def test_resnet18_inverses_are_balanced_over_two_and_four_ranks():
    curvature = KFCCurvature(ResNet18Cifar(num_classes=10))
    costs = {name: block_cost(block) for name, block in curvature.blocks.items()}
    conv = curvature.blocks["layer4.1.conv2"]  # 512 x (512*9) weights: Omega 4608^2, Gamma 512^2
    assert costs["layer4.1.conv2"] == 4608.0**3 + 512.0**3 == block_cost(conv)
    ranked = sorted(costs.values(), reverse=True)
    for world in (2, 4):
        loads = load_per_rank(costs, assign_by_cost(costs, world), world)
        # Lower bounds for whole blocks: mean load, largest block, two of the P+1 largest on one rank.
        lower_bound = max(sum(ranked) / world, ranked[0], ranked[world - 1] + ranked[world])
        assert max(loads) <= 1.001 * lower_bound, (world, loads)
    round_robin = load_per_rank(costs, {n: i % 2 for i, n in enumerate(costs)}, 2)
    assert max(round_robin) > 1.2 * max(load_per_rank(costs, assign_by_cost(costs, 2), 2))  # what cost buys


def test_grad_worker_fraction_ends():
    assert gradient_workers(1.0, 4) == 4
    assert gradient_workers(0.0, 4) == 1 and gradient_workers(0.25, 4) == 1
    assert gradient_workers(0.5, 2) == 1
    with pytest.raises(ConfigError, match="HYBRID-OPT"):
        gradient_workers(0.5, 4)
