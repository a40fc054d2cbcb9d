"""Shared pieces of the evaluation tests: BEIR directories written from rows, and random ones."""

from __future__ import annotations

import json

import numpy as np

WORDS = "cat dog fish bird tree rock river cloud apple bread stone light".split()


def write_beir(root, corpus=None, queries=None, qrels=None, split="test"):
    """A BEIR directory; ``qrels`` is a list of (query, doc, score) or raw TSV text."""
    corpus = corpus or [
        {"_id": "d1", "title": "Cats", "text": "Cats purr."},
        {"_id": "d2", "title": "", "text": " Dogs bark. "},
        {"_id": "d3", "text": "Fish swim."},
    ]
    queries = queries or [
        {"_id": "q1", "text": "what purrs"},
        {"_id": "q2", "text": "what barks"},
        {"_id": "q3", "text": "unjudged"},
    ]
    qrels = qrels if qrels is not None else [("q1", "d1", 2), ("q1", "d3", 0), ("q2", "d2", 1)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    for name, rows in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
        if isinstance(rows, str):
            (root / name).write_text(rows)
        else:
            (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if isinstance(qrels, str):
        text = qrels
    else:
        text = "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    (root / "qrels" / f"{split}.tsv").write_text(text)
    return root


def random_task(root, seed, n_docs=60, n_queries=12):
    """A BEIR directory of ``n_docs`` random documents (title and text from WORDS) and
    ``n_queries`` queries, each judged relevant (grade 1 or 2) to 1 to 3 random documents."""
    rng = np.random.default_rng(seed)
    corpus = [
        {
            "_id": f"doc{i}",
            "title": " ".join(rng.choice(WORDS, 2)),
            "text": " ".join(rng.choice(WORDS, 8)),
        }
        for i in range(n_docs)
    ]
    queries = [{"_id": f"q{i}", "text": " ".join(rng.choice(WORDS, 3))} for i in range(n_queries)]
    qrels = [
        (f"q{i}", f"doc{j}", int(rng.integers(1, 3)))
        for i in range(n_queries)
        for j in rng.choice(n_docs, size=int(rng.integers(1, 4)), replace=False)
    ]
    return write_beir(root, corpus, queries, qrels)
