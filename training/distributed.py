"""PyTorch distributed data parallel for `xmr train` under `torchrun`; one plain process otherwise."""

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
            backend = "nccl" if device.startswith("cuda") else "gloo"
            torch_dist.init_process_group(backend=backend)
        rank = torch_dist.get_rank()
        logger.info("distributed rank=%d world_size=%d", rank, world_size)
        return cls(rank, world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        return nn.parallel.DistributedDataParallel(model)

    def shard(self, batches: list[T]) -> list[T]:
        """This rank's share of an epoch's batches; every rank runs the same number of steps."""
        if self.world_size == 1:
            return batches
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size]

    def barrier(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def device_for(requested: str) -> str:
    """`auto` picks the local CUDA device under torchrun, or the first, or the CPU."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"
