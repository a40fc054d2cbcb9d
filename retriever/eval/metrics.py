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


def metric_names(k_values: Iterable[int] = DEFAULT_K_VALUES) -> list[str]:
    """The keys :func:`evaluate` reports: ``ndcg_at_10``, ``recall_at_100``, ..."""
    return [f"{metric}_at_{k}" for metric in METRICS for k in sorted(set(k_values))]


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
    doc_ids = np.array([str(d) for q in query_ids for d in run[q]], dtype=object)
    scores = np.fromiter(
        (s for q in query_ids for s in run[q].values()), dtype=np.float64, count=int(lengths.sum())
    )
    names, codes = np.unique(doc_ids, return_inverse=True)
    return _evaluate_coded(
        qrels,
        query_ids,
        query_index,
        codes,
        names,
        scores,
        k_values,
        ignore_identical_ids,
        per_query,
    )


def evaluate_ranked(
    qrels: Qrels,
    query_ids: Sequence[str],
    doc_ids: np.ndarray,
    scores: np.ndarray,
    k_values: Iterable[int] = DEFAULT_K_VALUES,
    *,
    corpus_ids: Sequence[str] | None = None,
    ignore_identical_ids: bool = False,
    per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray], list[str]]:
    """:func:`evaluate` for search output: ``scores`` is [Q, K] and row i belongs to
    ``query_ids[i]``.

    ``doc_ids`` is either a [Q, K] array of document ids (``None`` entries are skipped), or,
    with ``corpus_ids``, the [Q, K] integer positions :func:`~retriever.eval.search.search`
    returns (-1 entries are skipped); the latter avoids string work on Q*K entries.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if corpus_ids is not None:
        positions = np.asarray(doc_ids, dtype=np.int64)
        # Code = rank of the id in sorted order, so that comparing codes compares ids.
        names = np.array([str(d) for d in corpus_ids], dtype=object)
        order = np.argsort(names, kind="stable")
        if len(names) > 1 and (names[order][1:] == names[order][:-1]).any():
            raise ValueError("corpus_ids has duplicate ids")
        rank = np.empty(len(names), dtype=np.int64)
        rank[order] = np.arange(len(names))
        names = names[order]
        valid = positions >= 0
        codes = np.where(valid, rank[np.clip(positions, 0, None)], -1)
    else:
        ids = np.asarray(doc_ids, dtype=object)
        valid = np.not_equal(ids, None)
        names, inverse = np.unique(ids[valid].astype(str).astype(object), return_inverse=True)
        codes = np.full(ids.shape, -1, dtype=np.int64)
        codes[valid] = inverse
    if codes.shape != scores.shape or codes.shape[0] != len(query_ids):
        raise ValueError(
            f"doc_ids {codes.shape}, scores {scores.shape} and {len(query_ids)} query ids "
            "do not match"
        )
    keep_rows = np.array([q in qrels for q in query_ids], dtype=bool)
    kept_ids = [q for q, k in zip(query_ids, keep_rows, strict=True) if k]
    codes, scores, valid = codes[keep_rows], scores[keep_rows], valid[keep_rows]
    query_index = np.repeat(np.arange(len(kept_ids)), codes.shape[1])
    valid = valid.ravel()
    return _evaluate_coded(
        qrels,
        kept_ids,
        query_index[valid],
        codes.ravel()[valid],
        names,
        scores.ravel()[valid],
        k_values,
        ignore_identical_ids,
        per_query,
    )


def _lookup(names: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    """Code of each id in the sorted ``names`` array, -1 when absent."""
    if len(names) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    wanted = np.array(list(ids), dtype=object)
    pos = np.clip(np.searchsorted(names, wanted), 0, len(names) - 1)
    return np.where(names[pos] == wanted, pos, -1) if len(wanted) else pos.astype(np.int64)


def _evaluate_coded(
    qrels: Qrels,
    query_ids: list[str],
    query_index: np.ndarray,
    codes: np.ndarray,
    names: np.ndarray,
    scores: np.ndarray,
    k_values: Iterable[int],
    ignore_identical_ids: bool,
    per_query: bool,
):
    """The metrics of a run given as flat arrays: each retrieved (query, document) pair has a
    query index, a document code (its rank in the sorted array ``names`` of ids) and a score."""
    ks = sorted({int(k) for k in k_values})
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be positive integers, got {list(k_values)}")
    if not query_ids:
        raise ValueError("no query of the run has qrels")
    n_queries, k_max = len(query_ids), ks[-1]

    if ignore_identical_ids:
        own = codes == _lookup(names, [str(q) for q in query_ids])[query_index]
        query_index, codes, scores = query_index[~own], codes[~own], scores[~own]
    query_index, codes, rank = _rank_top(query_index, codes, scores, n_queries, k_max)
    grade = _retrieved_grades(qrels, query_ids, names, query_index, codes)
    gains = np.zeros((n_queries, k_max), dtype=np.float64)
    gains[query_index, rank] = np.maximum(grade, 0)  # trec_eval: negative grades gain 0

    results = _per_query_metrics(qrels, query_ids, gains, ks)
    means = {
        f"{metric}_at_{k}": float(results[f"{metric}_at_{k}"].mean())
        for metric in METRICS
        for k in ks
    }
    if per_query:
        return means, results, list(query_ids)
    return means


def _rank_top(
    query_index: np.ndarray, codes: np.ndarray, scores: np.ndarray, n_queries: int, k_max: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs ranked within the first ``k_max`` of their query: (query index, code, rank)."""
    # Rank as trec_eval: by query, score descending, then document id descending (Python's
    # string order is strcmp's order on UTF-8 bytes, and codes follow it).
    order = np.lexsort((-codes, -scores, query_index))
    query_index, codes = query_index[order], codes[order]
    starts = np.searchsorted(query_index, np.arange(n_queries))
    rank = np.arange(len(query_index)) - starts[query_index]
    top = rank < k_max
    return query_index[top], codes[top], rank[top]


def _retrieved_grades(
    qrels: Qrels,
    query_ids: list[str],
    names: np.ndarray,
    query_index: np.ndarray,
    codes: np.ndarray,
) -> np.ndarray:
    """Grade of each retrieved (query, code) pair, 0 when unjudged."""
    # A pair is keyed query * n_codes + code, so that one sorted search finds its judgement.
    n_codes = max(len(names), 1)
    judged_q, judged_doc, judged_grade = [], [], []
    for i, q in enumerate(query_ids):
        judged = qrels[q]
        judged_q.extend([i] * len(judged))
        judged_doc.extend(str(d) for d in judged)
        judged_grade.extend(judged.values())
    judged_code = _lookup(names, judged_doc)
    known = judged_code >= 0  # a judged document never retrieved needs no lookup
    judged_keys = np.asarray(judged_q, dtype=np.int64)[known] * n_codes + judged_code[known]
    key_order = np.argsort(judged_keys)
    judged_keys = judged_keys[key_order]
    judged_grade = np.asarray(judged_grade, dtype=np.float64)[known][key_order]
    keys = query_index * n_codes + codes
    if not len(judged_keys):
        return np.zeros(len(keys))
    pos = np.clip(np.searchsorted(judged_keys, keys), 0, len(judged_keys) - 1)
    return np.where(judged_keys[pos] == keys, judged_grade[pos], 0.0)


def _per_query_metrics(
    qrels: Qrels, query_ids: list[str], gains: np.ndarray, ks: list[int]
) -> dict[str, np.ndarray]:
    """Every metric at every k, one value per query, from the [Q, max(ks)] gains of the ranking."""
    relevant = gains >= 1
    hits = np.cumsum(relevant, axis=1)
    num_relevant = np.array(
        [sum(g >= 1 for g in qrels[q].values()) for q in query_ids], dtype=np.float64
    )
    by_metric = {
        "ndcg": _ndcg_at(gains, _ideal_gains(qrels, query_ids, gains.shape[1]), ks),
        "mrr": _mrr_at(relevant, ks),
        "recall": _recall_at(hits, num_relevant, ks),
        "map": _map_at(relevant, hits, num_relevant, ks),
        "precision": _precision_at(hits, ks),
    }
    return {f"{metric}_at_{k}": by_metric[metric][k] for k in ks for metric in METRICS}


def _ideal_gains(qrels: Qrels, query_ids: list[str], k_max: int) -> np.ndarray:
    """[Q, k_max] gains of the ideal ranking: each query's positive grades, descending."""
    ideal = np.zeros((len(query_ids), k_max), dtype=np.float64)
    for i, q in enumerate(query_ids):
        positive = np.array([g for g in qrels[q].values() if g > 0], dtype=np.float64)
        top_grades = np.sort(positive)[::-1][:k_max]
        ideal[i, : len(top_grades)] = top_grades
    return ideal


def _ndcg_at(gains: np.ndarray, ideal: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    discount = 1.0 / np.log2(np.arange(2, gains.shape[1] + 2))
    dcg = np.cumsum(gains * discount, axis=1)
    idcg = np.cumsum(ideal * discount, axis=1)
    # 0 where the query has no positive grade (idcg 0), as trec_eval.
    return {
        k: np.divide(
            dcg[:, k - 1], idcg[:, k - 1], out=np.zeros(len(gains)), where=idcg[:, k - 1] > 0
        )
        for k in ks
    }


def _mrr_at(relevant: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    k_max = relevant.shape[1]
    first_hit = np.where(relevant.any(axis=1), relevant.argmax(axis=1), k_max)
    return {k: np.where(first_hit < k, 1.0 / (first_hit + 1), 0.0) for k in ks}


def _recall_at(hits: np.ndarray, num_relevant: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    safe_rel = np.where(num_relevant > 0, num_relevant, 1.0)
    return {k: np.where(num_relevant > 0, hits[:, k - 1] / safe_rel, 0.0) for k in ks}


def _map_at(
    relevant: np.ndarray, hits: np.ndarray, num_relevant: np.ndarray, ks: list[int]
) -> dict[int, np.ndarray]:
    ranks_1 = np.arange(1, relevant.shape[1] + 1, dtype=np.float64)
    ap_terms = np.cumsum(np.where(relevant, hits / ranks_1, 0.0), axis=1)
    safe_rel = np.where(num_relevant > 0, num_relevant, 1.0)
    return {k: np.where(num_relevant > 0, ap_terms[:, k - 1] / safe_rel, 0.0) for k in ks}


def _precision_at(hits: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    # trec_eval's P.k divides by k even when fewer than k documents were retrieved.
    return {k: hits[:, k - 1] / k for k in ks}
