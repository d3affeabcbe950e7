"""One pruning job over several GPUs of a host: what the ranks exchange.

SlimGPT's cost is dominated by running the calibration windows through each layer; the
pruning maths runs on two Hessians per layer. So the windows are split across ranks (each
runs its share of every forward and accumulates its part of each Hessian), the partial
Hessians are summed on the leader, the leader alone runs the maths, and the pruned layer
(kept units plus the compensated output projection) is broadcast so every rank continues
with bit-identical weights. The result equals the single-process run up to the order in
which the Hessian's terms were summed.

:class:`Collective` is the single-process case (every operation is a no-op), so the driver
has one code path; :class:`DistributedCollective` wraps an initialised ``torch.distributed``
process group (NCCL on GPUs, gloo on CPUs for tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch

LEADER = 0


class Collective:
    """A world of one process."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_leader(self) -> bool:
        return self.rank == LEADER

    def share(self, items: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the rows of ``items``."""
        return items

    def reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks into the leader's copy (others keep theirs)."""
        return tensor

    def reduce_count(self, value: int) -> int:
        return value

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The leader's ``tensor`` on every rank (same shape and dtype everywhere)."""
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        return None


class DistributedCollective(Collective):
    """Ranks of an initialised default process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_from_env() first")
        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def share(self, items: torch.Tensor) -> torch.Tensor:
        if items.shape[0] < self.world_size:
            raise ValueError(f"{items.shape[0]} calibration windows cannot be split over "
                             f"{self.world_size} ranks")
        return torch.tensor_split(items, self.world_size)[self.rank]

    def reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        self.dist.reduce(tensor, dst=LEADER, op=self.dist.ReduceOp.SUM)
        return tensor

    def reduce_count(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return int(t.item())

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        self.dist.broadcast(tensor, src=LEADER)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        box: list[Any] = [obj if self.is_leader else None]
        self.dist.broadcast_object_list(box, src=LEADER, device=self._device())
        return box[0]

    def barrier(self) -> None:
        if self.backend == "nccl":
            self.dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            self.dist.barrier()


#: torchrun's variables: every rank of a job gets the same address/port and its own rank.
LAUNCH_ENV: Sequence[str] = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def init_from_env(timeout_s: float = 1800.0) -> DistributedCollective | None:
    """Join the process group that torchrun-style variables describe (None when
    ``WORLD_SIZE`` is absent or 1). Each rank uses GPU ``LOCAL_RANK`` with NCCL, or gloo on
    CPU-only hosts. ``timeout_s`` bounds every collective, so a dead rank fails the others
    instead of hanging them."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s),
                                    device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return DistributedCollective()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
