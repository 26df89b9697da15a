"""Work shared over the processes torchrun starts (`torchrun --nproc-per-node N -m fasterase ...`).

torch.distributed with NCCL on GPUs (one GPU a process, by LOCAL_RANK) and gloo on CPUs; no
launcher of our own. Work is shared in units whose results do not depend on who computes them
(sampling chunks seeded by their index), so N processes give what one gives. Outside torchrun
there is one process and nothing here talks to anyone.
"""

from __future__ import annotations

import os

import torch


def processes() -> int:
    """The number of processes torchrun started (1 outside it), without joining their group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def ranks() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside torchrun. Joins the process
    group (and, on GPUs, takes the process's GPU) on first use."""
    if processes() == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_gather(value) -> list:
    """Every process's `value` (any picklable object), in rank order; [value] outside torchrun."""
    rank, size = ranks()
    if size == 1:
        return [value]
    import torch.distributed as dist

    gathered: list = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered


def is_main() -> bool:
    """Whether this process reports and writes files (rank 0)."""
    return ranks()[0] == 0
