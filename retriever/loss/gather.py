"""Rows of every rank, concatenated: for the losses whose terms are small per row (CoSENT's
cosines, the global contrastive loss's per-example statistics) and so need no ring."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_rows(x: Tensor, group: object) -> Tensor:
    """All ranks' rows of ``x`` [n_r, ...] concatenated in rank order, differentiable: the
    gradient for a rank's rows is the sum over ranks of the gradient each computed. Ranks may
    hold different numbers of rows."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    world = dist.get_world_size(group)
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(counts) - x.shape[0]))
    parts = dist_fn.all_gather(padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])
