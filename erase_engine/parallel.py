"""Data parallelism through ``torch.distributed`` (``torchrun --nproc-per-node N``).

Every rank holds the whole model and the same random streams, so every rank draws the same
training batch; each computes only its own rows of it, and the gradients are summed across
ranks before the optimizer steps, which then moves every rank's deltas the same way.  The
trajectory cache's rows are sampled in contiguous shares and gathered, so that every rank holds
the whole cache.  One process is the world of one rank: the same code, no collective.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    size: int = 1

    @staticmethod
    def current() -> Ranks:
        """The process group's ranks, once ``init_process_group`` ran (else one rank)."""
        if dist.is_available() and dist.is_initialized():
            return Ranks(dist.get_rank(), dist.get_world_size())
        return Ranks()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def own(self, count: int) -> list[int]:
        """This rank's rows of a batch of ``count`` (row j goes to rank j mod size)."""
        return list(range(self.rank, count, self.size))

    def share(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` rows (the last ones may be shorter or empty)."""
        per_rank = -(-count // self.size)
        return slice(min(self.rank * per_rank, count), min((self.rank + 1) * per_rank, count))

    def gather(self, part: torch.Tensor, count: int, dim: int = 0) -> torch.Tensor:
        """Every rank's ``share(count)`` of a tensor along ``dim``, in order: the whole tensor."""
        if self.size == 1:
            return part
        per_rank = -(-count // self.size)
        padding = [0] * (2 * (part.ndim - dim) - 1) + [per_rank - part.shape[dim]]
        padded = torch.nn.functional.pad(part, padding).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat(parts, dim=dim).narrow(dim, 0, count)

    def sum_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Each parameter's gradient summed over the ranks (one collective for all of them)."""
        if self.size == 1:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for g, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(summed.view_as(g))

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' tensors (of one shape) added up, on every rank."""
        if self.size == 1:
            return tensor
        dist.all_reduce(tensor)
        return tensor

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Per-rank partial figures summed over the ranks."""
        if self.size == 1:
            return values
        flat = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(flat)
        return dict(zip(values, flat.tolist(), strict=True))

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a decision every rank must take alike)."""
        if self.size == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.broadcast(value, src=0)
        return bool(value.item())


def start_from_environment(device: str) -> tuple[Ranks, str]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (NCCL for CUDA, gloo for
    the CPU) and take this rank's GPU.  Returns the ranks and the device to use."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(), device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    return Ranks.current(), device
