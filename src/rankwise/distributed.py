"""``torch.distributed`` for the methods: the process group if any, its device, and a value shared from rank 0.

One home for what GoRA (gradient all-reduce, early-stop flag, shared A seed) and RAC-LoRA (shared
sketch seed) need; every function is a no-op without an initialised process group.
"""

from __future__ import annotations

from typing import Any

import torch


def process_group() -> Any:
    """``torch.distributed`` when a process group is initialised, else ``None``."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def comm_device(dist: Any) -> torch.device:
    """Where collectives' tensors live: the current CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_from_rank0(value: int) -> int:
    """``value`` as rank 0 has it (unchanged without a process group): a seed drawn on every rank, made one."""
    dist = process_group()
    if dist is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=comm_device(dist))
    dist.broadcast(t, src=0)
    return int(t.item())
