"""The naive InfoNCE: builds the [Bq, Bd] logits in fp32.

The ground truth for the tiled paths and the fastest choice for small batches, where the
logits are cheap and one GEMM beats any tiling.
"""

from __future__ import annotations

import torch
from torch import Tensor


def naive_row_losses(
    queries: Tensor,
    candidates: Tensor,
    scale: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None,
    col_ids: Tensor | None,
) -> Tensor:
    """Per-query InfoNCE losses [Bq] (fp32) from the full logits; differentiable by autograd."""
    # fp32 operands: the reference keeps full precision (mm's fp32-output variant for 16-bit
    # operands has no autograd formula).
    logits = (queries.float() @ candidates.float().T) * scale
    if row_pos_ids is not None and col_ids is not None:
        duplicate = col_ids[None, :] == row_pos_ids[:, None]
        duplicate[torch.arange(len(labels), device=labels.device), labels] = False
        logits = logits.masked_fill(duplicate, float("-inf"))
    positive = logits.gather(1, labels[:, None]).squeeze(1)
    return torch.logsumexp(logits, dim=1) - positive
