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

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from retriever.data import Batch
from retriever.gradcache import backward_from_cached_grads, embed_without_grad
from retriever.loss import InfoNCELoss


def cached_step(
    embed: Callable[[dict[str, Any]], Tensor],
    batch: Batch,
    loss_fn: InfoNCELoss,
    *,
    device: torch.device | str = "cpu",
    group: object | None = None,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> Tensor:
    """Accumulate the gradient of ``loss_fn`` over ``batch`` into the parameters' ``.grad``.

    ``embed`` maps a chunk's features to [n, D] embeddings (the model, possibly DDP-wrapped);
    ``no_sync`` is e.g. ``lambda: accelerator.no_sync(model)``. The chunks may stay in (pinned)
    host memory: each is copied to ``device`` when it is embedded, so the tokens of the whole
    batch never occupy the GPU. Returns this process's loss (detached; the mean over processes
    is the global loss).
    """
    device = torch.device(device)

    def embed_on_device(chunk: dict[str, Any]) -> Tensor:
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                 for k, v in chunk.items()}  # fmt: skip
        return embed(moved)

    chunks = batch.query_chunks + batch.document_chunks
    rng_devices = [device] if device.type == "cuda" else []
    cache, states = embed_without_grad(embed_on_device, chunks, rng_devices)
    queries = cache[: batch.num_queries][batch.query_order.to(device)]
    documents = cache[batch.num_queries :][batch.document_order.to(device)]
    ids = batch.candidate_ids.to(device)
    loss = loss_fn(queries, documents, candidate_ids=ids, group=group)
    loss.backward()  # fills cache.grad (and a learnable temperature's gradient)
    backward_from_cached_grads(embed_on_device, chunks, states, cache.grad, no_sync=no_sync)
    return loss.detach()
