"""Which examples of a global mini-batch a data-parallel rank holds, and random draws by global index.

Data parallelism splits each global mini-batch of ``B`` examples over ``P`` ranks. kfcrun
deals the examples out **interleaved**: rank ``r`` holds global positions
``r, r + P, r + 2P, ...`` (:class:`BatchShard`). Two things follow:

* a *leading subset* of the global batch (the first ``m = ceil(f B)`` examples, which
  KFC-pre's statistics and ``nu`` use) is, on rank ``r``, the rank's own leading
  ``|{i < m : i = r mod P}|`` examples (:meth:`BatchShard.local_count`), spread evenly
  over the ranks. One process (``P = 1``) is the special case ``r = 0``.
* a random draw per example is made for the WHOLE global subset from one generator that
  every rank seeds alike, and each rank keeps its rows (:class:`ExampleDraws`). The
  generator then advances by the same amount on every rank and in one process, so the
  sampled targets of global example ``i`` do not depend on ``P``: the targets are a
  function of the global example index. Categorical targets are drawn by inverse CDF from
  uniforms, which needs no host sync and no per-rank generator.

Only tensor bookkeeping here; the collectives live in :mod:`kfcrun.distributed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SINGLE", "BatchShard", "ExampleDraws"]


@dataclass(frozen=True)
class BatchShard:
    """Rank ``rank`` of ``world_size`` holds global batch positions ``rank, rank + P, ...``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world={self.world_size}")

    @property
    def single(self) -> bool:
        """Whether this is one process (the whole batch)."""
        return self.world_size == 1

    def local_count(self, global_count: int) -> int:
        """How many of the first ``global_count`` global positions this rank holds."""
        return len(range(self.rank, global_count, self.world_size))

    def rows(self, global_count: int) -> slice:
        """This rank's rows of a tensor whose first dim is ``global_count`` global positions."""
        return slice(self.rank, global_count, self.world_size)

    def global_batch(self, local_batch: int) -> int:
        """The global batch size of equal shards of ``local_batch`` examples (``local_batch * P``)."""
        return local_batch * self.world_size


#: One process: the whole batch.
SINGLE = BatchShard()


class ExampleDraws:
    """Random numbers indexed by global example: ``global_count`` rows drawn, this rank's rows kept.

    Args:
        generator: seeded alike on every rank (``None``: torch's global generator).
        shard: which rows this rank keeps (default: all, one process).
        global_count: examples of the global subset being drawn for; ``None``: the
            local batch is the whole batch (one process).
    """

    def __init__(
        self,
        generator: torch.Generator | None,
        shard: BatchShard = SINGLE,
        global_count: int | None = None,
    ) -> None:
        self.generator, self.shard, self.global_count = generator, shard, global_count

    def _global_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.shard.single or self.global_count is None:
            return shape
        expected = self.shard.local_count(self.global_count)
        if shape[0] != expected:
            raise ValueError(
                f"kfc: rank {self.shard.rank} holds {shape[0]} examples, expected {expected} of "
                f"{self.global_count} (interleaved over {self.shard.world_size} ranks)"
            )
        return (self.global_count, *shape[1:])

    def _keep(self, draws: Tensor) -> Tensor:
        if self.shard.single or self.global_count is None:
            return draws
        return draws[self.shard.rows(self.global_count)]

    def uniform(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """``U[0, 1)`` draws of ``shape`` (first dim: this rank's examples)."""
        full = torch.rand(self._global_shape(shape), generator=self.generator, dtype=dtype, device=device)
        return self._keep(full)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """``N(0, 1)`` draws of ``shape`` (first dim: this rank's examples)."""
        full = torch.randn(self._global_shape(shape), generator=self.generator, dtype=dtype, device=device)
        return self._keep(full)


def as_draws(source: torch.Generator | ExampleDraws | None) -> ExampleDraws:
    """``source`` as :class:`ExampleDraws` (a generator draws for the local batch only)."""
    return source if isinstance(source, ExampleDraws) else ExampleDraws(source)
