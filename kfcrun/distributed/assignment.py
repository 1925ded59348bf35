"""Which rank fits which block's damped inverse: greedy longest-processing-time on ``d^3``.

The cost of a block is the work of its inverse update: a ``d x d`` factor costs ``d^3``
(a Cholesky or an eigendecomposition), a diagonal one ``d``, a batch of ``g`` factors
(a grouped convolution, the per-channel blocks of a normalization layer) ``g`` times that;
a Kronecker block pays for both factors. Blocks are assigned in decreasing cost, each to
the rank with the least total so far (ties: the lower rank; equal costs: the earlier
block), as KAISA does (``AssignmentStrategy.COMPUTE``, factors of a layer colocated). LPT
is within ``4/3`` of the best possible maximum load (Graham 1969).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from kfcrun.curvature import CurvatureBlock

__all__ = ["assign_by_cost", "block_cost", "load_per_rank"]


def block_cost(block: CurvatureBlock) -> float:
    """``sum over factors of (batch size) * d^3`` (``d`` for a diagonal factor)."""
    total = 0.0
    for shape in block.factor_shapes().values():
        if len(shape) >= 2 and shape[-1] == shape[-2]:
            total += math.prod(shape[:-2]) * float(shape[-1]) ** 3
        else:
            total += float(math.prod(shape))
    return total


def assign_by_cost(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """``{name: rank}``: greedy LPT (largest cost first, to the least-loaded rank)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    order = sorted(costs, key=lambda name: (-costs[name], list(costs).index(name)))
    owners: dict[str, int] = {}
    for name in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += costs[name]
    return {name: owners[name] for name in costs}


def load_per_rank(costs: Mapping[str, float], owners: Mapping[str, int], world_size: int) -> list[float]:
    """The summed cost of each rank's blocks."""
    loads = [0.0] * world_size
    for name, rank in owners.items():
        loads[rank] += costs[name]
    return loads
