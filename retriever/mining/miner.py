"""Static hard-negative mining: rank the corpus for each training query, drop the positives and
likely false negatives, and pick negatives from a band of ranks (design notes section 5).

    corpus = Corpus.from_texts(ids, texts)
    for example in mine(encoder, queries, corpus, MiningConfig(num_negatives=7)):
        example.negatives, example.negative_scores, example.candidates

For each query, the *ranked list* is the corpus in order of score with these removed:

* the query's positives, by corpus id and by identical (stripped) text;
* repeated texts (only the best-scoring copy stays);
* likely false negatives: with ``p`` the query's lowest positive score, candidates scoring above
  ``p * (1 - relative_margin)``, above ``p - absolute_margin`` or above ``max_score``.

Rank 0 is the best candidate left. Negatives are ``num_negatives`` candidates of ranks
``range_min .. range_max - 1``: the first ones (``sampling="top"``) or a seeded random sample
kept in rank order (``"random"``; the generator is seeded by (seed, query index), so the result
does not depend on chunking or batching). The list up to ``range_max`` is returned as
``candidates``: dynamic mining takes its replacements from it. Queries with fewer than
``num_negatives`` candidates in the band get fewer negatives (``complete`` is False); nothing is
padded.

Encoding and search are :mod:`retriever.eval.search`'s (FAISS or torch, exact or approximate,
the corpus-embedding cache). :class:`HardNegativeMiner` works on embeddings, so benchmarks and
tests can feed it vectors directly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retriever.eval.search import IndexConfig, SearchIndex, encode_corpus

SAMPLING = ("top", "random")
# How deep a short query's search may go (results per query) before it is reported short.
_MAX_SEARCH_DEPTH = 16384


@dataclass
class MiningConfig:
    """Which candidates become negatives; see the module docstring."""

    num_negatives: int = 7
    range_min: int = 10
    range_max: int = 100
    relative_margin: float | None = None
    absolute_margin: float | None = None
    max_score: float | None = None
    sampling: str = "top"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.range_min < 0:
            raise ValueError(f"range_min must be >= 0, got {self.range_min}")
        if self.range_max < self.range_min + self.num_negatives:
            raise ValueError(
                f"range_max ({self.range_max}) must be at least range_min + num_negatives "
                f"({self.range_min} + {self.num_negatives})"
            )
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"relative_margin must lie in [0, 1), got {self.relative_margin}")
        if self.absolute_margin is not None and self.absolute_margin < 0:
            raise ValueError(f"absolute_margin must be >= 0, got {self.absolute_margin}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")

    def score_limit(self, positive_score: float) -> float:
        """The highest score a candidate of a query with this (lowest) positive score may have."""
        limit = math.inf
        if self.relative_margin is not None:
            limit = min(limit, positive_score * (1 - self.relative_margin))
        if self.absolute_margin is not None:
            limit = min(limit, positive_score - self.absolute_margin)
        if self.max_score is not None:
            limit = min(limit, self.max_score)
        return limit


@dataclass
class Corpus:
    """Documents to mine from: ids and texts (stripped), with look-ups by id and by text."""

    ids: list[str]
    texts: list[str]
    position_of_id: dict[str, int] = field(init=False, repr=False)
    position_of_text: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.texts):
            raise ValueError(f"{len(self.ids)} ids but {len(self.texts)} texts")
        if not self.ids:
            raise ValueError("the corpus is empty")
        self.texts = [t.strip() for t in self.texts]
        self.position_of_id = {}
        for i, doc_id in enumerate(self.ids):
            if self.position_of_id.setdefault(doc_id, i) != i:
                raise ValueError(f"duplicate corpus id {doc_id!r}")
        self.position_of_text = {}
        for i, text in enumerate(self.texts):
            self.position_of_text.setdefault(text, i)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class MiningQuery:
    """A training query: its text, positive texts and (where known) the positives' corpus ids."""

    query: str
    positives: tuple[str, ...]
    positive_ids: tuple[str, ...] = ()
    query_id: str | None = None
    source: str = ""  # "file:line" or "dir query-id", for messages


@dataclass
class MinedExample:
    """One query's result. Positions index the corpus; scores are inner products."""

    index: int  # the query's position in the input
    query: MiningQuery
    positive_scores: list[float]
    negatives: list[int]
    negative_scores: list[float]
    candidates: list[int]  # the ranked list, ranks 0 .. range_max - 1 (fewer if exhausted)
    candidate_scores: list[float]
    complete: bool  # False: fewer than num_negatives candidates in the rank band


def rank_candidates(
    positions: np.ndarray,
    scores: np.ndarray,
    corpus: Corpus,
    excluded_positions: set[int],
    excluded_texts: set[str],
    score_limit: float,
    length: int,
) -> tuple[list[int], list[float]]:
    """One query's ranked list from its search results (best first): at most ``length``
    candidates, without excluded positions, excluded or repeated texts, -1 positions
    (approximate indexes) and scores above ``score_limit``."""
    kept: list[int] = []
    kept_scores: list[float] = []
    seen: set[str] = set()
    for position, score in zip(positions.tolist(), scores.tolist()):
        if position < 0 or position in excluded_positions or score > score_limit:
            continue
        text = corpus.texts[position]
        if text in excluded_texts or text in seen:
            continue
        seen.add(text)
        kept.append(position)
        kept_scores.append(score)
        if len(kept) == length:
            break
    return kept, kept_scores


def select_negatives(
    num_candidates: int, config: MiningConfig, rng: np.random.Generator | None
) -> list[int]:
    """Ranks of the negatives among ``num_candidates`` ranked candidates (ascending)."""
    band = range(config.range_min, min(config.range_max, num_candidates))
    if len(band) <= config.num_negatives:
        return list(band)
    if config.sampling == "top":
        return list(band[: config.num_negatives])
    assert rng is not None
    picked = rng.choice(len(band), size=config.num_negatives, replace=False)
    return [band[i] for i in sorted(picked.tolist())]


class HardNegativeMiner:
    """Mines from corpus embeddings [N, D] (searched through :class:`SearchIndex`)."""

    def __init__(
        self,
        corpus: Corpus,
        corpus_embeddings: np.ndarray,
        config: MiningConfig,
        index: IndexConfig | None = None,
    ) -> None:
        if corpus_embeddings.shape[0] != len(corpus):
            raise ValueError(
                f"{corpus_embeddings.shape[0]} corpus embeddings for {len(corpus)} documents"
            )
        self.corpus = corpus
        self.embeddings = corpus_embeddings
        self.config = config
        self.index = SearchIndex(corpus_embeddings, index or IndexConfig())

    def positive_positions(self, query: MiningQuery) -> set[int]:
        """Corpus positions of the query's positives: by id, and by identical text."""
        ids = self.corpus.position_of_id
        found = {ids[i] for i in query.positive_ids if i in ids}
        texts = self.corpus.position_of_text
        found.update(texts[t.strip()] for t in query.positives if t.strip() in texts)
        return found

    def positive_scores(
        self,
        query: MiningQuery,
        query_embedding: np.ndarray,
        outside: dict[str, np.ndarray],
    ) -> list[float]:
        """Scores of each positive text: corpus embeddings where the text is in the corpus,
        else ``outside[text]``."""
        scores = []
        for text in query.positives:
            position = self.corpus.position_of_text.get(text.strip())
            vector = self.embeddings[position] if position is not None else outside[text.strip()]
            scores.append(float(np.dot(query_embedding.astype(np.float64), vector)))
        return scores

    def mine_chunk(
        self,
        queries: Sequence[MiningQuery],
        query_embeddings: np.ndarray,
        *,
        first_index: int = 0,
        outside_positives: dict[str, np.ndarray] | None = None,
    ) -> list[MinedExample]:
        """Mine for a chunk of queries; ``first_index`` is the first one's position in the
        whole input (it seeds random sampling)."""
        config = self.config
        outside = outside_positives or {}
        limits, excluded, positive_scores = [], [], []
        for query, vector in zip(queries, query_embeddings):
            scores = self.positive_scores(query, vector, outside)
            positive_scores.append(scores)
            limits.append(config.score_limit(min(scores)))
            excluded.append(self.positive_positions(query))
        ranked = self._ranked_lists(queries, query_embeddings, excluded, limits)
        out = []
        for i, (query, (candidates, candidate_scores)) in enumerate(zip(queries, ranked)):
            rng = None
            if config.sampling == "random":
                rng = np.random.default_rng([config.seed, first_index + i])
            ranks = select_negatives(len(candidates), config, rng)
            out.append(
                MinedExample(
                    index=first_index + i,
                    query=query,
                    positive_scores=positive_scores[i],
                    negatives=[candidates[r] for r in ranks],
                    negative_scores=[candidate_scores[r] for r in ranks],
                    candidates=candidates,
                    candidate_scores=candidate_scores,
                    complete=len(ranks) == config.num_negatives,
                )
            )
        return out

    def _ranked_lists(
        self,
        queries: Sequence[MiningQuery],
        query_embeddings: np.ndarray,
        excluded: list[set[int]],
        limits: list[float],
    ) -> list[tuple[list[int], list[float]]]:
        """Each query's ranked list (see :func:`rank_candidates`), without the corpus positions
        ``excluded[i]`` and scores above ``limits[i]``."""
        config, n_docs = self.config, len(self.corpus)
        # Positives, repeated texts and margins use up search results: ask for a little more
        # than the list, and search again deeper (doubling, up to the whole corpus or 16k
        # results) for the queries that came up short.
        most_positives = max(len(e) for e in excluded)
        k = min(n_docs, config.range_max + most_positives + 8)
        max_k = min(n_docs, max(8 * k, _MAX_SEARCH_DEPTH))
        ranked: list[tuple[list[int], list[float]] | None] = [None] * len(queries)
        todo = np.arange(len(queries))
        while len(todo):
            scores, positions = self.index.search(query_embeddings[todo], k)
            short = []
            for row, i in enumerate(todo.tolist()):
                ranked[i] = rank_candidates(
                    positions[row],
                    scores[row],
                    self.corpus,
                    excluded[i],
                    {t.strip() for t in queries[i].positives},
                    limits[i],
                    config.range_max,
                )
                if len(ranked[i][0]) < config.range_max:
                    short.append(i)
            if k >= max_k:
                break
            todo, k = np.asarray(short, dtype=np.int64), min(max_k, 2 * k)
        return ranked  # type: ignore[return-value]


def mine(
    encoder: Any,
    queries: Sequence[MiningQuery],
    corpus: Corpus,
    config: MiningConfig,
    *,
    index: IndexConfig | None = None,
    batch_size: int = 64,
    chunk_size: int = 4096,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> Iterator[MinedExample]:
    """Encode the corpus once (cached when ``cache_dir`` is given), then encode and mine the
    queries ``chunk_size`` at a time, yielding results in input order as they are ready.

    ``encoder`` is a :class:`retriever.model.encoder.Encoder` (anything with its ``encode``).
    """
    if not queries:
        return
    embeddings = encode_corpus(
        encoder,
        corpus.texts,
        batch_size=batch_size,
        cache_dir=cache_dir,
        dtype=dtype,
        show_progress=show_progress,
    )
    miner = HardNegativeMiner(corpus, embeddings, config, index)
    encode = dict(batch_size=batch_size, dtype=dtype, show_progress=False)
    progress = tqdm(total=len(queries), desc="mine", unit="query", disable=not show_progress)
    try:
        for start in range(0, len(queries), chunk_size):
            chunk = queries[start : start + chunk_size]
            query_embeddings = encoder.encode([q.query for q in chunk], "query", **encode)
            outside = sorted(
                {
                    p.strip()
                    for q in chunk
                    for p in q.positives
                    if p.strip() not in corpus.position_of_text
                }
            )
            outside_embeddings = {}
            if outside:
                vectors = encoder.encode(outside, "document", **encode)
                outside_embeddings = dict(zip(outside, vectors))
            yield from miner.mine_chunk(
                chunk,
                np.asarray(query_embeddings, dtype=np.float32),
                first_index=start,
                outside_positives=outside_embeddings,
            )
            progress.update(len(chunk))
    finally:
        progress.close()


__all__ = [
    "SAMPLING",
    "Corpus",
    "HardNegativeMiner",
    "MinedExample",
    "MiningConfig",
    "MiningQuery",
    "mine",
    "rank_candidates",
    "select_negatives",
]
