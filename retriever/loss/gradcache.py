"""Embedding cache (GradCache): a batch limited by the memory of its embeddings, not activations.

Design notes section 4.  A step is three passes:

1. `embed_without_grad`: embed every chunk under `no_grad`, remembering the RNG state each chunk
   started from, so dropout can be replayed bit for bit.
2. The caller computes the loss over all (detached, `requires_grad`) embeddings and calls
   backward: that yields d(loss)/d(embedding) for every row, and no activations were kept.
3. `backward_from_cached_grads`: re-embed chunk by chunk with gradients under the saved RNG
   state and backpropagate `(embedding * cached_grad).sum()`, whose gradient with respect to the
   parameters is exactly the chain rule through the embeddings.  Under DDP every chunk but the
   last runs inside `no_sync()`, so the gradient all-reduce happens once per step.

The result equals the gradient of the same loss computed without caching (tests check it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
from torch import Tensor

Chunk = TypeVar("Chunk")


class RandContext:
    """The RNG state a forward pass starts from; `with ctx:` replays it.

    Captures the CPU generator and the generators of the given CUDA devices.  Entering forks the
    RNG (`torch.random.fork_rng`), so replaying does not disturb the state outside the block.
    """

    def __init__(self, devices: Iterable[torch.device | str] = ()) -> None:
        self.cuda_devices = sorted(
            {torch.device(d).index or 0 for d in devices if torch.device(d).type == "cuda"}
        )
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self._fork: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> RandContext:
        self._fork = torch.random.fork_rng(devices=self.cuda_devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        for device, state in zip(self.cuda_devices, self.cuda_states):
            torch.cuda.set_rng_state(state, device)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        assert self._fork is not None
        self._fork.__exit__(*exc_info)
        self._fork = None


def split_features(features: Mapping[str, Any], chunk_size: int) -> list[dict[str, Any]]:
    """Split a tokenizer-style feature dict into chunks of at most `chunk_size` rows.

    Tensors whose first dimension is the batch are sliced; every other value (prompt lengths,
    a router's task name, ...) is passed through to each chunk unchanged.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sizes = {v.shape[0] for v in features.values() if isinstance(v, Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"feature tensors disagree on the batch size: {sorted(sizes)}")
    (batch,) = sizes
    return [
        {
            k: v[start : start + chunk_size]
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch
            else v
            for k, v in features.items()
        }
        for start in range(0, batch, chunk_size)
    ]


def embed_without_grad(
    embed: Callable[[Chunk], Tensor],
    chunks: Sequence[Chunk],
    devices: Iterable[torch.device | str] = (),
) -> tuple[Tensor, list[RandContext]]:
    """Embed each chunk without building a graph; return the concatenated embeddings as a leaf
    that requires grad, and the RNG state each chunk started from."""
    devices = list(devices)
    embeddings, states = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandContext(devices))
            embeddings.append(embed(chunk))
    return torch.cat(embeddings).detach().requires_grad_(), states


def backward_from_cached_grads(
    embed: Callable[[Chunk], Tensor],
    chunks: Sequence[Chunk],
    states: Sequence[RandContext] | None,
    cached_grads: Tensor,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> None:
    """Re-embed each chunk with gradients, replaying its RNG state, and backpropagate the cached
    embedding gradients (rows of `cached_grads`, in chunk order) into the parameters.

    `states=None` replays nothing: only right when the network draws no random numbers (no
    dropout), e.g. when these chunks are smaller than those the embeddings were cached from.
    `no_sync`: e.g. DDP's `model.no_sync`; wraps every chunk but the last, so gradients are
    all-reduced once, on the last backward.
    """
    if states is not None and len(chunks) != len(states):
        raise ValueError(f"{len(chunks)} chunks but {len(states)} saved RNG states")
    replays = states if states is not None else [contextlib.nullcontext()] * len(chunks)
    offset = 0
    for index, (chunk, state) in enumerate(zip(chunks, replays)):
        last = index == len(chunks) - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync, state:
            embedding = embed(chunk)
            grad = cached_grads[offset : offset + embedding.shape[0]]
            offset += embedding.shape[0]
            # d/dθ sum(e(θ) * g) = g · de/dθ: the chain rule through the cached gradient.
            torch.autograd.backward(embedding, grad.to(embedding.dtype))
    if offset != cached_grads.shape[0]:
        raise ValueError(
            f"the chunks re-embedded to {offset} rows but {cached_grads.shape[0]} gradients "
            "were cached"
        )
