"""`contrastive_loss`: InfoNCE over a batch of queries and candidates, tiled so it scales, with
the options of current embedding recipes (`retriever.loss.objective`) and fused Matryoshka.

This module assembles the loss (options, means); the checks and the choice of implementation
are in `inputs`, the passes an objective needs in `passes`, the tile math in `torch_tiles` /
`triton_tiles` and the autograd in `tiled`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from retriever.loss.inputs import (
    check_inputs,
    check_owners,
    check_prefixes,
    resolve_impl,
    scale_tensor,
    tile_backend,
)
from retriever.loss.naive import naive_row_losses
from retriever.loss.objective import Objective, make_objective
from retriever.loss.passes import LocalRunner, ObjectiveEngine, Prefixes, make_layout
from retriever.loss.tiled import TiledObjective


def contrastive_loss(
    queries: Tensor,
    candidates: Tensor,
    *,
    scale: float | Tensor = 20.0,
    labels: Tensor | None = None,
    candidate_ids: Tensor | None = None,
    symmetric: bool = False,
    directions: Sequence[str] | None = None,
    partition_mode: str | None = None,
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    false_negative_margin: float | None = None,
    debias: float = 0.0,
    label_smoothing: float = 0.0,
    candidate_owners: Tensor | None = None,
    matryoshka_dims: Sequence[int] | None = None,
    matryoshka_weights: Sequence[float] | None = None,
    matryoshka_normalize: bool = True,
    group: object | None = None,
    impl: str = "auto",
) -> Tensor:
    r"""InfoNCE of queries against candidates, computed tile by tile.

    .. math::
        S_{ij} = s \langle q_i, d_j \rangle, \qquad
        L = \frac{1}{B_q} \sum_i \Big( \log \sum_j e^{S_{ij}} - S_{i, y_i} \Big)

    The options change which terms a row's denominator holds and how its loss is formed
    (docs/objectives.md, "Loss options"; sentence-transformers' names where it has them).

    Args:
        queries: [Bq, D] float32, bfloat16 or float16. Need not be normalised.
        candidates: [Bd, D], same dtype and device. Usually positives first, then hard negatives.
        scale: s = 1 / temperature; a float or a 0-dim tensor. A tensor that requires grad
            receives its exact gradient (learnable temperature).
        labels: [Bq] int64, index in `candidates` of each query's positive. Default
            ``arange(Bq)`` (needs Bd >= Bq).
        candidate_ids: [Bd] int64, e.g. a hash of each candidate's text. Candidate j is left out
            of row i's denominator when ``candidate_ids[j] == candidate_ids[labels[i]]`` and
            ``j != labels[i]``: duplicates of the positive are not negatives (in every
            direction: queries whose positives share an id are left out of each other's
            query_to_query and doc_to_query terms). No [Bq, Bd] mask is built.
        symmetric: also the positive-to-query direction, averaged: ``directions=("query_to_doc",
            "doc_to_query"), partition_mode="per_direction"`` (one pass over the tiles).
        directions: which terms each row's denominator holds, from "query_to_doc" (required),
            "query_to_query", "doc_to_query", "doc_to_doc" (GTE's improved contrastive loss:
            all four, joint). As sentence-transformers' MultipleNegativesRankingLoss;
            doc_to_doc leaves out the candidates of the query's own group.
        partition_mode: "joint" (default: one softmax over every term) or "per_direction"
            (one per direction, averaged; query_to_doc and doc_to_query only).
        hardness_mode, hardness_strength: None, or which query_to_doc negatives get
            ``hardness_strength * sg(similarity)`` added to their logit: "in_batch_negatives",
            "hard_negatives" (the query's own) or "all_negatives" (Lan et al. 2025 use 9;
            EmbeddingGemma 5). As sentence-transformers.
        false_negative_margin: drop negative j of row i when its similarity exceeds the
            positive's + margin (Qwen3-Embedding: 0.1); never a labelled pair.
        debias: tau+ of the debiased contrastive loss (Chuang et al. 2020), in [0, 1).
        label_smoothing: eps in [0, 1), cross-entropy's convention over each row's terms.
        candidate_owners: [Bd] int64, the query each candidate belongs to (-1: none), for
            doc_to_doc and hardness_mode. Default: sentence-transformers' layout, candidate j
            belongs to query j mod Bq (needs no labels and Bd a multiple of Bq).
        matryoshka_dims, matryoshka_weights, matryoshka_normalize: the weighted sum of the loss
            on each prefix of the embeddings (re-normalised unless ``matryoshka_normalize`` is
            False), all prefixes from one pass over each tile (Kusupati et al. 2022).
        group: a torch.distributed process group (e.g. ``torch.distributed.group.WORLD``):
            the loss over the global batch, every rank's queries against every rank's
            candidates, with candidate blocks passed around a ring (`retriever.loss.ring`).
            All arguments stay local; rank r's candidate j has the global index
            sum(Bd of ranks < r) + j.  The value is this rank's mean; its gradients are W times
            those of the global loss w.r.t. this rank's rows, so DDP's average is the
            single-process gradient (docs/ring.md).  None: this process's batch only.
        impl: "naive" (full logits; with options, the PyTorch tiles), "torch" (tiled PyTorch),
            "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1) or "auto" (naive
            for small batches, then triton on CUDA and torch elsewhere).

    Returns:
        The mean loss over queries (summed over prefixes with their weights), a 0-dim float32
        tensor. Gradients reach the inputs in their own dtype; logits, logsumexp and
        accumulation are float32 throughout.
    """
    objective = make_objective(
        symmetric=symmetric,
        directions=directions,
        partition_mode=partition_mode,
        hardness_mode=hardness_mode,
        hardness_strength=hardness_strength,
        false_negative_margin=false_negative_margin,
        debias=debias,
        label_smoothing=label_smoothing,
    )
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
            objective=objective,
            candidate_owners=candidate_owners,
            matryoshka=(matryoshka_dims, matryoshka_weights, matryoshka_normalize),
            group=group,
            impl=impl,
        )
    check_inputs(queries, candidates, labels, candidate_ids)
    prefixes = Prefixes(*check_prefixes(
        matryoshka_dims, matryoshka_weights, matryoshka_normalize, queries.shape[1]
    ))  # fmt: skip
    rows = objective_row_losses(
        queries, candidates, scale, labels, candidate_ids, candidate_owners, objective,
        prefixes, impl,
    )  # fmt: skip
    weights = torch.tensor(prefixes.weights, device=rows.device)
    return (rows.mean(dim=1) * weights).sum()


def objective_row_losses(
    queries: Tensor,
    candidates: Tensor,
    scale: float | Tensor,
    labels: Tensor | None,
    candidate_ids: Tensor | None,
    candidate_owners: Tensor | None,
    objective: Objective,
    prefixes: Prefixes,
    impl: str,
) -> Tensor:
    """Each query's loss per prefix, [NP, Bq] fp32, on checked inputs (one process)."""
    n_queries, n_candidates = queries.shape[0], candidates.shape[0]
    device = queries.device
    impl = resolve_impl(impl, n_queries, n_candidates, device)
    owners = check_owners(candidate_owners, labels, n_queries, n_candidates)
    scale_t = scale_tensor(scale, device)
    plain = objective.plain or objective.symmetric
    if impl == "naive" and plain and len(prefixes.dims) == 1:
        return _naive_rows(queries, candidates, scale_t, labels, candidate_ids, objective)[None]
    layout = make_layout(objective, n_queries, n_candidates, labels, candidate_ids, owners, device)
    backend = tile_backend("torch" if impl == "naive" else impl)
    engine = ObjectiveEngine(objective, prefixes, layout, LocalRunner(backend))
    return TiledObjective.apply(queries, candidates, scale_t, engine)


def _naive_rows(queries, candidates, scale, labels, candidate_ids, objective) -> Tensor:
    """The plain (or symmetric) loss per row from the full logits."""
    device = queries.device
    labels = torch.arange(queries.shape[0], device=device) if labels is None else labels.long()
    ids = None if candidate_ids is None else candidate_ids.long()
    pos_ids = None if ids is None else ids[labels]
    rows = naive_row_losses(queries, candidates, scale, labels, pos_ids, ids)
    if not objective.symmetric:
        return rows
    # Positive-to-query direction: row i is positive i against every query k; its own query
    # is the target and, with ids, queries whose positive duplicates positive i are masked.
    own = torch.arange(queries.shape[0], device=device)
    reverse = naive_row_losses(candidates[labels], queries, scale, own, pos_ids, pos_ids)
    return (rows + reverse) / 2


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
            group=group,
            impl=impl,
            reduction="none",
        )
    check_inputs(queries, candidates, labels, candidate_ids)
    prefixes = Prefixes((queries.shape[1],), (1.0,))
    rows = objective_row_losses(
        queries, candidates, scale, labels, candidate_ids, None, Objective(), prefixes, impl
    )
    return rows[0]
