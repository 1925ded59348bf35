"""The data-parallel communicator of :class:`~kfcrun.curvature.KFCCurvature` (KAISA's design).

Per statistics update (every ``T_s``): ONE all-reduce of the flattened upper triangles of
every block's estimate, each rank's estimate weighted by its share of the examples
(:func:`~kfcrun.distributed.buckets.pack_triangles`). Every rank then folds the same
global-batch estimate into its factors, so the factors are identical everywhere (as in
one process, up to the summation order).

Per inverse update (every ``T_f``): each block is fitted by ONE rank, its owner, chosen
by greedy cost (:mod:`kfcrun.distributed.assignment`). What travels afterwards is set
by ``grad_worker_fraction`` ``f`` (KAISA's knob; ``W = max(1, round(f P))`` ranks hold
each block's inverse):

* ``f = 1`` (KAISA's COMM-OPT): the owners broadcast their fits (one asynchronous
  broadcast per owner, on a process group of its own) and every rank solves every block.
  Memory per rank: the factors plus ALL inverses, ``s sum_l (a_l^2 + g_l^2)`` bytes
  twice over (``a, g`` the factor sizes, ``s`` bytes per number; exact mode adds the
  eigenvalues). Traffic: ``s sum_l (a_l^2 + g_l^2)`` per inverse update, nothing per step.
* ``f = 1/P`` (MEM-OPT; any ``f <= 1/P``): nothing is sent after a fit; the owner solves
  its blocks every step and broadcasts the preconditioned gradients. Memory per rank: the
  factors plus about ``1/P`` of the inverses. Traffic: ``s sum_l g_l a_l`` (one gradient)
  per step, nothing per inverse update.

Intermediate fractions (KAISA's HYBRID-OPT grid of gradient-worker groups) are not
implemented and are refused. Both ends give the same parameters (the same solves, done
in different places). The DDP gradient all-reduce and the factor all-reduce cost the
same in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kfcrun.curvature import CurvatureBlock, Estimate
from kfcrun.curvature.sharding import BatchShard
from kfcrun.errors import ConfigError

from .assignment import assign_by_cost, block_cost
from .buckets import Layout, byte_size, pack_bytes, pack_triangles, unpack_bytes, unpack_triangles
from .context import DistributedContext

__all__ = ["DataParallelCurvatureComm", "gradient_workers"]


def gradient_workers(fraction: float, world_size: int) -> int:
    """``W = max(1, round(f P))``; only ``W = 1`` (MEM-OPT) and ``W = P`` (COMM-OPT) are implemented."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(
            f"config error: optimizer.grad_worker_fraction={fraction}; allowed: 0 <= f <= 1; "
            "fix: 1.0 (inverses broadcast) or 0 (solutions broadcast)"
        )
    workers = max(1, round(fraction * world_size))
    if 1 < workers < world_size:
        raise ConfigError(
            f"config error: optimizer.grad_worker_fraction={fraction} on {world_size} ranks asks for "
            f"{workers} gradient workers per layer (KAISA's HYBRID-OPT), which kfcrun does not implement; "
            f"allowed: 1.0 (every rank solves, inverses broadcast) or <= {1 / world_size:g} "
            "(the owner solves, solutions broadcast); fix: optimizer.grad_worker_fraction=1.0"
        )
    return workers


class DataParallelCurvatureComm:
    """:class:`~kfcrun.curvature.parallel.CurvatureComm` over a :class:`DistributedContext`.

    Args:
        ctx: the process group.
        blocks: the curvature's blocks (their costs decide the owners).
        grad_worker_fraction: ``f`` (see the module docstring).
    """

    def __init__(
        self, ctx: DistributedContext, blocks: Mapping[str, CurvatureBlock], grad_worker_fraction: float = 1.0
    ) -> None:
        self.ctx = ctx
        self.shard = BatchShard(ctx.rank, ctx.world_size)
        self.workers = gradient_workers(grad_worker_fraction, ctx.world_size)
        self.solve_on_owner = self.workers == 1 and ctx.world_size > 1
        self.costs = {name: block_cost(block) for name, block in blocks.items()}
        self.owners = assign_by_cost(self.costs, ctx.world_size)
        ctx.side_group("inverses" if not self.solve_on_owner else "solutions")

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.ctx.rank

    def owner(self, name: str) -> int:
        """The rank that fits block ``name``."""
        return self.owners[name]

    def all_reduce_sum(self, tensor: Tensor, purpose: str) -> Tensor:
        """``tensor`` summed over ranks, in place."""
        return self.ctx.all_reduce(tensor, purpose)

    # -- statistics ---------------------------------------------------------------------------
    def reduce_estimates(
        self, estimates: Mapping[str, Estimate], local_examples: int, global_examples: int
    ) -> dict[str, Estimate]:
        """``sum_r (n_r / N) estimate_r``: ONE all-reduce of the packed upper triangles."""
        names = list(estimates)
        if not names:
            return {}
        tensors = [t for name in names for t in estimates[name]]
        buffer, layouts = pack_triangles(tensors)
        buffer.mul_(local_examples / global_examples)
        self.ctx.all_reduce(buffer, "statistics")
        reduced = iter(unpack_triangles(buffer, layouts))
        return {name: tuple(next(reduced) for _ in estimates[name]) for name in names}

    # -- inverses -----------------------------------------------------------------------------
    def share_inverses(self, blocks: Mapping[str, CurvatureBlock], names: list[str]) -> None:
        """Broadcast the fits of ``names`` from their owners: one async broadcast per owner."""
        with self.ctx.timed("inverses"):
            self._share_inverses(blocks, names)

    def _share_inverses(self, blocks: Mapping[str, CurvatureBlock], names: list[str]) -> None:
        mine = [n for n in names if self.owners[n] == self.rank]
        structures: dict[str, Any] = {}
        tensors: list[Tensor] = []
        for name in mine:
            structure, leaves = _flatten(blocks[name].inverse.fitted_state())
            structures[name] = (structure, [Layout(tuple(t.shape), t.dtype, False) for t in leaves])
            tensors.extend(leaves)
        everyone = self.ctx.all_gather_object(structures, "inverses")
        device = self.ctx.device
        own_buffer, _ = pack_bytes(tensors, device)
        pending = []
        buffers: dict[int, Tensor] = {}
        for rank, described in enumerate(everyone):
            if not described:
                continue
            size = sum(byte_size(layout) for _, layouts in described.values() for layout in layouts)
            buffer = own_buffer if rank == self.rank else torch.empty(size, dtype=torch.uint8, device=device)
            buffers[rank] = buffer
            pending.append(self.ctx.broadcast(buffer, rank, "inverses", async_op=True))
        for work in pending:
            work.wait()
        for rank, described in enumerate(everyone):
            if rank == self.rank or not described:
                continue
            layouts = [layout for _, ls in described.values() for layout in ls]
            received = iter(unpack_bytes(buffers[rank], layouts, device))
            for name, (structure, ls) in described.items():
                state = _unflatten(structure, [next(received) for _ in ls])
                blocks[name].inverse.load_fitted_state(state)

    # -- solutions ----------------------------------------------------------------------------
    def share_solutions(self, solved: dict[str, Tensor], grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every block's preconditioned gradient, broadcast by its owner (one async broadcast per owner)."""
        with self.ctx.timed("solutions"):
            return self._share_solutions(solved, grads)

    def _share_solutions(self, solved: dict[str, Tensor], grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        device = self.ctx.device
        by_rank: dict[int, list[str]] = {}
        for name in grads:
            by_rank.setdefault(self.owners[name], []).append(name)
        pending, buffers = [], {}
        for rank, names in sorted(by_rank.items()):
            if rank == self.rank:
                buffer, _ = pack_bytes([solved[n] for n in names], device)
            else:
                size = sum(grads[n].numel() * grads[n].element_size() for n in names)
                buffer = torch.empty(size, dtype=torch.uint8, device=device)
            buffers[rank] = buffer
            pending.append(self.ctx.broadcast(buffer, rank, "solutions", async_op=True))
        for work in pending:
            work.wait()
        out = dict(solved)
        for rank, names in by_rank.items():
            if rank == self.rank:
                continue
            layouts = [Layout(tuple(grads[n].shape), grads[n].dtype, False) for n in names]
            for name, tensor in zip(names, unpack_bytes(buffers[rank], layouts, device), strict=True):
                out[name] = tensor
        return {name: out[name] for name in grads}


def _flatten(value: Any) -> tuple[Any, list[Tensor]]:
    """``(structure, tensors)`` of nested dicts/lists/tuples (other leaves stay in the structure)."""
    leaves: list[Tensor] = []

    def walk(v: Any) -> Any:
        if isinstance(v, Tensor):
            leaves.append(v)
            return ("tensor",)
        if isinstance(v, dict):
            return ("dict", {k: walk(x) for k, x in v.items()})
        if isinstance(v, (list, tuple)):
            return ("list" if isinstance(v, list) else "tuple", [walk(x) for x in v])
        return ("value", v)

    return walk(value), leaves


def _unflatten(structure: Any, leaves: list[Tensor]) -> Any:
    """Inverse of :func:`_flatten`."""
    it = iter(leaves)

    def build(s: Any) -> Any:
        kind = s[0]
        if kind == "tensor":
            return next(it)
        if kind == "dict":
            return {k: build(x) for k, x in s[1].items()}
        if kind in ("list", "tuple"):
            items = [build(x) for x in s[1]]
            return items if kind == "list" else tuple(items)
        return s[1]

    return build(structure)
