"""PyTorch distributed data parallel for `xmr train` under `torchrun`;
one plain process otherwise."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

logger = logging.getLogger(__name__)
T = TypeVar("T")


def partition(items: list[T], rank: int, world_size: int) -> list[T]:
    """Rank `rank`'s share of `items`: every item is used, every rank gets the same count.

    The list is padded by cycling from its start (as `DistributedSampler` does), so a market
    with fewer batches than ranks still trains instead of being dropped.
    """
    if not items:
        return []
    per_rank = -(-len(items) // world_size)  # ceil
    padded = [items[i % len(items)] for i in range(per_rank * world_size)]
    return padded[rank::world_size]


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int

    @classmethod
    def single(cls) -> Distributed:
        return cls(0, 1)

    @classmethod
    def from_env(cls, device: str = "cpu") -> Distributed:
        """Join the process group that `torchrun` describes in the environment, if any."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls.single()
        if not torch_dist.is_initialized():
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))  # nccl collectives use this device
            backend = "nccl" if device.startswith("cuda") else "gloo"
            torch_dist.init_process_group(backend=backend)
        rank = torch_dist.get_rank()
        logger.info("distributed rank=%d world_size=%d device=%s", rank, world_size, device)
        return cls(rank, world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        device = next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def shard(self, batches: list[T]) -> list[T]:
        """This rank's share of rank 0's batches; every rank runs the same number of steps.

        Rank 0's list is broadcast because the ranks' random states drift apart once each has
        masked its own shard, and a shard of a different shuffle would overlap the others.
        """
        if self.world_size == 1:
            return batches
        shared: list[list[T] | None] = [batches if self.is_main else None]
        torch_dist.broadcast_object_list(shared, src=0)
        assert shared[0] is not None
        return partition(shared[0], self.rank, self.world_size)

    def barrier(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def device_for(requested: str) -> str:
    """The device of this process: under torchrun, `cuda` and `auto` mean cuda:LOCAL_RANK."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{local_rank}"
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return "cpu"
