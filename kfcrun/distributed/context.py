"""The process group of a data-parallel run: who am I, on which device, and counted collectives.

:func:`init_from_environment` starts ``torch.distributed`` when the launcher says there are
several processes: ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``;
a Slurm job (``hydra/launcher=submitit_slurm``, one task per GPU) sets ``SLURM_*``, and
submitit's local executor (``hydra/launcher=submitit_local``, several tasks on this machine)
its own ``SUBMITIT_LOCAL_*``; ``submitit`` turns either into the same variables. CPU runs use
gloo; CUDA runs use NCCL with one device per local rank (``cuda:LOCAL_RANK``).

Every collective kfcrun issues goes through :class:`DistributedContext`, which counts the
calls and the payload bytes per purpose in :class:`CommLog` (the tests count all-reduces;
``scripts/bench_distributed.py`` reports bytes per step).
"""

from __future__ import annotations

import datetime
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from kfcrun.errors import ConfigError

__all__ = ["CommLog", "DistributedContext", "init_from_environment", "launched_rank", "launched_world_size"]


@dataclass
class CommLog:
    """Collectives issued by this rank: ``calls[purpose]`` and ``bytes[purpose]`` (payload, per rank)."""

    calls: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    #: Wall-clock seconds this rank waited in blocking collectives (DDP's overlapped ones are not timed).
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self, purpose: str, payload: int) -> None:
        """Count one collective of ``payload`` bytes."""
        self.calls[purpose] += 1
        self.bytes[purpose] += payload

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.calls.clear()
        self.bytes.clear()
        self.seconds.clear()


#: A submitit task's variables, by executor: (its global rank, the job's number of tasks). Slurm's
#: come from ``srun``; the local executor (``hydra/launcher=submitit_local``) sets its own.
_SUBMITIT_TASK_VARIABLES = {
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS"),
    "local": ("SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS"),
}


def _submitit_task() -> tuple[int, int] | None:
    """(rank, number of tasks) of a task of a submitit job, or ``None`` outside one.

    Only a process that submitit started counts (``SUBMITIT_EXECUTOR`` set), not just any shell
    inside a Slurm allocation of several tasks.
    """
    names = _SUBMITIT_TASK_VARIABLES.get(os.environ.get("SUBMITIT_EXECUTOR", ""))
    if names is None or names[0] not in os.environ:
        return None
    return int(os.environ[names[0]]), int(os.environ.get(names[1], "1"))


def launched_world_size() -> int:
    """The number of processes the launcher started (1 outside torchrun/submitit tasks)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    task = _submitit_task()
    return task[1] if task is not None else 1


def launched_rank() -> int:
    """This process's rank among the processes the launcher started (0 outside a launch)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    task = _submitit_task()
    return task[0] if task is not None else 0


@dataclass
class DistributedContext:
    """This process's place in a data-parallel run.

    Attributes:
        rank, world_size, local_rank: as ``torchrun`` defines them.
        device: this rank's device (``cuda:local_rank`` under NCCL).
        log: the collectives issued through this object.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    log: CommLog = field(default_factory=CommLog)
    _groups: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and prints progress."""
        return self.rank == 0

    # -- collectives --------------------------------------------------------------------------
    def all_reduce(self, tensor: Tensor, purpose: str) -> Tensor:
        """Sum ``tensor`` over ranks in place (one call); returns it."""
        self.log.record(purpose, tensor.numel() * tensor.element_size())
        with self.timed(purpose):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @contextmanager
    def timed(self, purpose: str) -> Iterator[None]:
        """Add the seconds spent inside the block to ``log.seconds[purpose]`` (device synchronized)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.log.seconds[purpose] = self.log.seconds.get(purpose, 0.0) + time.perf_counter() - start

    def broadcast(self, tensor: Tensor, src: int, purpose: str, async_op: bool = False) -> Any:
        """Broadcast ``tensor`` from rank ``src`` (on the ``purpose`` group if one was made)."""
        self.log.record(purpose, tensor.numel() * tensor.element_size() if self.rank == src else 0)
        return dist.broadcast(tensor, src=src, group=self._groups.get(purpose), async_op=async_op)

    def broadcast_object(self, obj: Any, src: int = 0, purpose: str = "control") -> Any:
        """Rank ``src``'s Python object on every rank (pickled)."""
        self.log.record(purpose, 0)
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any, purpose: str = "control") -> list[Any]:
        """Every rank's ``obj``, by rank."""
        self.log.record(purpose, 0)
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def side_group(self, purpose: str) -> None:
        """Issue ``purpose``'s collectives on a process group of their own (all ranks must call this)."""
        if purpose not in self._groups:
            self._groups[purpose] = dist.new_group(list(range(self.world_size)))

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()

    def close(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()


def _export_submitit_environment() -> None:
    """Set ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/... from a submitit task's variables.

    ``MASTER_ADDR`` is the job's first host (this machine for the local executor); ``MASTER_PORT``
    is kept if set, else derived from the job id, so that every task of a job agrees on it.
    """
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError as err:
        raise ConfigError(
            "config error: this is one of several submitit tasks but submitit is not installed, so the "
            "process group cannot be formed; fix: pip install 'kfcrun[cluster]', or launch with torchrun"
        ) from err
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)  # keeps MASTER_PORT


def init_from_environment(timeout_s: float = 1800.0) -> DistributedContext:
    """Join the launcher's process group (``launched_world_size() > 1``).

    With CUDA the group has NCCL for CUDA tensors and gloo for CPU tensors, and this rank's
    device is ``cuda:LOCAL_RANK``; without CUDA it is gloo on the CPU. The runner may move a
    rank to the CPU (``trainer.device=cpu``) by setting :attr:`DistributedContext.device`.
    """
    if "WORLD_SIZE" not in os.environ:
        _export_submitit_environment()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, device=device)
