"""Gradient averaging through ``torch.nn.parallel.DistributedDataParallel``, its traffic counted.

DDP all-reduces the gradients in buckets (25 MB by default) while the backward pass runs,
and divides by the world size, so ``.grad`` holds the mean over ranks of the per-rank
mean-loss gradients: with equal shards, the gradient of the global mini-batch's mean loss.
A communication hook (DDP's own all-reduce hook) records each bucket in the context's
:class:`~kfcrun.distributed.context.CommLog` under ``"gradients"``.

DDP also broadcasts rank 0's buffers (BatchNorm running statistics) at every forward;
the batch statistics BatchNorm normalizes with in training are per rank (the local
slice), so a network with BatchNorm does not compute what one process would (use
``torch.nn.SyncBatchNorm`` on CUDA for that).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from .context import DistributedContext

__all__ = ["wrap_data_parallel"]


def wrap_data_parallel(model: nn.Module, ctx: DistributedContext) -> DistributedDataParallel:
    """``model`` wrapped in DDP on ``ctx.device``; gradient buckets are counted in ``ctx.log``."""
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids)

    def counted_allreduce(state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        ctx.log.record("gradients", buffer.numel() * buffer.element_size())
        return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]

    # DDP checks the hook's annotations as objects; this module's are strings (PEP 563).
    counted_allreduce.__annotations__ = {
        "state": object,
        "bucket": dist.GradBucket,
        "return": torch.futures.Future[torch.Tensor],
    }
    ddp.register_comm_hook(None, counted_allreduce)
    return ddp
