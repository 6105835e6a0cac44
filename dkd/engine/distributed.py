"""Process-group set-up. Nothing here runs at import time; the group is created by
``init_distributed`` and passed explicitly to everything that communicates.

One process without torchrun is a world of size 1 (gloo on 127.0.0.1), so DeepSpeed
initialises the same way in every launch mode.
"""
from __future__ import annotations

import datetime as _dt
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    group: object  # the class-shard group (all ranks); None when world == 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_single_process_env() -> None:
    """Torchrun sets these; a plain `dkd train` gets a world of one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def pick_device(local_rank: int, requested: str = "auto") -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU).

    ``timeout_s`` bounds every collective: if a rank dies mid-step, the others raise
    instead of hanging forever.
    """
    _set_single_process_env()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(local_rank, device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        import deepspeed  # noqa: WPS433 (import is slow; only when training)

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=_dt.timedelta(seconds=timeout_s))
    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD if world > 1 else None
    return DistContext(rank, world, local_rank, dev, backend, group)


def shutdown() -> None:
    """Leave the process group cleanly: without it, gloo's threads can abort the process
    at interpreter exit ("terminate called without an active exception")."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
