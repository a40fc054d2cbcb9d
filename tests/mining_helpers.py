"""Shared pieces of the mining tests: an encoder of fixed vectors and a float64 reference miner."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TableEncoder:
    """Stands in for ``Encoder``: each text's vector comes from a table (per side), so scores
    are whatever the test designed."""

    def __init__(self, queries: dict[str, np.ndarray], documents: dict[str, np.ndarray]):
        self.tables = {"query": queries, "document": documents}
        self.calls: list[tuple[str, int]] = []

    def encode(self, texts: Sequence[str], side: str, **_: object) -> np.ndarray:
        self.calls.append((side, len(texts)))
        return np.stack([self.tables[side][t] for t in texts]).astype(np.float32)


def reference_ranked(
    query_vector: np.ndarray,
    doc_vectors: np.ndarray,
    doc_ids: Sequence[str],
    doc_texts: Sequence[str],
    positive_ids: set[str],
    positive_texts: set[str],
    positive_scores: Sequence[float],
    *,
    relative_margin: float | None = None,
    absolute_margin: float | None = None,
    max_score: float | None = None,
    length: int,
) -> tuple[list[str], list[float]]:
    """The ranked list by brute force in float64: every document scored, sorted, filtered."""
    scores = doc_vectors.astype(np.float64) @ query_vector.astype(np.float64)
    p = min(positive_scores)
    limits = [np.inf]
    if relative_margin is not None:
        limits.append(p * (1 - relative_margin))
    if absolute_margin is not None:
        limits.append(p - absolute_margin)
    if max_score is not None:
        limits.append(max_score)
    ids, kept_scores, seen = [], [], set()
    for j in np.argsort(-scores, kind="stable"):
        text = doc_texts[j].strip()
        if doc_ids[j] in positive_ids or text in positive_texts or text in seen:
            continue
        if scores[j] > min(limits):
            continue
        seen.add(text)
        ids.append(doc_ids[j])
        kept_scores.append(float(scores[j]))
    return ids[:length], kept_scores[:length]


def unit_with_score(axis: np.ndarray, noise: np.ndarray, score: float) -> np.ndarray:
    """A unit vector whose inner product with the unit ``axis`` is ``score`` (``noise`` must be
    a unit vector orthogonal to every query axis)."""
    return score * axis + np.sqrt(max(0.0, 1 - score**2)) * noise
