"""What :class:`~kfcrun.curvature.KFCCurvature` needs from a data-parallel communicator.

The curvature stays free of ``torch.distributed``: a communicator implementing
:class:`CurvatureComm` (:class:`kfcrun.distributed.DataParallelCurvatureComm`) is attached as
``KFCCurvature.comm`` and the manager calls it at three seams:

1. **statistics**: each rank estimates Eqn 32 on ITS examples of the global statistics
   subset (targets drawn by global example index, :mod:`kfcrun.curvature.sharding`);
   :meth:`CurvatureComm.reduce_estimates` turns the per-rank means into the mean over the
   whole subset (an example-weighted average) before Eqn 33 folds it in, so every rank
   holds the same factors;
2. **inverses**: every block has an owner rank (:meth:`CurvatureComm.owner`); only the
   owner fits the block's damped inverse, then :meth:`CurvatureComm.share_inverses` makes
   the fits available where the solves happen;
3. **solves**: with ``solve_on_owner`` the owner solves its blocks and
   :meth:`CurvatureComm.share_solutions` sends the preconditioned gradients to the other
   ranks; otherwise every rank solves every block with the shared inverses.

Single process: ``KFCCurvature.comm`` is ``None`` and none of this runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from torch import Tensor

from .blocks import CurvatureBlock, Estimate
from .sharding import BatchShard

__all__ = ["CurvatureComm"]


class CurvatureComm(Protocol):
    """A data-parallel communicator for the curvature (see the module docstring)."""

    #: Which examples of a global batch this rank holds.
    shard: BatchShard
    #: ``True``: preconditioned gradients are computed by the owner and sent; ``False``: inverses are sent.
    solve_on_owner: bool

    def owner(self, name: str) -> int:
        """The rank that fits block ``name``'s damped inverse."""
        ...

    @property
    def rank(self) -> int:
        """This process's rank."""
        ...

    def reduce_estimates(
        self, estimates: Mapping[str, Estimate], local_examples: int, global_examples: int
    ) -> dict[str, Estimate]:
        """The mean over all ranks' examples of per-rank means over ``local_examples`` each."""
        ...

    def share_inverses(self, blocks: Mapping[str, CurvatureBlock], names: list[str]) -> None:
        """Copy the fitted inverses of ``names`` from their owners to every rank."""
        ...

    def all_reduce_sum(self, tensor: Tensor, purpose: str) -> Tensor:
        """``tensor`` summed over ranks, in place (e.g. the parts of ``nu``)."""
        ...

    def share_solutions(self, solved: dict[str, Tensor], grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every block's solve: this rank's own in ``solved``, the others' received from their owners."""
        ...
