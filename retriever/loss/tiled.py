"""The autograd.Functions around the tiled backends (PyTorch tiles and Triton kernels).

`TiledObjective`: InfoNCE and its options (`retriever.loss.passes`): the per-row, per-prefix
losses [NP, Bq]; it saves the inputs and O(Bq) statistics, and its backward recomputes the
logits tile by tile. `TiledRowLosses`: a block backend's row losses (the sigmoid loss's).

In both, the incoming gradient of loss_i is the row weight of the backends' backward, so means,
weights and the symmetric average are plain autograd around them.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor


class TiledObjective(torch.autograd.Function):
    """Per-row losses [NP, Bq] fp32 of ``engine`` (an `ObjectiveEngine` with a local runner)."""

    @staticmethod
    def forward(ctx, queries: Tensor, candidates: Tensor, scale: Tensor, engine) -> Tensor:
        queries, candidates = queries.contiguous(), candidates.contiguous()
        scale_value = scale.detach().float()
        losses, saved = engine.forward(queries, candidates, scale_value)
        ctx.save_for_backward(queries, candidates, scale_value)
        ctx.engine, ctx.state = engine, saved
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        queries, candidates, scale = ctx.saved_tensors
        dq, dc, dscale = ctx.engine.backward(
            queries, candidates, scale, ctx.state, grad_losses.float()
        )
        return dq.to(queries.dtype), dc.to(candidates.dtype), dscale, None


class TiledRowLosses(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        queries: Tensor,
        candidates: Tensor,
        scale: Tensor,
        labels: Tensor,
        row_pos_ids: Tensor | None,
        col_ids: Tensor | None,
        backend: ModuleType,
    ) -> Tensor:
        queries, candidates = queries.contiguous(), candidates.contiguous()
        scale_value = scale.detach().float()
        lse, pos = backend.forward_block(
            queries, candidates, scale_value, labels, row_pos_ids, col_ids
        )
        ctx.save_for_backward(queries, candidates, scale_value, labels, lse, row_pos_ids, col_ids)
        ctx.backend = backend
        return lse - pos

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        queries, candidates, scale, labels, lse, row_pos_ids, col_ids = ctx.saved_tensors
        dq = torch.zeros_like(queries)
        # dc receives a contribution from every row chunk: accumulate it in fp32.
        dc = torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device)
        dscale = ctx.backend.backward_block(
            queries,
            candidates,
            scale,
            lse,
            grad_losses.float().contiguous(),
            labels,
            row_pos_ids,
            col_ids,
            dq,
            dc,
        )
        return dq, dc.to(candidates.dtype), dscale, None, None, None, None


def tiled_row_losses(
    queries: Tensor,
    candidates: Tensor,
    scale: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None,
    col_ids: Tensor | None,
    backend: ModuleType,
) -> Tensor:
    """Per-query InfoNCE losses [Bq] (fp32) computed tile by tile by `backend`."""
    return TiledRowLosses.apply(queries, candidates, scale, labels, row_pos_ids, col_ids, backend)
