"""Padding-free chunks in training: the Collator puts every text in exactly one stream of at most
the token budget; the cached gradient over streams equals the direct one (dropout on);
`retriever train` reaches the same parameters packed and padded (dropout off); a model that
cannot run packed falls back with its reason; option checks."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch
from train_helpers import (
    assert_cached_step_is_exact,
    load_weights,
    make_tiny_model,
    text_groups,
    tiny_config,
    write_examples,
)

from retriever.loss import InfoNCELoss
from retriever.model import Encoder
from retriever.model.settings import SideSettings
from retriever.train.batches import Collator, Packing, StreamChunk, TextPool
from retriever.train.cli import add_arguments, run
from retriever.train.config import ConfigError
from retriever.train.tokens import TokenTable

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class _Tokenizer:
    pad_token_id, padding_side = 0, "right"


def _pool(lengths: list[int], seed: int) -> TextPool:
    """A pool of texts of these token lengths (random ids), without a tokenizer."""
    pool = TextPool(SideSettings("", 64))
    g = np.random.default_rng(seed)
    for i in range(len(lengths)):
        pool.add(f"text {seed} {i}")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    pool.table = TokenTable(g.integers(5, 999, int(offsets[-1])).astype(np.int32), offsets)
    pool.text_ids = np.arange(len(lengths), dtype=np.int64)
    return pool


@pytest.mark.parametrize("sort", [True, False])
def test_every_text_lands_in_exactly_one_stream_within_the_budget(sort):
    g = np.random.default_rng(0)
    queries = _pool(list(g.integers(1, 12, 40)), 1)
    documents = _pool(list(g.integers(1, 30, 60)) + [45, 31], 2)  # two longer than the budget
    budget = 30
    collator = Collator(queries, documents, _Tokenizer(), budget, sort, Packing(64))
    groups = [(i, 2 * i, [2 * i + 1]) for i in range(31)]
    batch = collator(groups)
    for pool, chunks, order, rows in (
        (queries, batch.query_chunks, batch.query_order, [q for q, _, _ in groups]),
        (documents, batch.document_chunks, batch.document_order,
         [p for _, p, _ in groups] + [n[0] for _, _, n in groups]),
    ):  # fmt: skip
        assert all(isinstance(c, StreamChunk) for c in chunks)
        for c in chunks:  # within the budget, unless a text alone exceeds it
            assert c.size == int(c.lengths.sum()) and (c.size <= budget or c.texts == 1)
        texts = [t for c in chunks for t in torch.split(c.ids, c.lengths.tolist())]
        assert len(texts) == len(rows)  # each text in one stream, once
        for i, row in enumerate(rows):  # text i of the batch is at order[i] in the streams
            assert np.array_equal(texts[int(order[i])].numpy(), pool.table.row(row))


def _stream_batch(encoder: Encoder, groups, budget: int):
    """The trainer's batch of text groups as padding-free streams of ``budget`` tokens."""
    pools = [TextPool(encoder.side_settings(side)) for side in ("query", "document")]
    rows = [
        (pools[0].add(q), pools[1].add(p), [pools[1].add(n) for n in negatives])
        for q, p, negatives in groups
    ]
    for pool in pools:
        pool.tokenize(encoder.tokenizer, None, "tokenize", show_progress=False)
    packing = Packing(max(encoder.query_max_length, encoder.document_max_length))
    return Collator(*pools, encoder.tokenizer, budget, True, packing)(rows)


@pytest.mark.parametrize(("dropout", "grad_tokens"), [(0.1, None), (0.0, 17)])
def test_cached_gradient_over_streams_equals_the_direct_one(tmp_path, dropout, grad_tokens):
    encoder = Encoder.from_pretrained(make_tiny_model(tmp_path / "m", dropout=dropout),
                                      query_max_length=16, document_max_length=24)  # fmt: skip
    assert encoder.use_padding_free() is None
    encoder.train()  # dropout on: the cache must replay each stream's RNG
    batch = _stream_batch(encoder, text_groups(11), budget=40)
    assert len(batch.document_chunks) > 2  # several streams a side
    loss_fn = InfoNCELoss(scale=20.0, learnable_scale=True, impl="torch")
    assert_cached_step_is_exact(encoder, batch, loss_fn, grad_tokens, dropout=bool(dropout))


def _train(tmp_path, name: str, *flags: str) -> dict[str, torch.Tensor]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"),
            "--output-dir", str(tmp_path / name), "--training.report_to", "[]",
            "--training.cpu", "true", "--max-steps", "3", "--batch-size", "8",
            "--training.chunk_size", "5", "--training.learning_rate", "1e-3",
            "--training.adam_epsilon", "1e-6", "--training.save_checkpoints", "false",
            "--model.query_max_length", "16", "--model.document_max_length", "24",
            "--data.num_workers", "0", *flags]  # fmt: skip
    assert run(parser.parse_args(argv)) == 0
    return load_weights(tmp_path / name / "final")


def test_train_reaches_the_same_parameters_packed_and_padded(tmp_path):
    make_tiny_model(tmp_path / "model", dropout=0.0)
    write_examples(tmp_path / "train.jsonl", n=24, negatives=1)
    packed = _train(tmp_path, "packed", "--model.padding_free", "true",
                    "--training.chunk_tokens", "50")  # fmt: skip
    padded = _train(tmp_path, "padded", "--model.padding_free", "false")
    start = load_weights(tmp_path / "model")
    # Three AdamW steps of at most ~lr each; the two paths sum the same products in other
    # orders (fp32 rounding, ~1e-7 relative in the gradients), which AdamW's normalised
    # update passes on at about that relative size (epsilon 1e-6 keeps gradients that are
    # zero in theory, such as the attention key biases', from turning rounding into steps).
    moved = max((padded[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # it trained
    for key in start:
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-5, atol=1e-5)


def test_a_model_that_cannot_run_packed_falls_back_and_says_why(tmp_path, caplog):
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    from retriever.train.trainer import Trainer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "bert"))
    config = MPNetConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=66)  # fmt: skip
    MPNetModel(config).save_pretrained(tmp_path / "mpnet")
    tokenizer.save_pretrained(tmp_path / "mpnet")
    data = write_examples(tmp_path / "train.jsonl", n=16, negatives=1)
    with caplog.at_level(logging.WARNING, logger="retriever"):
        # transformers runs MPNet with eager attention only.
        model = {"attn_implementation": "eager", "padding_free": True}
        config = tiny_config(str(tmp_path / "mpnet"), data, tmp_path / "run", model=model)
        trainer = Trainer(config)
    assert trainer.chunks.packing is None and trainer.state.chunk_sizes == [5, 5]
    (line,) = [r.getMessage() for r in caplog.records if "padding_free" in r.getMessage()]
    assert line.startswith("model.padding_free: mpnet: its attention layers do not call")
    assert line.endswith("training on padded chunks")


def test_a_packed_run_records_token_sizes(tmp_path, caplog):
    from retriever.train.trainer import Trainer

    model = make_tiny_model(tmp_path / "model", dropout=0.0)
    data = write_examples(tmp_path / "train.jsonl", n=16, negatives=1)
    config = tiny_config(model, data, tmp_path / "run", model={"padding_free": True},
                         training={"chunk_tokens": 64})  # fmt: skip
    trainer = Trainer(config)
    assert trainer.chunks.packing == Packing(24) and trainer.state.chunk_sizes == [64, 64, 1]
    assert all(c.packing is not None for c in trainer.collators)
    # Left at null on a CPU (no varlen kernel) the run keeps padded chunks, and says so.
    from train_helpers import reset_accelerate_state

    reset_accelerate_state()
    with caplog.at_level(logging.INFO, logger="retriever"):
        trainer = Trainer(tiny_config(model, data, tmp_path / "run2"))
    assert trainer.chunks.packing is None and trainer.state.chunk_sizes == [5, 5]
    assert any("padded chunks: no varlen attention kernel" in r.getMessage()
               for r in caplog.records)  # fmt: skip


@pytest.mark.parametrize(
    ("model", "training", "message"),
    [
        ({"padding_free": False}, {"chunk_tokens": 100}, "training.chunk_tokens sizes"),
        ({"padding_free": False, "compile": "static"}, {}, "model.compile compiles"),
        ({"compile": "dynamic", "gradient_checkpointing": True}, {}, "gradient_checkpointing"),
        ({"padding_free": "maybe"}, {}, "model.padding_free: expected"),
    ],
)
def test_options_that_do_not_go_together_are_refused(tmp_path, model, training, message):
    with pytest.raises(ConfigError, match=message):  # tiny_config validates
        tiny_config("m", "d.jsonl", tmp_path / "run", model=model, training=training)
