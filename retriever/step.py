"""One training step with an embedding cache (design notes section 4).

1. Embed every chunk of the local batch (queries, then documents) under ``no_grad``, keeping
   the RNG state each chunk started from.
2. Put the embeddings back in batch order, compute the contrastive loss over the global batch
   (the ring across processes when ``group`` is given) and backpropagate to the embeddings.
3. Re-embed chunk by chunk with gradients under the saved RNG state and backpropagate the
   cached embedding gradients into the parameters; DDP all-reduces only on the last chunk.

The parameter gradients equal those of the same loss computed in one graph (tests check it),
while activation memory is that of one chunk, whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from torch import Tensor

from retriever.data import Batch
from retriever.gradcache import backward_from_cached_grads, embed_without_grad
from retriever.loss import InfoNCELoss


def cached_step(
    embed: Callable[[dict[str, Tensor]], Tensor],
    batch: Batch,
    loss_fn: InfoNCELoss,
    *,
    group: object | None = None,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    devices: Iterable[torch.device | str] = (),
) -> Tensor:
    """Accumulate the gradient of ``loss_fn`` over ``batch`` into the parameters' ``.grad``.

    ``embed`` maps a chunk's features to [n, D] embeddings (the model, possibly DDP-wrapped);
    ``no_sync`` is e.g. ``lambda: accelerator.no_sync(model)``. Returns this process's loss
    (detached; the mean over processes is the global loss).
    """
    chunks = batch.query_chunks + batch.document_chunks
    cache, states = embed_without_grad(embed, chunks, devices)
    queries = cache[: batch.num_queries][batch.query_order]
    documents = cache[batch.num_queries :][batch.document_order]
    loss = loss_fn(queries, documents, candidate_ids=batch.candidate_ids, group=group)
    loss.backward()  # fills cache.grad (and a learnable temperature's gradient)
    backward_from_cached_grads(embed, chunks, states, cache.grad, no_sync=no_sync)
    return loss.detach()
