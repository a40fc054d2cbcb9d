"""CoSENT: a ranking loss for pairs with graded similarity (STS), beside InfoNCE in multi-task runs.

.. math::
    L = \\log \\Big( 1 + \\sum_{(i, j):\\, y_i > y_j} e^{s (\\cos_j - \\cos_i)} \\Big)

over the pairs of a batch, with :math:`\\cos_i` the cosine similarity of pair i's two embeddings,
:math:`y_i` its gold score and :math:`s` the scale (20): every pair the gold scores rank above
another must have the higher cosine. The terms are [B, B] scalars, not embeddings, so for the
STS share of a batch (thousands of pairs) they are cheap.

Across processes (``group``), each rank's cosines are gathered (with autograd) so the loss
covers the global batch; every rank computes the same value and its gradient is W times that of
the global loss for its own pairs, the ring loss's convention: DDP's average is then exactly the
single-process gradient on the concatenated batch.

Citation: Jianlin Su, "CoSENT: a more efficient sentence vector scheme than Sentence-BERT"
(2022); as sentence-transformers' ``CoSENTLoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retriever.loss.gather import gather_rows


def cosent_loss(
    first: Tensor,
    second: Tensor,
    scores: Tensor,
    *,
    scale: float = 20.0,
    group: object | None = None,
) -> Tensor:
    """CoSENT of pairs (``first[i]``, ``second[i]``) [B, D] with gold ``scores`` [B]; a 0-dim
    float32 tensor. ``group``: a torch.distributed group: the loss over all ranks' pairs."""
    if first.shape != second.shape or first.dim() != 2:
        raise ValueError(
            f"first and second must be [B, D] of one shape, got {tuple(first.shape)} and "
            f"{tuple(second.shape)}"
        )
    if scores.shape != (first.shape[0],):
        raise ValueError(f"scores must have shape ({first.shape[0]},), got {tuple(scores.shape)}")
    cosine = F.cosine_similarity(first.float(), second.float(), dim=-1)
    gold = scores.to(cosine.device, torch.float32)
    if group is not None:
        cosine, gold = gather_rows(cosine, group), gather_rows(gold.detach(), group)
    # [i, j] = s (cos_j - cos_i), kept where the gold scores rank pair i above pair j.
    diff = scale * (cosine[None, :] - cosine[:, None])
    diff = diff.masked_fill(~(gold[:, None] > gold[None, :]), float("-inf"))
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), dim=0)
