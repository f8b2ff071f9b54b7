"""One process or many: the torch.distributed setup `torchrun` expects (env:// rendezvous).

`torchrun --nproc_per_node N -m latentforge train ...` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; without them the run is a single process and nothing is initialised. Backend: NCCL when each
rank has its own CUDA device, gloo otherwise (CPU).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str | None = None) -> World:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return World(rank, world_size, local_rank, dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def main_first(world: World, fn) -> None:
    """Run fn() on rank 0 while the other ranks wait; an error there is raised on every rank (with rank 0's
    message), so no rank is left waiting at a barrier for one that has given up."""
    error = None
    if world.main:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - handed to every rank, raised again below
            error = e
    if world.distributed:  # the message as UTF-8 bytes in a tensor (nothing pickled): length, then text
        text = b"" if error is None else f"{type(error).__name__}\n{error}".encode()
        n = torch.tensor([len(text)], dtype=torch.int64, device=world.device)
        dist.broadcast(n, src=0)
        if n.item():
            buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=world.device)
            if world.main:
                buf.copy_(torch.frombuffer(bytearray(text), dtype=torch.uint8))
            dist.broadcast(buf, src=0)
            if error is None:
                name, _, message = bytes(buf.cpu().tolist()).decode().partition("\n")
                raise {"ValueError": ValueError}.get(name, RuntimeError)(f"rank 0: {message}")
    if error is not None:
        raise error


def mean(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (itself for one process)."""
    if not world.distributed:
        return value
    v = value.detach().to(world.device, torch.float32, copy=True)  # NCCL reduces device tensors only
    dist.all_reduce(v)
    return v / world.world_size
