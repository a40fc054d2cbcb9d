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

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from retriever.gradcache import backward_from_cached_grads, embed_without_grad
from retriever.loss import InfoNCELoss
from retriever.train.batches import Batch, TokenChunk


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
    device = torch.device(device)

    def embed_on_device(chunk: TokenChunk) -> Tensor:
        return embed(chunk.features(device))

    chunks = batch.query_chunks + batch.document_chunks
    rng_devices = [device] if device.type == "cuda" else []
    cache, states = embed_without_grad(embed_on_device, chunks, rng_devices)
    queries = cache[: batch.num_queries][batch.query_order.to(device, non_blocking=True)]
    documents = cache[batch.num_queries :][batch.document_order.to(device, non_blocking=True)]
    ids = batch.candidate_ids.to(device, non_blocking=True)
    loss = loss_fn(queries, documents, candidate_ids=ids, group=group)
    loss.backward()  # fills cache.grad (and a learnable temperature's gradient)
    grad_chunks, replay = chunks, states
    if chunk_size is not None and any(c.size > chunk_size for c in chunks):
        grad_chunks, replay = [piece for c in chunks for piece in c.split(chunk_size)], None
    backward_from_cached_grads(embed_on_device, grad_chunks, replay, cache.grad, no_sync=no_sync)
    return loss.detach()
