"""Every objective (and InfoNCE's options) through the embedding cache (the trainer's loss_part
and cached step): the cached parameter gradient equals the gradient of the same loss computed
in one graph."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from train_helpers import (
    assert_grads_close,
    embed_directly,
    grads_or_zeros,
    make_tiny_model,
    text_groups,
)

from retriever.loss import InfoNCELoss
from retriever.loss.gcl import GlobalContrastiveLoss
from retriever.loss.matryoshka import MatryoshkaLoss
from retriever.loss.sigmoid import SigmoidLoss
from retriever.model import Encoder
from retriever.train.data import batch_of_texts
from retriever.train.step import cached_parts_step, loss_part

OBJECTIVES = {
    "sigmoid": lambda: SigmoidLoss(scale=10.0, bias=-5.0, learnable_scale=True, impl="torch"),
    "gcl": lambda: GlobalContrastiveLoss(
        20, scale=10.0, learnable_scale=True, decay_steps=3, symmetric=True, impl="torch"
    ),  # fmt: skip
    "matryoshka": lambda: MatryoshkaLoss(
        InfoNCELoss(scale=10.0, learnable_scale=True, impl="torch"), [32, 16, 4]
    ),  # fmt: skip
    "distillation": lambda: InfoNCELoss(scale=10.0, learnable_scale=True, impl="torch"),
    # InfoNCE's options (docs/objectives.md): GTE's four directions with Qwen3's margin and
    # hardness; the symmetric loss debiased; label smoothing under fused Matryoshka.
    "gte + margin + hardness": lambda: InfoNCELoss(
        scale=10.0,
        learnable_scale=True,
        impl="torch",
        false_negative_margin=0.1,
        directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        hardness_mode="all_negatives",
        hardness_strength=3.0,
    ),  # fmt: skip
    "symmetric + debias": lambda: InfoNCELoss(
        scale=10.0, learnable_scale=True, impl="torch", symmetric=True, debias=0.1
    ),
    "matryoshka + smoothing": lambda: MatryoshkaLoss(
        InfoNCELoss(
            scale=10.0,
            learnable_scale=True,
            impl="torch",
            label_smoothing=0.1,
            directions=("query_to_doc", "doc_to_query"),
        ),
        [32, 16, 4],
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_cached_gradient_equals_the_direct_one(tmp_path, name):
    encoder = Encoder.from_pretrained(make_tiny_model(tmp_path / "m", dropout=0.1),
                                      query_max_length=16, document_max_length=24)  # fmt: skip
    encoder.train()  # dropout on: the cache must replay each chunk's RNG
    batch = batch_of_texts(encoder, text_groups(9), chunk_size=4)
    batch.example_indices = torch.arange(9) * 2
    batch.scores = torch.rand(9, 3, generator=torch.Generator().manual_seed(0))
    options = SimpleNamespace(distill_weight=0.7 if name == "distillation" else 0.0,
                              teacher_temperature=0.1, cosent_scale=20.0)  # fmt: skip
    source = SimpleNamespace(task="retrieval")
    loss_fn = OBJECTIVES[name]()
    if name == "gcl":
        loss_fn.steps.fill_(1)  # past the first step: weights g / u differ from 1
        loss_fn.u_query.fill_(3.0)
        loss_fn.u_document.fill_(5.0)
    direct_fn = copy.deepcopy(loss_fn)  # the same state for the direct computation
    params = list(encoder.parameters())

    def grads(fn):
        out = grads_or_zeros(params)
        out += [p.grad.clone() for p in fn.parameters() if p.grad is not None]
        for p in [*params, *fn.parameters()]:
            p.grad = None
        return out

    torch.manual_seed(3)
    part = loss_part(source, batch, 1.0, loss_fn, options, torch.device("cpu"), None, offset=1)
    cached, _ = cached_parts_step(encoder, [part])  # RNG replay: the same chunks
    got = grads(loss_fn)

    torch.manual_seed(3)  # the same dropout masks: the chunks in the same order
    q, d = embed_directly(encoder, batch)
    part = loss_part(source, batch, 1.0, direct_fn, options, torch.device("cpu"), None, offset=1)
    direct = part.loss(q, d, batch)
    direct.backward()
    want = grads(direct_fn)

    assert float(cached) == pytest.approx(float(direct.detach()), rel=1e-5)
    assert len(got) == len(want)
    assert_grads_close(got, want)
    if name == "gcl":  # both took one step from the same state, at the same examples
        assert torch.equal(loss_fn.u_query, direct_fn.u_query)
        assert sorted(torch.nonzero(loss_fn.u_query != 3.0).flatten().tolist()) == [
            1 + 2 * i for i in range(9)
        ]
