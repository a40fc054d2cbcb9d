"""The ring's point-to-point transport: the ranks of a process group arranged in a ring (send to
rank + 1, receive from rank - 1), transfers left in flight while the next block is computed, and
the two collectives the ring loss needs besides.

With gloo every tensor is staged through host memory; with NCCL it stays on the GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def comm_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    """Where tensors must live to go through `group`: gloo moves CUDA tensors only for a few
    collectives, so with gloo everything is staged through host memory."""
    config = dist.get_backend_config(group)  # e.g. "cpu:gloo,cuda:nccl" or "gloo"
    if ":" in config:
        backend = dict(item.split(":", 1) for item in config.split(",")).get(device.type, "")
    else:
        backend = config
    if not backend or (backend == "nccl" and device.type != "cuda"):
        raise ValueError(
            f"the process group ({config!r}) cannot move {device.type} tensors: put the "
            "embeddings on the GPU for NCCL, or use a gloo group"
        )
    return torch.device("cpu") if backend == "gloo" else device


class Transfer:
    """Sends and receives in flight; `wait` returns the received tensors on the compute device."""

    def __init__(self, works: list, sends: list[Tensor], recvs: list[Tensor], device) -> None:
        self._works, self._sends, self._recvs, self._device = works, sends, recvs, device

    def wait(self) -> list[Tensor]:
        for work in self._works:
            work.wait()
        self._sends = []  # the sent buffers may be freed only now
        return [t.to(self._device) for t in self._recvs]


class Ring:
    """The ranks of `group` arranged in a ring: send to rank + 1, receive from rank - 1."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = device
        self.comm_device = comm_device(group, device)
        self._next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self._prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def shift(self, tensors: list[Tensor], incoming: list[tuple[tuple, torch.dtype]]) -> Transfer:
        """Start sending `tensors` to the next rank and receiving tensors of the given shapes and
        dtypes from the previous one.  Every rank posts the same pattern, so nothing waits on a
        send that no one receives."""
        sends = [t.contiguous().to(self.comm_device) for t in tensors]
        recvs = [
            torch.empty(shape, dtype=dtype, device=self.comm_device) for shape, dtype in incoming
        ]
        # Several tensors go the same way: tags keep gloo from matching them out of order.
        ops = [
            dist.P2POp(dist.isend, t, self._next, self.group, tag) for tag, t in enumerate(sends)
        ]
        ops += [
            dist.P2POp(dist.irecv, t, self._prev, self.group, tag) for tag, t in enumerate(recvs)
        ]
        return Transfer(dist.batch_isend_irecv(ops), sends, recvs, self.device)

    def all_gather(self, t: Tensor) -> Tensor:
        """[W, *t.shape]: every rank's `t`, on the compute device."""
        t = t.to(self.comm_device)
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts).to(self.device)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        t = t.to(self.comm_device)
        dist.all_reduce(t, group=self.group)
        return t.to(self.device)
