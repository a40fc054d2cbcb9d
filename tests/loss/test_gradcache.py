"""GradCache: the cached gradient must equal the gradient of the same loss without caching."""

import pytest
import torch
from torch import nn

from retriever.loss import contrastive_loss
from retriever.loss.gradcache import (
    RandContext,
    backward_from_cached_grads,
    embed_without_grad,
    split_features,
)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    # Dropout makes the test meaningful: without RNG replay the re-embedding would differ.
    return nn.Sequential(nn.Linear(12, 32), nn.Dropout(0.3), nn.Tanh(), nn.Linear(32, 8))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def test_rand_context_replays_dropout_and_leaves_outer_state_alone():
    drop = nn.Dropout(0.5)
    x = torch.ones(1000)
    state = RandContext()
    first = drop(x)
    after_first = torch.get_rng_state()
    with state:
        replay = drop(x)
    assert torch.equal(first, replay)
    assert torch.equal(torch.get_rng_state(), after_first)


@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_cached_gradient_equals_direct_gradient(chunk_size):
    torch.manual_seed(1)
    queries, documents = torch.randn(10, 12), torch.randn(20, 12)
    model = _encoder()
    embed = model.forward

    # Direct: one graph through every row, with the same RNG order as the cached pass
    # (the chunks below, queries first, each chunk drawing its own dropout masks).
    q_chunks = list(queries.split(chunk_size))
    d_chunks = list(documents.split(chunk_size))
    torch.manual_seed(7)
    direct = torch.cat([embed(c) for c in q_chunks + d_chunks])
    loss = contrastive_loss(direct[:10], direct[10:], scale=5.0, impl="naive")
    loss.backward()
    expected = _grads(model)
    model.zero_grad()

    torch.manual_seed(7)
    chunks = q_chunks + d_chunks
    cached, states = embed_without_grad(embed, chunks)
    cached_loss = contrastive_loss(cached[:10], cached[10:], scale=5.0, impl="torch")
    cached_loss.backward()
    backward_from_cached_grads(embed, chunks, states, cached.grad)

    torch.testing.assert_close(cached_loss, loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(model), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_no_sync_wraps_all_but_the_last_chunk():
    entered = []
    model = _encoder()
    chunks = list(torch.randn(9, 12).split(4))
    cached, states = embed_without_grad(model, chunks)

    class Recorder:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *args):
            return False

    backward_from_cached_grads(model, chunks, states, torch.ones_like(cached), no_sync=Recorder)
    assert len(entered) == len(chunks) - 1


def test_split_features_slices_batch_tensors_and_passes_the_rest():
    features = {"input_ids": torch.arange(10).view(5, 2), "task": "query", "prompt_length": 3}
    chunks = split_features(features, 2)
    assert [c["input_ids"].shape[0] for c in chunks] == [2, 2, 1]
    assert all(c["task"] == "query" and c["prompt_length"] == 3 for c in chunks)
    assert torch.equal(torch.cat([c["input_ids"] for c in chunks]), features["input_ids"])
    with pytest.raises(ValueError, match="chunk_size"):
        split_features(features, 0)


def test_mismatched_cached_rows_raise():
    model = _encoder()
    chunks = [torch.randn(3, 12)]
    cached, states = embed_without_grad(model, chunks)
    with pytest.raises(ValueError, match="re-embedded to 3 rows"):
        backward_from_cached_grads(model, chunks, states, torch.ones(5, 8))
