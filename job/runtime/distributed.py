"""Which process this is, and the few collective operations training needs (docs/distributed.md).

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous; one process without it is
world size 1 and never touches ``torch.distributed``. Everything exchanged is a tensor of
numbers: nothing is pickled between processes either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def from_env() -> "Topology":
        return Topology(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )

    def device(self, wanted: str) -> torch.device:
        """The device of this process: cuda:LOCAL_RANK on a GPU host, else the CPU."""
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        if wanted == "cuda" and self.distributed:
            wanted = f"cuda:{self.local_rank}"
        return torch.device(wanted)

    def start(self, device: torch.device, timeout_minutes: float) -> None:
        """Join the process group: NCCL between GPUs, gloo between CPU processes. The timeout
        bounds how long a rank waits for a peer that died, so a lost rank ends the group."""
        if self.distributed and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo",
                timeout=timedelta(minutes=timeout_minutes),
            )

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # --- collectives (no-ops in a single process) -------------------------------------------

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_ints(self, values: list[int], device: torch.device) -> list[int]:
        """Rank 0's ``values`` on every rank."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.int64, device=device)
        dist.broadcast(tensor, src=0)
        return [int(v) for v in tensor.tolist()]

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on any: all ranks leave the loop at the same step."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([int(flag)], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def gather_indices(self, indices: np.ndarray, device: torch.device) -> np.ndarray:
        """Every rank's trained sample indices, concatenated (what the whole group trained on)."""
        if not self.distributed:
            return indices
        size = self.world_max(len(indices), device)
        padded = torch.full((size,), -1, dtype=torch.int64, device=device)
        padded[: len(indices)] = torch.as_tensor(indices, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        flat = torch.cat(gathered).cpu().numpy()
        return flat[flat >= 0]

    def world_max(self, value: int, device: torch.device) -> int:
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())
