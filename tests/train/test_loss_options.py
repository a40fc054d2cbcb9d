"""InfoNCE's options in the trainer (loss.directions, loss.partition_mode, loss.hardness_mode,
loss.hardness_strength, loss.false_negative_margin, loss.debias, loss.label_smoothing): checked
with the file and key named, built into the loss, exact through the embedding cache of several
sources at once, and a run that trains with them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from objective_reference import Options, reference_option_loss
from train_helpers import (
    embed_directly,
    grads_or_zeros,
    make_tiny_model,
    read_log,
    text_groups,
    tiny_config,
    write_examples,
)

from retriever.loss import InfoNCELoss
from retriever.loss.matryoshka import MatryoshkaLoss
from retriever.model import Encoder
from retriever.train.builders import build_loss
from retriever.train.config import ConfigError
from retriever.train.data import batch_of_texts
from retriever.train.step import cached_parts_step, loss_part
from retriever.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
ALL = ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]


@pytest.mark.parametrize(
    "loss, message",
    [
        ({"directions": ["doc_to_doc"]}, r"loss.directions: .*must include 'query_to_doc'"),
        ({"directions": ["query_to_doc", "doc"]}, r"loss.directions: directions must be"),
        ({"directions": ALL, "partition_mode": "per_direction"},
         r"loss.partition_mode: partition_mode='per_direction' needs"),
        ({"partition_mode": "single"}, r"loss.partition_mode: expected one of joint"),
        ({"hardness_mode": "hard"}, r"loss.hardness_mode: expected one of in_batch_negatives"),
        ({"hardness_strength": -1.0}, r"loss.hardness_strength: expected a number >= 0"),
        ({"debias": 1.0}, r"loss.debias: expected a number in \[0, 1\)"),
        ({"debias": 0.1, "label_smoothing": 0.1}, r"loss.debias: debias and label_smoothing"),
        ({"symmetric": True, "directions": ALL}, r"loss.directions: symmetric=True means"),
        ({"objective": "sigmoid", "false_negative_margin": 0.1},
         r"loss.false_negative_margin is an option of loss.objective infonce"),
    ],
)  # fmt: skip
def test_bad_options_name_the_key(tmp_path, loss, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("m", "d.jsonl", tmp_path / "run", loss=loss)


def test_the_loss_is_built_with_the_options(tmp_path):
    encoder = Encoder.from_pretrained(make_tiny_model(tmp_path / "m", dropout=0.0))
    options = {"directions": ALL, "false_negative_margin": 0.1, "hardness_mode": "all_negatives",
               "hardness_strength": 5.0, "label_smoothing": 0.1}  # fmt: skip
    config = tiny_config("m", "d.jsonl", tmp_path / "run", loss=options)
    loss = build_loss(config, torch.device("cpu"), encoder, [], 10)
    assert isinstance(loss, InfoNCELoss)
    built = loss.get_config_dict()
    assert {k: built[k] for k in options} == options
    config = tiny_config("m", "d.jsonl", tmp_path / "run",
                         loss={**options, "matryoshka_dims": [32, 8]})  # fmt: skip
    matryoshka = build_loss(config, torch.device("cpu"), encoder, [], 10)
    assert isinstance(matryoshka, MatryoshkaLoss)
    assert matryoshka.loss.objective == loss.objective


def test_several_sources_with_options_through_the_cache_are_exact(tmp_path):
    """Two sources in one step, each with its own batch: the cached gradient of the summed
    options' losses equals the one-graph gradient, whose losses equal the float64 reference."""
    encoder = Encoder.from_pretrained(make_tiny_model(tmp_path / "m", dropout=0.1),
                                      query_max_length=16, document_max_length=24)  # fmt: skip
    encoder.train()
    opts = Options(directions=tuple(ALL), margin=0.3, hardness_mode="in_batch_negatives",
                   hardness_strength=4.0, dims=(32, 8))  # fmt: skip
    loss_fn = MatryoshkaLoss(
        InfoNCELoss(scale=10.0, impl="torch", directions=ALL, false_negative_margin=0.3,
                    hardness_mode="in_batch_negatives", hardness_strength=4.0), [32, 8]
    )  # fmt: skip
    batches = [batch_of_texts(encoder, text_groups(n), chunk_size=4) for n in (7, 5)]
    options = SimpleNamespace(distill_weight=0.0, teacher_temperature=0.1, cosent_scale=20.0)
    source = SimpleNamespace(task="retrieval")
    params = list(encoder.parameters())

    def parts():
        return [loss_part(source, b, w, loss_fn, options, torch.device("cpu"), None)
                for b, w in zip(batches, (1.0, 0.5))]  # fmt: skip

    torch.manual_seed(3)
    cached, per_source = cached_parts_step(encoder, parts())
    got = grads_or_zeros(params)
    for p in params:
        p.grad = None

    torch.manual_seed(3)  # the same dropout masks: the chunks in the same order
    direct, want_losses = 0.0, []
    for part in parts():
        q, d = embed_directly(encoder, part.batch)
        value = part.loss(q, d, part.batch)
        ids = part.batch.candidate_ids
        ref = reference_option_loss(q.detach().double(), d.detach().double(), 10.0,
                                    torch.arange(q.shape[0]), ids, None, opts)  # fmt: skip
        want_losses.append(float(ref))
        direct = direct + part.weight * value
    direct.backward()
    want = grads_or_zeros(params)
    assert float(cached) == pytest.approx(float(direct.detach()), rel=1e-5)
    for loss, ref in zip(per_source, want_losses):
        assert float(loss) == pytest.approx(ref, rel=1e-5)
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale)


def test_a_run_trains_with_the_options(tmp_path):
    model = make_tiny_model(tmp_path / "m", dropout=0.0)
    data = write_examples(tmp_path / "train.jsonl", n=32, negatives=1)
    config = tiny_config(
        model, data, tmp_path / "run",
        loss={"directions": ALL, "false_negative_margin": 0.1, "hardness_mode": "hard_negatives",
              "hardness_strength": 5.0, "matryoshka_dims": [32, 16], "impl": "torch"},
        training={"max_steps": 3},
    )  # fmt: skip
    Trainer(config).train()
    losses = [r["loss"] for r in read_log(tmp_path / "run") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_the_model_card_names_the_options_it_trained_with(tmp_path):
    from retriever.train.model_card import _objective

    config = tiny_config("m", "x.jsonl", tmp_path, loss={"directions": ALL,
                         "false_negative_margin": 0.1, "label_smoothing": 0.05})  # fmt: skip
    text = _objective(config.loss)
    assert "directions query_to_doc, query_to_query, doc_to_query, doc_to_doc (joint)" in text
    assert "false negatives masked above the positive + 0.1" in text
    assert "label smoothing 0.05" in text
    assert "directions" not in _objective(tiny_config("m", "x.jsonl", tmp_path).loss)
