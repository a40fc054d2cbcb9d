"""GradCache: the cached gradient must equal the gradient of the same loss without caching."""

import pytest
import torch
from torch import nn

from retriever.gradcache import (
    RandContext,
    backward_from_cached_grads,
    embed_without_grad,
    split_features,
)
from retriever.loss import contrastive_loss


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


@pytest.mark.slow
def test_cached_gradient_equals_direct_gradient_with_a_compiled_encoder(tmp_path):
    """torch.compile builds separate graphs for the no-grad pass and the replay: the replay must
    still draw the same dropout masks, or the cached gradient would be wrong."""
    from tiny_encoder import save_tiny_bert

    from retriever.modeling import Encoder

    encoder = Encoder.from_pretrained(str(save_tiny_bert(tmp_path)), compile=True).train()
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(24)]
    chunks = [encoder.tokenize(texts[i : i + 8], "query") for i in range(0, 24, 8)]

    def grads() -> list[torch.Tensor]:  # the pooler gets none: embeddings skip it
        return [p.grad.clone() for p in encoder.parameters() if p.grad is not None]

    torch.manual_seed(7)
    direct = torch.cat([encoder(c) for c in chunks])
    loss = contrastive_loss(direct[:8], direct[8:], scale=5.0, impl="naive")
    loss.backward()
    expected = grads()
    encoder.zero_grad()

    torch.manual_seed(7)
    cached, states = embed_without_grad(encoder, chunks)
    cached_loss = contrastive_loss(cached[:8], cached[8:], scale=5.0, impl="torch")
    cached_loss.backward()
    backward_from_cached_grads(encoder, chunks, states, cached.grad)

    torch.testing.assert_close(cached_loss, loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
