"""Ranking metrics computed exactly as trec_eval / pytrec_eval (which MTEB uses), in numpy.

Conventions reproduced from trec_eval:

* ranking: score descending, ties broken by document id descending (byte order);
* a document is relevant when its grade is >= 1; unjudged documents have grade 0;
* nDCG@k (``ndcg_cut.k``): gain = grade (linear; negative grades gain 0), discount
  1 / log2(rank + 1); the ideal ranking sorts the query's positive grades; 0 when the query
  has no positive grade;
* Precision@k (``P.k``) divides by k even when fewer documents were retrieved;
* Recall@k (``recall.k``) and MAP@k (``map_cut.k``) divide by all relevant documents of the
  query, retrieved or not;
* MRR@k: ``recip_rank`` of the ranking cut at k (trec_eval has no cut for it; MTEB's MRR@k).

Scores are averaged over the queries that have qrels and appear in the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_K_VALUES = (1, 3, 5, 10, 100, 1000)
METRICS = ("ndcg", "mrr", "recall", "map", "precision")

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def evaluate(
    qrels: Qrels,
    run: Run,
    k_values: Iterable[int] = DEFAULT_K_VALUES,
    *,
    ignore_identical_ids: bool = False,
    per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray], list[str]]:
    """Mean metrics of ``run`` (query id -> {doc id: score}) against graded ``qrels``.

    Returns ``{"ndcg_at_10": ..., "mrr_at_10": ..., "recall_at_100": ..., ...}`` for every
    metric and k. With ``ignore_identical_ids``, a document whose id equals the query's id is
    removed from that query's results first (MTEB's option for ArguAna, Quora, ...).
    With ``per_query``, also returns per-query arrays (same keys) and their query ids.
    """
    query_ids = [q for q in run if q in qrels]
    lengths = np.fromiter((len(run[q]) for q in query_ids), dtype=np.int64, count=len(query_ids))
    query_index = np.repeat(np.arange(len(query_ids)), lengths)
    doc_ids = np.array([d for q in query_ids for d in run[q]], dtype=object)
    scores = np.fromiter(
        (s for q in query_ids for s in run[q].values()), dtype=np.float64, count=int(lengths.sum())
    )
    return _evaluate_flat(
        qrels, query_ids, query_index, doc_ids, scores, k_values, ignore_identical_ids, per_query
    )


def evaluate_ranked(
    qrels: Qrels,
    query_ids: Sequence[str],
    doc_ids: np.ndarray,
    scores: np.ndarray,
    k_values: Iterable[int] = DEFAULT_K_VALUES,
    *,
    ignore_identical_ids: bool = False,
    per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray], list[str]]:
    """:func:`evaluate` for search output: ``doc_ids`` and ``scores`` are [Q, K] arrays (row i
    belongs to ``query_ids[i]``; ``None`` ids, e.g. for a short corpus, are skipped)."""
    doc_ids = np.asarray(doc_ids, dtype=object)
    scores = np.asarray(scores, dtype=np.float64)
    if doc_ids.shape != scores.shape or doc_ids.shape[0] != len(query_ids):
        raise ValueError(
            f"doc_ids {doc_ids.shape}, scores {scores.shape} and {len(query_ids)} query ids "
            "do not match"
        )
    keep_rows = np.array([q in qrels for q in query_ids], dtype=bool)
    kept_ids = [q for q, k in zip(query_ids, keep_rows, strict=True) if k]
    doc_ids, scores = doc_ids[keep_rows], scores[keep_rows]
    query_index = np.repeat(np.arange(len(kept_ids)), doc_ids.shape[1])
    valid = np.not_equal(doc_ids, None).ravel()
    return _evaluate_flat(
        qrels,
        kept_ids,
        query_index[valid],
        doc_ids.ravel()[valid],
        scores.ravel()[valid],
        k_values,
        ignore_identical_ids,
        per_query,
    )


def _evaluate_flat(
    qrels: Qrels,
    query_ids: list[str],
    query_index: np.ndarray,
    doc_ids: np.ndarray,
    scores: np.ndarray,
    k_values: Iterable[int],
    ignore_identical_ids: bool,
    per_query: bool,
):
    ks = sorted({int(k) for k in k_values})
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be positive integers, got {list(k_values)}")
    if not query_ids:
        raise ValueError("no query of the run has qrels")
    n_queries, k_max = len(query_ids), ks[-1]
    doc_ids = doc_ids.astype(str)

    if ignore_identical_ids:
        own = doc_ids == np.asarray(query_ids, dtype=str)[query_index]
        query_index, doc_ids, scores = query_index[~own], doc_ids[~own], scores[~own]

    # Rank as trec_eval: by query, score descending, then document id descending. Sorting the
    # ids as UTF-8 bytes gives strcmp's order.
    id_bytes = np.char.encode(doc_ids, "utf-8")
    _, id_rank = np.unique(id_bytes, return_inverse=True)
    order = np.lexsort((-id_rank, -scores, query_index))
    query_index, doc_ids = query_index[order], doc_ids[order]
    starts = np.searchsorted(query_index, np.arange(n_queries))
    rank = np.arange(len(query_index)) - starts[query_index]
    top = rank < k_max
    query_index, doc_ids, rank = query_index[top], doc_ids[top], rank[top]

    # Grade of each retrieved document: look (query, document) up in the flattened qrels.
    judged_keys, judged_grades, positive_grades = _flatten_qrels(qrels, query_ids)
    keys = np.char.add(np.char.add(np.asarray(query_ids, dtype=str)[query_index], "\t"), doc_ids)
    pos = np.searchsorted(judged_keys, keys)
    pos = np.minimum(pos, max(len(judged_keys) - 1, 0))
    found = judged_keys[pos] == keys if len(judged_keys) else np.zeros(len(keys), dtype=bool)
    grade = np.where(found, judged_grades[pos] if len(judged_keys) else 0, 0)

    gains = np.zeros((n_queries, k_max), dtype=np.float64)
    gains[query_index, rank] = np.maximum(grade, 0)  # trec_eval: negative grades gain 0
    relevant = gains >= 1
    hits = np.cumsum(relevant, axis=1)
    num_relevant = np.array(
        [sum(g >= 1 for g in qrels[q].values()) for q in query_ids], dtype=np.float64
    )

    discount = 1.0 / np.log2(np.arange(2, k_max + 2))
    dcg = np.cumsum(gains * discount, axis=1)
    ideal = np.zeros((n_queries, k_max), dtype=np.float64)
    for i, grades in enumerate(positive_grades):
        top_grades = grades[:k_max]
        ideal[i, : len(top_grades)] = top_grades
    idcg = np.cumsum(ideal * discount, axis=1)

    ranks_1 = np.arange(1, k_max + 1, dtype=np.float64)
    ap_terms = np.cumsum(np.where(relevant, hits / ranks_1, 0.0), axis=1)
    first_hit = np.where(relevant.any(axis=1), relevant.argmax(axis=1), k_max)

    safe_rel = np.where(num_relevant > 0, num_relevant, 1.0)
    results: dict[str, np.ndarray] = {}
    for k in ks:
        c = k - 1
        results[f"ndcg_at_{k}"] = np.divide(
            dcg[:, c], idcg[:, c], out=np.zeros(n_queries), where=idcg[:, c] > 0
        )
        results[f"mrr_at_{k}"] = np.where(first_hit < k, 1.0 / (first_hit + 1), 0.0)
        results[f"recall_at_{k}"] = np.where(num_relevant > 0, hits[:, c] / safe_rel, 0.0)
        results[f"map_at_{k}"] = np.where(num_relevant > 0, ap_terms[:, c] / safe_rel, 0.0)
        results[f"precision_at_{k}"] = hits[:, c] / k
    means = {
        f"{metric}_at_{k}": float(results[f"{metric}_at_{k}"].mean())
        for metric in METRICS
        for k in ks
    }
    if per_query:
        return means, results, list(query_ids)
    return means


def _flatten_qrels(
    qrels: Qrels, query_ids: list[str]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Sorted "query<TAB>doc" keys with their grades, and each query's positive grades sorted
    descending (the ideal ranking)."""
    keys, grades, positives = [], [], []
    for q in query_ids:
        judged = qrels[q]
        keys.extend(f"{q}\t{d}" for d in judged)
        grades.extend(judged.values())
        positive = np.array([g for g in judged.values() if g > 0], dtype=np.float64)
        positives.append(np.sort(positive)[::-1])
    keys_arr = np.asarray(keys, dtype=str)
    order = np.argsort(keys_arr, kind="stable")
    return keys_arr[order], np.asarray(grades, dtype=np.float64)[order], positives
