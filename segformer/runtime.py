"""Where and how the workflow runs: device, precision/autocast, and the process group."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device asked for, else the GPU when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    return device


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The precision asked for, else bf16 on a GPU that supports it and fp32 elsewhere."""
    if precision is None:
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed precision for the forward pass (no-op for fp32); the loss is computed in fp32 outside."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def progress_bar(iterable=None, **options):
    """A tqdm progress bar, or None when tqdm is not installed (callers then print plain lines)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(iterable, dynamic_ncols=True, **options)


@dataclass
class ProcessGroup:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, value) -> list:
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def init_process_group(device: torch.device | None = None) -> ProcessGroup:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL for CUDA, gloo for CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return ProcessGroup(dist.get_rank(), dist.get_world_size(), local_rank)
    use_cuda = (device is None or torch.device(device).type == "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ProcessGroup(rank, world_size, local_rank, initialised_here=True)


def process_device(group: ProcessGroup, device: str | torch.device | None) -> torch.device:
    """The device of this rank: its own GPU (LOCAL_RANK) under torchrun on CUDA."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None and group.distributed:
        return torch.device("cuda", group.local_rank)
    return resolved
