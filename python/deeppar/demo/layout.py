"""Rank layout of a PP x EP grid and the process groups it needs.

Global rank ``g`` is pipeline rank ``g // ep`` and expert-parallel rank ``g % ep``, so the
processes of one expert-parallel group are neighbours (one node, fast links) and a pipeline
runs across them. The backend is NCCL when every local rank has its own GPU, else gloo on CPU.
The rank and world come from the environment (``torchrun``: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) or from :func:`spawn_local`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Layout:
    """Where this process sits in the grid, and its groups."""

    rank: int
    world: int
    pp: int
    ep: int
    device: torch.device
    backend: str
    pp_group: Any = None  # the pipeline through this process (pp ranks, same ep rank)
    ep_group: Any = None  # the expert-parallel group of this pipeline rank (ep ranks)

    @property
    def pp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    def describe(self) -> str:
        return (f"{self.world} processes as PP {self.pp} x EP {self.ep} on {self.backend} "
                f"({self.device.type}); process g is pipeline rank g // {self.ep}, "
                f"expert-parallel rank g % {self.ep}")


def backend_and_device() -> tuple[str, torch.device]:
    """NCCL and this process's GPU (``LOCAL_RANK``) when the node has a GPU for each local
    process, else gloo on the CPU. Known before the process group starts."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= local and gpus > 0:
        return "nccl", torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return "gloo", torch.device("cpu")


def init(pp: int, ep: int, timeout_s: float = 120.0) -> Layout:
    """Join the process group the environment describes and build the PP and EP groups.
    Every process must call this with the same ``pp`` and ``ep``; ``pp * ep`` must equal the
    world size (``ValueError`` otherwise, before any group is created)."""
    for key in ("RANK", "WORLD_SIZE"):
        if key not in os.environ:
            raise ValueError(f"{key} is not set: launch with torchrun (or use spawn_local)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if pp * ep != world:
        raise ValueError(f"--pp {pp} x --ep {ep} = {pp * ep} processes, but WORLD_SIZE is "
                         f"{world}")
    backend, device = backend_and_device()
    if backend == "nccl":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    layout = Layout(rank, world, pp, ep, device, backend)
    # every process creates every group, in the same order (a collective each)
    for e in range(ep):
        group = dist.new_group([p * ep + e for p in range(pp)])
        if e == layout.ep_rank:
            layout.pp_group = group
    for p in range(pp):
        group = dist.new_group([p * ep + e for e in range(ep)])
        if p == layout.pp_rank:
            layout.ep_group = group
    return layout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(index: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update({"RANK": str(index), "WORLD_SIZE": str(world), "LOCAL_RANK": str(index),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    fn(*args)


def spawn_local(world: int, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in ``world`` new local processes with a torchrun-like environment
    (so ``fn`` reads its rank layout exactly as under torchrun). Raises if a process fails."""
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(world, free_port(), fn, args), nprocs=world, join=True)


__all__ = ["Layout", "backend_and_device", "free_port", "init", "spawn_local"]
