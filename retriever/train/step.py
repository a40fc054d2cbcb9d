"""One training step with an embedding cache (design notes section 4).

1. Embed every chunk of the local batch (queries, then documents) under ``no_grad``, keeping
   the RNG state each chunk started from. Without activations to keep, these chunks can be far
   larger than those of step 3 (``training.embed_chunk_size``; fewer, larger launches).
2. Put the embeddings back in batch order, compute the contrastive loss over the global batch
   (the ring across processes when ``group`` is given) and backpropagate to the embeddings.
3. Re-embed chunk by chunk with gradients under the saved RNG state and backpropagate the
   cached embedding gradients into the parameters; DDP all-reduces only on the last chunk.

The parameter gradients equal those of the same loss computed in one graph (tests check it),
while activation memory is that of one chunk, whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from retriever.loss import InfoNCELoss
from retriever.loss.cosent import cosent_loss
from retriever.loss.distillation import distillation_loss
from retriever.loss.gradcache import backward_from_cached_grads, embed_without_grad
from retriever.train.batches import Batch, TokenChunk


@dataclass
class LossPart:
    """One source's share of a step: its batch, the loss of its (queries, documents) embeddings
    in batch order, and that loss's weight in the sum that is backpropagated."""

    batch: Batch
    loss: Callable[[Tensor, Tensor, Batch], Tensor]
    weight: float = 1.0


def cached_step(
    embed: Callable[[dict[str, Any]], Tensor],
    batch: Batch,
    loss_fn: InfoNCELoss,
    *,
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
    group: object | None = None,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> Tensor:
    """Accumulate the gradient of ``loss_fn`` over ``batch`` into the parameters' ``.grad``.

    ``embed`` maps a chunk's features to [n, D] embeddings (the model, possibly DDP-wrapped);
    ``no_sync`` is e.g. ``lambda: accelerator.no_sync(model)``. The chunks stay in (pinned)
    host memory: each is copied to ``device`` when it is embedded, so the tokens of the whole
    batch never occupy the GPU. The no-grad pass embeds the batch's chunks as they are; the
    gradient pass cuts them into chunks of at most ``chunk_size`` texts (None: the same
    chunks). Different chunks draw different dropout masks, so that is exact only for a
    network without dropout (the trainer checks). Returns this process's loss (detached; the
    mean over processes is the global loss).
    """
    ids = batch.candidate_ids.to(device, non_blocking=True)
    part = LossPart(batch, lambda q, d, _: loss_fn(q, d, candidate_ids=ids, group=group))
    total, _ = cached_parts_step(
        embed, [part], device=device, chunk_size=chunk_size, no_sync=no_sync
    )
    return total


def cached_parts_step(
    embed: Callable[[dict[str, Any]], Tensor],
    parts: Sequence[LossPart],
    *,
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """:func:`cached_step` for several sources at once: every part's chunks are embedded in
    one cache, each part's loss sees only its own embeddings (no source's texts are another's
    negatives), and one backward runs on the weighted sum. Returns (the sum, each part's
    loss), detached."""
    device = torch.device(device)

    def embed_on_device(chunk: TokenChunk) -> Tensor:
        return embed(chunk.features(device))

    chunks = [c for p in parts for c in p.batch.query_chunks + p.batch.document_chunks]
    rng_devices = [device] if device.type == "cuda" else []
    cache, states = embed_without_grad(embed_on_device, chunks, rng_devices)
    losses, offset = [], 0
    for part in parts:
        b = part.batch
        rows = cache[offset : offset + b.num_queries + b.num_documents]
        offset += b.num_queries + b.num_documents
        queries = rows[: b.num_queries][b.query_order.to(device, non_blocking=True)]
        documents = rows[b.num_queries :][b.document_order.to(device, non_blocking=True)]
        losses.append(part.loss(queries, documents, b))
    total = sum(part.weight * loss for part, loss in zip(parts, losses))
    total.backward()  # fills cache.grad (and a learnable temperature's gradient)
    grad_chunks, replay = chunks, states
    if chunk_size is not None and any(c.size > chunk_size for c in chunks):
        grad_chunks, replay = [piece for c in chunks for piece in c.split(chunk_size)], None
    backward_from_cached_grads(embed_on_device, grad_chunks, replay, cache.grad, no_sync=no_sync)
    return total.detach(), [loss.detach() for loss in losses]


def loss_part(
    source: Any,
    batch: Batch,
    weight: float,
    loss_fn: torch.nn.Module,
    options: Any,
    device: torch.device,
    group: object | None,
    offset: int = 0,
) -> LossPart:
    """A source's loss on its part of the step: for retrieval, ``loss_fn`` within its own
    batch (tiled; the ring across processes), plus ``options.distill_weight`` times the
    distillation from its teacher scores when the batch carries them; CoSENT on the pairs'
    gold scores for STS. ``offset``: where the source's examples start in the state of a loss
    that keeps one per example (`retriever.loss.gcl`). ``options``: the ``loss`` section."""
    if source.task == "sts":
        scores = batch.scores.to(device, non_blocking=True)
        scale = options.cosent_scale
        return LossPart(
            batch, lambda a, b, _: cosent_loss(a, b, scores, scale=scale, group=group), weight
        )
    kwargs: dict[str, Any] = {"candidate_ids": batch.candidate_ids.to(device, non_blocking=True)}
    if getattr(loss_fn, "needs_example_indices", False):
        kwargs["example_indices"] = batch.example_indices.to(device, non_blocking=True) + offset
    teacher = None
    if options.distill_weight > 0 and batch.scores is not None:
        teacher = batch.scores.to(device, non_blocking=True)

    def loss(queries: Tensor, documents: Tensor, _: Batch) -> Tensor:
        value = loss_fn(queries, documents, group=group, **kwargs)
        if teacher is not None:
            value = value + options.distill_weight * distillation_loss(
                queries,
                documents,
                teacher,
                scale=loss_fn.scale,
                teacher_temperature=options.teacher_temperature,
                group=group,
            )
        return value

    return LossPart(batch, loss, weight)
