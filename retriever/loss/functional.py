"""`contrastive_loss`: InfoNCE over a batch of queries and candidates, tiled so it scales.

This module assembles the loss (directions, means); the checks and the choice of implementation
are in `inputs`, the tile math in `torch_tiles` / `triton_tiles` and the autograd in `tiled`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from retriever.loss.inputs import check_inputs, resolve_impl, scale_tensor, tile_backend
from retriever.loss.naive import naive_row_losses
from retriever.loss.tiled import tiled_row_losses


def row_losses(
    queries: Tensor,
    candidates: Tensor,
    scale: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None,
    col_ids: Tensor | None,
    impl: str,
) -> Tensor:
    """Per-query InfoNCE losses [Bq] with an already-resolved implementation."""
    if impl == "naive":
        return naive_row_losses(queries, candidates, scale, labels, row_pos_ids, col_ids)
    backend = tile_backend(impl)
    return tiled_row_losses(queries, candidates, scale, labels, row_pos_ids, col_ids, backend)


def contrastive_loss(
    queries: Tensor,
    candidates: Tensor,
    *,
    scale: float | Tensor = 20.0,
    labels: Tensor | None = None,
    candidate_ids: Tensor | None = None,
    symmetric: bool = False,
    group: object | None = None,
    impl: str = "auto",
) -> Tensor:
    r"""InfoNCE of queries against candidates, computed tile by tile.

    .. math::
        S_{ij} = s \langle q_i, d_j \rangle, \qquad
        L = \frac{1}{B_q} \sum_i \Big( \log \sum_j e^{S_{ij}} - S_{i, y_i} \Big)

    Args:
        queries: [Bq, D] float32, bfloat16 or float16. Need not be normalised.
        candidates: [Bd, D], same dtype and device. Usually positives first, then hard negatives.
        scale: s = 1 / temperature; a float or a 0-dim tensor. A tensor that requires grad
            receives its exact gradient (learnable temperature).
        labels: [Bq] int64, index in `candidates` of each query's positive. Default
            ``arange(Bq)`` (needs Bd >= Bq).
        candidate_ids: [Bd] int64, e.g. a hash of each candidate's text. Candidate j is left out
            of row i's denominator when ``candidate_ids[j] == candidate_ids[labels[i]]`` and
            ``j != labels[i]``: duplicates of the positive are not negatives. No [Bq, Bd] mask
            is built.
        symmetric: also add the positive-to-query direction (each positive's logsumexp over all
            queries) and return the average of both directions.
        group: a torch.distributed process group (e.g. ``torch.distributed.group.WORLD``):
            the loss over the global batch, every rank's queries against every rank's
            candidates, with candidate blocks passed around a ring (`retriever.loss.ring`).
            All arguments stay local; rank r's candidate j has the global index
            sum(Bd of ranks < r) + j.  The value is this rank's mean; its gradients are W times
            those of the global loss w.r.t. this rank's rows, so DDP's average is the
            single-process gradient (docs/ring.md).  None: this process's batch only.
        impl: "naive" (full logits), "torch" (tiled PyTorch), "triton" (fused kernels; CUDA,
            or CPU under TRITON_INTERPRET=1) or "auto" (naive for small batches, then triton on
            CUDA and torch elsewhere).

    Returns:
        The mean loss over queries, a 0-dim float32 tensor. Gradients reach the inputs in their
        own dtype; logits, logsumexp and accumulation are float32 throughout.
    """
    if group is not None:
        # Imported here: the single-process path never needs torch.distributed.  The ring checks
        # the inputs itself, after the ranks have exchanged sizes, so all ranks raise together.
        from retriever.loss.ring import ring_loss

        return ring_loss(
            queries,
            candidates,
            scale=scale,
            labels=labels,
            candidate_ids=candidate_ids,
            symmetric=symmetric,
            group=group,
            impl=impl,
        )
    check_inputs(queries, candidates, labels, candidate_ids)
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    n_queries = queries.shape[0]
    device = queries.device
    impl = resolve_impl(impl, n_queries, candidates.shape[0], device)
    loss = contrastive_row_losses(
        queries, candidates, scale=scale, labels=labels, candidate_ids=candidate_ids, impl=impl
    ).mean()
    if not symmetric:
        return loss
    # Positive-to-query direction: row i is positive i against every query k; its own query
    # is the target and, with ids, queries whose positive duplicates positive i are masked out.
    # That is the same row loss with the roles swapped, so it reuses the same tiles.
    labels = torch.arange(n_queries, device=device) if labels is None else labels.long()
    pos_ids = None if candidate_ids is None else candidate_ids.long()[labels]
    reverse = contrastive_row_losses(
        candidates[labels],
        queries,
        scale=scale,
        labels=torch.arange(n_queries, device=device),
        candidate_ids=pos_ids,
        impl=impl,
    )
    return (loss + reverse.mean()) / 2


def contrastive_row_losses(
    queries: Tensor,
    candidates: Tensor,
    *,
    scale: float | Tensor = 20.0,
    labels: Tensor | None = None,
    candidate_ids: Tensor | None = None,
    group: object | None = None,
    impl: str = "auto",
) -> Tensor:
    """Each query's InfoNCE loss [Bq] (fp32), lse_i - S_i,labels[i]; arguments as
    :func:`contrastive_loss` (one direction). The caller weighs the rows (FastCLIP's
    global contrastive loss does, `retriever.loss.gcl`). With ``group``, the rows are this
    rank's, each against every rank's candidates; a row's gradient is W times that of the
    weight the caller gives it (the ring's convention: weights that sum to 1 over all ranks'
    rows make DDP's average the single-process gradient)."""
    if group is not None:
        from retriever.loss.ring import ring_loss

        return ring_loss(
            queries,
            candidates,
            scale=scale,
            labels=labels,
            candidate_ids=candidate_ids,
            symmetric=False,
            group=group,
            impl=impl,
            reduction="none",
        )
    check_inputs(queries, candidates, labels, candidate_ids)
    device = queries.device
    impl = resolve_impl(impl, queries.shape[0], candidates.shape[0], device)
    if labels is None:
        labels = torch.arange(queries.shape[0], device=device)
    ids = None if candidate_ids is None else candidate_ids.long()
    pos_ids = None if ids is None else ids[labels.long()]
    return row_losses(
        queries, candidates, scale_tensor(scale, device), labels.long(), pos_ids, ids, impl
    )
