"""The one autograd.Function shared by the tiled backends (PyTorch tiles and Triton kernels).

It returns the per-query losses loss_i = lse_i - S_i,labels[i] and saves only the inputs and
lse ([Bq] fp32) for backward, which recomputes the logits tile by tile.  The incoming gradient
of loss_i is the row weight w_i of the backends' backward, so means, the symmetric average and
the ring's gradient convention are all plain autograd around this Function.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor


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
