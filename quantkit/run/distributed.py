"""Calibration spread over processes with torch.distributed (started by torchrun).

Every rank holds the whole model's current block and a share of the calibration batches (batch i
goes to rank i % world_size, so each batch is the very batch a single process would run). Every
decision that depends on the data is taken on reduced values, so all ranks quantize identically:
  - running statistics: max/min for ranges, sums for mean |x| and Hessians (`LayerStats.all_reduce`);
  - search losses (SmoothQuant alpha, AWQ ratios and clips) and error metrics: sums (`sum_`).
Rank 0 writes the output; the others keep only their own cached activations (for --resume).
gloo on CPU, nccl on GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def owns_batch(self, index: int) -> bool:
        return index % self.world_size == self.rank

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the sum of ``tensor`` over all ranks (identity for one process)."""
        if self.active:
            reduced = tensor.double()
            dist.all_reduce(reduced)
            tensor.copy_(reduced)
        return tensor

    def sum_values(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        return self.sum_(torch.tensor(values, dtype=torch.float64)).tolist()

    def all_reduce_stats(self, stats: dict) -> None:
        if self.active:
            for name in sorted(stats):
                stats[name].all_reduce()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def from_environment() -> Processes:
    """The process group torchrun describes in the environment (one process without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Processes(rank=dist.get_rank(), world_size=dist.get_world_size())
