"""The naive InfoNCE: builds the [Bq, Bd] logits in fp32.

The ground truth for the tiled paths and the fastest choice for small batches, where the
logits are cheap and one GEMM beats any tiling.
"""

from __future__ import annotations

import torch
from torch import Tensor


def matmul_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result; 16-bit operands keep the fast matrix path where torch can."""
    if a.dtype != torch.float32 and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without `out_dtype` for this dtype or device
            pass
    return a.float() @ b.float()


def naive_row_losses(
    queries: Tensor,
    candidates: Tensor,
    scale: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None,
    col_ids: Tensor | None,
) -> Tensor:
    """Per-query InfoNCE losses [Bq] (fp32) from the full logits; differentiable by autograd."""
    logits = matmul_fp32(queries, candidates.T) * scale
    if row_pos_ids is not None and col_ids is not None:
        duplicate = col_ids[None, :] == row_pos_ids[:, None]
        duplicate[torch.arange(len(labels), device=labels.device), labels] = False
        logits = logits.masked_fill(duplicate, float("-inf"))
    positive = logits.gather(1, labels[:, None]).squeeze(1)
    return torch.logsumexp(logits, dim=1) - positive
