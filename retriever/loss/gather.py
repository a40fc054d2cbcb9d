"""Rows of every rank, concatenated: for the losses whose terms are small per row (CoSENT's
cosines, the global contrastive loss's per-example statistics) and so need no ring."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_rows(x: Tensor, group: object) -> Tensor:
    """All ranks' rows of ``x`` [n_r, ...] concatenated in rank order, differentiable: the
    gradient for a rank's rows is the sum over ranks of the gradient each computed. Ranks may
    hold different numbers of rows. Every rank must call it (and its backward) alike."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return _GatherRows.apply(x, [int(s) for s in sizes], group)


class _GatherRows(torch.autograd.Function):
    """all_gather forward, all_reduce backward, both blocking (torch.distributed.nn's
    all_gather is deprecated, and its asynchronous backward could still be pending when a
    process group was destroyed)."""

    @staticmethod
    def forward(ctx, x: Tensor, counts: list[int], group: object) -> Tensor:
        import torch.distributed as dist

        ctx.counts, ctx.group, ctx.rank = counts, group, dist.get_rank(group)
        padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(counts) - x.shape[0])).contiguous()
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        import torch.distributed as dist

        # d/dx_r of sum over ranks s of L_s(gather(x)): every rank's gradient for r's rows.
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return total[start : start + ctx.counts[ctx.rank]], None, None
