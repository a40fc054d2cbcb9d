"""Run a retrieval task end to end: encode, index, search, score.

    task = load_beir("../shared/data/scifact", split="test")
    result = evaluate_task(Encoder.from_pretrained(path), task)
    result["ndcg_at_10"]

The result is one flat dict: task, split, model, main_score (nDCG@10), every metric at every k
(``ndcg_at_10``, ``recall_at_100``, ...), the number of queries and documents, timings and
throughput, the index settings and what the loader dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from retriever.eval.data import RetrievalTask
from retriever.eval.metrics import DEFAULT_K_VALUES, evaluate_ranked
from retriever.eval.search import IndexConfig, SearchIndex, corpus_cache_path, encode_corpus
from retriever.model import Encoder

MAIN_SCORE = "ndcg_at_10"


def evaluate_task(
    encoder: Encoder,
    task: RetrievalTask,
    *,
    k_values: Iterable[int] = DEFAULT_K_VALUES,
    index: str | IndexConfig = "flat",
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    ignore_identical_ids: bool = False,
    show_progress: bool = True,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``encoder`` on ``task``; see the module docstring for the result's keys.

    Retrieves the top max(k_values) documents per query (one more with
    ``ignore_identical_ids``, so that removing the query's own id still leaves enough).
    """
    ks = sorted({int(k) for k in k_values})
    config = index if isinstance(index, IndexConfig) else IndexConfig(kind=index)
    doc_ids, doc_texts = task.document_texts()
    query_ids, query_texts = task.query_texts()
    encode_options = {"batch_size": batch_size, "dtype": dtype, "show_progress": show_progress}
    timings: dict[str, float] = {}

    with _timed(timings, "encode_corpus_s"):
        doc_embeddings, corpus_cached = _encode_documents(
            encoder, doc_texts, cache_dir, **encode_options
        )
    with _timed(timings, "encode_queries_s"):
        query_embeddings = encoder.encode(query_texts, "query", **encode_options)
    with _timed(timings, "index_s"):
        search_index = SearchIndex(doc_embeddings, config)
    with _timed(timings, "search_s"):
        top_k = ks[-1] + int(ignore_identical_ids)
        scores, positions = search_index.search(query_embeddings, top_k)
    with _timed(timings, "evaluate_s"):
        metrics = _score(task, query_ids, doc_ids, positions, scores, ks, ignore_identical_ids)
    timings["total_s"] = sum(timings.values())

    return {
        "task": task.name,
        "split": task.split,
        "model": model_name or getattr(encoder.model.config, "_name_or_path", ""),
        "main_score": metrics[MAIN_SCORE],
        **metrics,
        "num_queries": len(query_ids),
        "num_documents": len(doc_ids),
        "timings": timings,
        "corpus_from_cache": corpus_cached,  # then documents_per_s measures the cache read
        "documents_per_s": len(doc_ids) / max(timings["encode_corpus_s"], 1e-9),
        "queries_per_s": len(query_ids) / max(timings["encode_queries_s"], 1e-9),
        "device": str(encoder.device),
        "index": {**dataclasses.asdict(config), "device": search_index.device},
        "ignore_identical_ids": ignore_identical_ids,
        "dropped": dataclasses.asdict(task.report),
    }


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the seconds the block takes as ``timings[name]``."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def _encode_documents(
    encoder: Encoder,
    doc_texts: list[str],
    cache_dir: str | os.PathLike | None,
    *,
    batch_size: int,
    dtype: torch.dtype | None,
    show_progress: bool,
) -> tuple[np.ndarray, bool]:
    """The corpus embeddings, read from or written to ``cache_dir`` when given, and whether
    they came from the cache."""
    cache_path = None
    if cache_dir is not None:
        cache_path = corpus_cache_path(encoder, doc_texts, cache_dir, dtype=dtype)
    corpus_cached = cache_path is not None and cache_path.is_file()
    doc_embeddings = encode_corpus(
        encoder,
        doc_texts,
        batch_size=batch_size,
        cache_path=cache_path,
        dtype=dtype,
        show_progress=show_progress,
    )
    return doc_embeddings, corpus_cached


def _score(
    task: RetrievalTask,
    query_ids: list[str],
    doc_ids: list[str],
    positions: np.ndarray,
    scores: np.ndarray,
    ks: list[int],
    ignore_identical_ids: bool,
) -> dict[str, float]:
    """Mean metrics of the search output (corpus positions per query) against the task's qrels."""
    return evaluate_ranked(
        task.qrels,
        query_ids,
        positions,
        scores,
        ks,
        corpus_ids=doc_ids,
        ignore_identical_ids=ignore_identical_ids,
    )
