"""Training data: readers, per-epoch groups, batches without duplicate positives, collation."""

from __future__ import annotations

import collections
import copy
import dataclasses
import gzip
import json
import logging

import pytest
import torch
from train_helpers import SHARED_DATA, make_tiny_model

from retriever.data.examples import DataError, load_examples
from retriever.data.texts import text_id
from retriever.model import Encoder
from retriever.train.data import TrainSet, batch_of_texts, epoch_batches


def _jsonl(tmp_path, rows, name="train.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_field_names_and_gzip(tmp_path):
    rows = [
        {"query": "q1", "pos": "p1", "neg": ["n1", "n2"]},
        {"query": "q2", "positive": ["p2a", "p2b"], "negative": "n3"},
        {"anchor": "q3", "pos": ["p3"]},
    ]
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    examples = load_examples(str(path))
    assert [(e.query, e.positives, e.negatives) for e in examples] == [
        ("q1", ("p1",), ("n1", "n2")),
        ("q2", ("p2a", "p2b"), ("n3",)),
        ("q3", ("p3",), ()),
    ]
    assert examples[1].source.endswith("train.jsonl.gz:2")


@pytest.mark.parametrize(
    "bad_row, pattern",
    [
        ({"pos": "p"}, r"train\.jsonl:3: missing field 'query'"),
        ({"query": "q"}, r"train\.jsonl:3: missing field 'pos'"),
        ({"query": "q", "pos": 5}, r"train\.jsonl:3: 'pos' must be a string or a list"),
        ({"query": "q", "pos": []}, r"train\.jsonl:3: 'pos' is empty"),
        ({"query": "", "pos": "p"}, r"train\.jsonl:3: 'query' must be a non-empty string"),
        ({"query": "q", "pos": "p", "neg": [1]}, r"train\.jsonl:3: 'neg' must be a string or"),
        ('{"query": "q", "pos": ', r"train\.jsonl:3: malformed JSON"),
        ("[1, 2]", r"train\.jsonl:3: expected a JSON object"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, bad_row, pattern):
    good = {"query": "q", "pos": "p", "neg": ["n"]}
    path = _jsonl(tmp_path, [good, good, bad_row, good])
    with pytest.raises(DataError, match=pattern):
        load_examples(path)


def test_empty_or_missing_data(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        load_examples(_jsonl(tmp_path, []))
    with pytest.raises(DataError, match="no such file or directory"):
        load_examples(str(tmp_path / "absent.jsonl"))


def test_negatives_required_missing_or_short(tmp_path, caplog):
    rows = [
        {"query": f"q{i}", "pos": f"p{i}", "neg": [f"n{i}a", f"n{i}b", f"n{i}c"]} for i in range(4)
    ]
    rows[2] = {"query": "q2", "pos": "p2"}
    with pytest.raises(
        DataError, match=r"train\.jsonl:3: no hard negatives, but data\.negatives is 2"
    ):
        load_examples(_jsonl(tmp_path, rows), negatives=2)
    rows[2] = {"query": "q2", "pos": "p2", "neg": ["only"]}
    with caplog.at_level(logging.WARNING, logger="retriever.train.data"):
        examples = load_examples(_jsonl(tmp_path, rows), negatives=2)
    assert "1 of 4 examples have fewer than 2 hard negatives (first: " in caplog.text
    train_set = TrainSet(examples, negatives=2, seed=0)
    assert train_set[(0, 2)][2] == ["only", "only"]  # with replacement
    for epoch in range(5):  # enough negatives: distinct ones, from the example's own list
        negatives = train_set[(epoch, 0)][2]
        assert len(set(negatives)) == 2 and set(negatives) <= {"n0a", "n0b", "n0c"}


def test_groups_are_deterministic_and_change_with_the_epoch(tmp_path):
    rows = [
        {
            "query": f"q{i}",
            "pos": [f"p{i}{k}" for k in range(4)],
            "neg": [f"n{i}{k}" for k in range(9)],
        }
        for i in range(6)
    ]
    examples = load_examples(_jsonl(tmp_path, rows), negatives=3)
    a, b = TrainSet(examples, 3, seed=1), TrainSet(examples, 3, seed=1)
    assert [a[(e, i)] for e in range(3) for i in range(6)] == [
        b[(e, i)] for e in range(3) for i in range(6)
    ]
    assert [a[(0, i)] for i in range(6)] != [a[(1, i)] for i in range(6)]
    # positive_id (used to build batches) names the positive the group actually holds
    assert all(a.positive_id(e, i) == text_id(a[(e, i)][1]) for e in range(3) for i in range(6))


def test_batches_never_repeat_a_positive(tmp_path):
    # 60 examples over 12 distinct positive texts (5 queries each): many would collide.
    rows = [{"query": f"q{i}", "pos": f"shared passage {i % 12}"} for i in range(60)]
    train_set = TrainSet(load_examples(_jsonl(tmp_path, rows)), 0, seed=3)
    for epoch in range(3):
        batches = epoch_batches(train_set, epoch, 8)
        assert batches, "the data can make batches of 8 distinct positives"
        used = [i for b in batches for i in b]
        assert len(used) == len(set(used))  # each example at most once per epoch
        for batch in batches:
            positives = [train_set[(epoch, i)][1] for i in batch]
            assert len(batch) == 8 and len(set(positives)) == 8
    assert epoch_batches(train_set, 0, 13) == []  # only 12 distinct positives exist
    assert epoch_batches(train_set, 0, 8) != epoch_batches(train_set, 1, 8)


@pytest.mark.skipif(not (SHARED_DATA / "scifact").is_dir(), reason="../shared/data/scifact absent")
def test_beir_directory_gives_one_example_per_judged_query():
    root = SHARED_DATA / "scifact"
    examples = load_examples(str(root), split="train")
    qrels = collections.defaultdict(set)
    for line in (root / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        query_id, doc_id, score = line.split("\t")
        if int(score) > 0:
            qrels[query_id].add(doc_id)
    corpus = {}
    for line in (root / "corpus.jsonl").read_text().splitlines():
        doc = json.loads(line)
        corpus[doc["_id"]] = (doc["title"] + " " + doc["text"]).strip()
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in (root / "queries.jsonl").open()}
    expected = {(queries[q], frozenset(corpus[d] for d in docs)) for q, docs in qrels.items()}
    assert len(examples) == len(qrels) == 809
    assert {(e.query, frozenset(e.positives)) for e in examples} == expected
    with pytest.raises(DataError, match="qrels exist for splits: test, train"):
        load_examples(str(root), split="dev")


def test_datasets_with_numbered_negative_columns(tmp_path):
    import datasets

    rows = {
        "anchor": ["a1", "a2"],
        "positive": ["p1", "p2"],
        "negative_1": ["x1", "x2"],
        "negative_2": ["y1", "y2"],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    examples = load_examples(str(tmp_path / "ds"), negatives=2)
    assert [(e.query, e.positives, e.negatives) for e in examples] == [
        ("a1", ("p1",), ("x1", "y1")),
        ("a2", ("p2",), ("x2", "y2")),
    ]
    datasets.Dataset.from_dict({"anchor": ["a"], "text": ["t"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(
        DataError, match=r"bad row 1: missing field 'pos'.*found \['anchor', 'text'\]"
    ):
        load_examples(str(tmp_path / "bad"))


def _tiny_encoder(tmp_path, **settings):
    return Encoder.from_pretrained(make_tiny_model(tmp_path / "model"), **settings)


def _groups(n=7):
    return [
        (f"query {'word ' * (i % 4)}{i}", f"passage {'text ' * (7 - i)}{i}", [f"neg {i}", "dup"])
        for i in range(n)
    ]


def test_collator_chunks_by_length_and_keeps_batch_order(tmp_path):
    encoder = _tiny_encoder(tmp_path, query_prefix="q: ", document_max_length=32)
    groups = _groups()
    batch = batch_of_texts(encoder, groups, chunk_size=3)
    assert [c.size for c in batch.query_chunks] == [3, 3, 1]
    assert sum(c.size for c in batch.document_chunks) == 21
    documents = [g[1] for g in groups] + [g[2][0] for g in groups] + [g[2][1] for g in groups]

    def rows(chunks, order):
        ids = [r for c in chunks for r in c.features("cpu")["input_ids"].tolist()]
        return [encoder.tokenizer.decode(ids[k], skip_special_tokens=True) for k in order.tolist()]

    assert rows(batch.query_chunks, batch.query_order) == [f"q : {g[0]}" for g in groups]
    assert rows(batch.document_chunks, batch.document_order) == documents
    lengths = [int(c.lengths.max()) for c in batch.document_chunks]
    assert lengths == sorted(lengths, reverse=True)  # chunks of similar length, longest first
    ids = batch.candidate_ids.tolist()
    assert ids == [text_id(d) for d in documents] and len(set(ids[14:])) == 1  # "dup" repeated
    assert batch.num_tokens == sum(
        int(c.features("cpu")["attention_mask"].sum())
        for c in batch.query_chunks + batch.document_chunks
    )
    # Chunks without padding say so; the network then runs without a mask, to the same result.
    chunks = batch.query_chunks + batch.document_chunks
    flags = [c.no_padding for c in chunks]
    assert flags == [bool(c.features("cpu")["attention_mask"].all()) for c in chunks]
    assert any(flags) and not all(flags)
    encoder.eval()
    for chunk in batch.document_chunks:
        if chunk.no_padding:
            features = chunk.features("cpu")
            torch.testing.assert_close(
                encoder(features), encoder({**features, "no_padding": False})
            )
    unsorted = batch_of_texts(encoder, groups, chunk_size=3, sort_by_length=False)
    assert torch.equal(unsorted.query_order, torch.arange(7))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_token_cache_chunks_equal_direct_tokenization(tmp_path, padding_side):
    """Every chunk the collator gathers from the token tables is exactly what the tokenizer
    gives for the same texts in the same order (ids, mask, padding side)."""
    encoder = _tiny_encoder(tmp_path, query_prefix="Query: ", document_max_length=12)
    encoder.tokenizer.padding_side = padding_side
    encoder.settings = dataclasses.replace(encoder.settings, do_lower_case=True)
    groups = _groups(9)
    batch = batch_of_texts(encoder, groups, chunk_size=4)
    texts = {
        "query": [g[0] for g in groups],
        "document": [g[1] for g in groups]
        + [n for j in range(2) for n in (g[2][j] for g in groups)],
    }
    for side, chunks, order in (
        ("query", batch.query_chunks, batch.query_order),
        ("document", batch.document_chunks, batch.document_order),
    ):
        in_order = [None] * len(order)
        for row, position in enumerate(order.tolist()):
            in_order[position] = texts[side][row]
        start = 0
        for chunk in chunks:
            want = encoder.tokenize(in_order[start : start + chunk.size], side)
            got = chunk.features("cpu")
            assert torch.equal(got["input_ids"], want["input_ids"]), side
            assert torch.equal(got["attention_mask"], want["attention_mask"]), side
            start += chunk.size
        # Gradient-pass pieces of a chunk are its rows, trimmed to their own longest text.
        start = 0
        for piece in chunks[0].split(3):
            want = encoder.tokenize(in_order[start : start + piece.size], side)
            assert torch.equal(piece.features("cpu")["input_ids"], want["input_ids"]), side
            start += piece.size


def test_token_cache_is_reused_and_never_stale(tmp_path, monkeypatch):
    from retriever.train import tokens

    encoder = _tiny_encoder(tmp_path)
    texts = ["a first text", "a second, longer text", "third"]
    settings = tokens.SideSettings("query: ", 16)
    calls = []
    real = tokens.tokenize
    monkeypatch.setattr(tokens, "tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))

    def table(tokenizer=encoder.tokenizer, texts=texts, settings=settings):
        got = tokens.load_or_build(tokenizer, texts, settings, tmp_path / "cache",
                                   show_progress=False)  # fmt: skip
        want = real(tokenizer, texts, settings)
        assert [got.row(i).tolist() for i in range(len(texts))] == [
            want.row(i).tolist() for i in range(len(texts))
        ]
        return len(calls)

    assert table() == 1
    assert table() == 1  # the same texts, tokenizer and settings: read back, not tokenised
    assert table(settings=tokens.SideSettings("passage: ", 16)) == 2  # another prefix
    assert table(settings=tokens.SideSettings("query: ", 4)) == 3  # another max length
    assert table(settings=tokens.SideSettings("query: ", 16, lower_case=True)) == 4
    assert table(texts=[*texts[:2], "third!"]) == 5  # a changed data file
    other = copy.deepcopy(encoder.tokenizer)
    other.add_tokens(["newword"])  # another vocabulary
    assert table(tokenizer=other) == 6
    assert table() == 6  # and the first entry is still there
