"""Device choice and multi-process data-parallel training with torchrun and DDP.

`torchrun --nproc-per-node G -m cmsei_model.cli_train ...` starts G processes and sets
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each. `init_distributed` reads
them and joins the process group: NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK) and
Gloo on the CPU. Without those variables the trainer runs as one plain process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistributedContext:
    """The device and process-group place of this process.

    Attributes:
        device: the torch device of this process.
        rank: global rank, 0 without a process group.
        world_size: number of processes, 1 without a process group.
        local_rank: rank on this node; selects the GPU.
        initialised: whether this process joined a process group.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs the epoch summaries."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a device.

    "auto" picks cuda:`local_rank` when CUDA is available, else the CPU.

    Raises:
        ValueError: for an unknown name, or a CUDA device that is not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
        device = torch.device(name if ":" in name else f"cuda:{local_rank}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} requested but only {torch.cuda.device_count()} CUDA devices are visible"
            )
        return device
    raise ValueError(f"unknown device {name!r}; use one of {DEVICE_CHOICES} or cuda:N")


def init_distributed(device_name: str) -> DistributedContext:
    """Join the torchrun process group when the environment describes one.

    Args:
        device_name: "auto", "cpu", "cuda" or "cuda:N"; with a process group, "cuda" means
            cuda:LOCAL_RANK.

    Raises:
        ValueError: for an invalid device or malformed torchrun variables.
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistributedContext(resolve_device(device_name))

    try:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as error:
        raise ValueError(f"invalid torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK): {error}") from error

    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    logger.info("process %d of %d on %s (%s)", rank, world_size, device, backend)
    return DistributedContext(device, rank, world_size, local_rank, True)


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Wrap `model` in DistributedDataParallel when this process is part of a group.

    Every parameter of a built CMSEI component takes part in each step, even a batch
    without scene-graph edges (its zero-size edge tensors still reach the semantic-graph
    weights), so DDP runs without `find_unused_parameters`.
    """
    if not context.initialised:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the bare model inside a DDP wrapper, or `model` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def barrier(context: DistributedContext) -> None:
    """Wait for every process of the group; does nothing without a group."""
    if context.initialised:
        dist.barrier()


def all_reduce_mean(value: float, context: DistributedContext) -> float:
    """Return the mean of `value` over the processes of the group."""
    if not context.initialised:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size


def broadcast_flag(flag: bool, context: DistributedContext) -> bool:
    """Return rank 0's `flag` on every process."""
    if not context.initialised:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64, device=context.device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def shutdown(context: DistributedContext) -> None:
    """Leave the process group that `init_distributed` joined."""
    if context.initialised and dist.is_initialized():
        dist.destroy_process_group()
