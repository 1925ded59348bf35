"""Data parallelism on ``torch.distributed``: process group, factor all-reduce, inverse work split.

* :mod:`~kfcrun.distributed.context`: joining the launcher's process group (torchrun or
  Slurm), counted collectives;
* :mod:`~kfcrun.distributed.buckets`: one flat buffer per collective (upper triangles of the factors);
* :mod:`~kfcrun.distributed.assignment`: inverse owners by greedy ``d^3`` cost;
* :mod:`~kfcrun.distributed.curvature_comm`: the curvature's communicator (KAISA's
  ``grad_worker_fraction`` ends);
* :mod:`~kfcrun.distributed.gradients`: DistributedDataParallel with counted traffic.

Imports the curvature, never the optimizers or the runner.
"""

from .assignment import assign_by_cost, block_cost, load_per_rank
from .buckets import pack_triangles, unpack_triangles
from .context import CommLog, DistributedContext, init_from_environment, launched_rank, launched_world_size
from .curvature_comm import DataParallelCurvatureComm, gradient_workers
from .gradients import wrap_data_parallel

__all__ = [
    "CommLog",
    "DataParallelCurvatureComm",
    "DistributedContext",
    "assign_by_cost",
    "block_cost",
    "gradient_workers",
    "init_from_environment",
    "launched_rank",
    "launched_world_size",
    "load_per_rank",
    "pack_triangles",
    "unpack_triangles",
    "wrap_data_parallel",
]
