"""The static miner on a synthetic corpus whose hard negatives are known by construction.

Vectors are designed, not learned: query i is the unit axis e_i; each document has a chosen
score with its own query and small random scores with the others. The reference is brute force
in float64 (every document scored and sorted in numpy), independent of FAISS and the miner.
"""

import numpy as np
import pytest
from mining_helpers import TableEncoder, reference_ranked

from retriever.eval.search import IndexConfig
from retriever.mining.miner import Corpus, MiningConfig, MiningQuery, mine, select_negatives

N_QUERIES, DIM, N_HARD, N_FILLER = 6, 32, 20, 60
POSITIVE_SCORE = 0.80


def _vector(rng, own: int, score: float) -> np.ndarray:
    """Unit vector scoring ``score`` with query ``own`` and |x| < 0.1 with the others."""
    v = np.zeros(DIM)
    v[:N_QUERIES] = rng.uniform(-0.1, 0.1, N_QUERIES)
    v[own] = score
    rest = rng.standard_normal(DIM - N_QUERIES)
    v[N_QUERIES:] = rest / np.linalg.norm(rest) * np.sqrt(1 - np.sum(v[:N_QUERIES] ** 2))
    return v


@pytest.fixture(scope="module")
def world():
    """(encoder, corpus, queries, document vectors). Per query i: a positive (0.80), a copy of
    its text under another id, a document that is a positive by id only (0.95), hard negatives
    "hard i k" scoring 0.90 - 0.02 k (k = 3 twice, under two ids), then random fillers."""
    rng = np.random.default_rng(0)
    ids, texts, vectors = [], [], {}

    def add(doc_id, text, vector):
        ids.append(doc_id)
        texts.append(text)
        vectors.setdefault(text, vector)

    for i in range(N_QUERIES):
        add(f"p{i}", f"positive {i}", _vector(rng, i, POSITIVE_SCORE))
        add(f"p{i}-copy", f"positive {i}", None)
        add(f"x{i}", f"extra positive {i}", _vector(rng, i, 0.95))
        for k in range(N_HARD):
            add(f"h{i}-{k}", f"hard {i} {k}", _vector(rng, i, 0.90 - 0.02 * k))
        add(f"h{i}-3-copy", f"hard {i} 3", None)
    for f in range(N_FILLER):
        add(f"f{f}", f"filler {f}", _vector(rng, f % N_QUERIES, rng.uniform(-0.3, 0.45)))
    queries = [
        MiningQuery(f"query {i}", (f"positive {i}",), (f"p{i}", f"x{i}"), f"q{i}", f"q{i}")
        for i in range(N_QUERIES)
    ]
    query_vectors = {f"query {i}": np.eye(DIM)[i] for i in range(N_QUERIES)}
    encoder = TableEncoder(query_vectors, vectors)
    doc_matrix = np.stack([vectors[t] for t in texts])
    return encoder, Corpus(ids, texts), queries, doc_matrix


def _mine(world, config, **kw):
    encoder, corpus, queries, _ = world
    kw.setdefault("show_progress", False)
    return list(mine(encoder, queries, corpus, config, **kw))


def _texts(corpus, positions):
    return [corpus.texts[p] for p in positions]


def test_finds_the_known_hard_negatives(world):
    _, corpus, _, _ = world
    results = _mine(world, MiningConfig(num_negatives=5, range_min=0, range_max=20))
    for i, r in enumerate(results):
        # The id-only positive (0.95) and both copies of the positive text are gone; the
        # repeated hard negative appears once.
        assert _texts(corpus, r.negatives) == [f"hard {i} {k}" for k in range(5)]
        np.testing.assert_allclose(r.negative_scores, [0.90 - 0.02 * k for k in range(5)], 1e-5)
        np.testing.assert_allclose(r.positive_scores, [POSITIVE_SCORE], atol=1e-5)
        assert _texts(corpus, r.candidates)[:N_HARD] == [f"hard {i} {k}" for k in range(N_HARD)]
        assert r.complete and r.index == i


@pytest.mark.parametrize(
    "margins, first_kept",
    [
        ({"relative_margin": 0.12}, 10),  # limit 0.80 * 0.88 = 0.704: 0.70 is the first kept
        ({"absolute_margin": 0.15}, 13),  # limit 0.65: 0.64
        ({"max_score": 0.61}, 15),  # 0.60
        ({"relative_margin": 0.05, "absolute_margin": 0.15}, 13),  # the stricter one wins
    ],
)
def test_margins_drop_likely_false_negatives(world, margins, first_kept):
    _, corpus, _, _ = world
    results = _mine(world, MiningConfig(num_negatives=3, range_min=0, range_max=12, **margins))
    for i, r in enumerate(results):
        expected = [f"hard {i} {k}" for k in range(first_kept, first_kept + 3)]
        assert _texts(corpus, r.negatives) == expected


@pytest.mark.parametrize("index", ["flat", "torch", "ivf"])
@pytest.mark.parametrize(
    "options",
    [
        {"range_min": 3, "range_max": 15},
        {"range_min": 10, "range_max": 40, "relative_margin": 0.3},
        # Everything designed is filtered: the search must go deeper than its first k.
        {"range_min": 2, "range_max": 10, "max_score": 0.3},
        {"range_min": 0, "range_max": 30, "absolute_margin": 0.5, "sampling": "random"},
    ],
)
def test_matches_brute_force_reference(world, index, options):
    encoder, corpus, queries, doc_matrix = world
    config = MiningConfig(num_negatives=4, **options)
    # IVF with every cell probed is exact; small query chunks exercise the chunked loop.
    index_config = IndexConfig(kind=index, nlist=4, nprobe=4)
    results = _mine(world, config, index=index_config, chunk_size=4)
    for i, r in enumerate(results):
        q = queries[i]
        ids, scores = reference_ranked(
            encoder.tables["query"][q.query],
            doc_matrix,
            corpus.ids,
            corpus.texts,
            set(q.positive_ids),
            set(q.positives),
            r.positive_scores,
            relative_margin=config.relative_margin,
            absolute_margin=config.absolute_margin,
            max_score=config.max_score,
            length=config.range_max,
        )
        # Texts, not ids: the two ids of one text tie, and either may be kept.
        text_of = dict(zip(corpus.ids, corpus.texts))
        assert _texts(corpus, r.candidates) == [text_of[d] for d in ids]
        np.testing.assert_allclose(r.candidate_scores, scores, atol=1e-5)
        ranks = [r.candidates.index(n) for n in r.negatives]
        assert ranks == sorted(ranks)
        assert all(config.range_min <= k < config.range_max for k in ranks)
        if config.sampling == "top":
            assert ranks == list(range(config.range_min, config.range_min + 4))
        assert len(set(r.negatives)) == len(r.negatives) == 4


def test_never_returns_a_positive(world):
    _, corpus, queries, _ = world
    for options in ({"range_min": 0, "range_max": 60}, {"range_min": 0, "range_max": 200}):
        for r in _mine(world, MiningConfig(num_negatives=7, **options)):
            q = queries[r.index]
            for position in r.candidates:
                assert corpus.ids[position] not in q.positive_ids
                assert corpus.texts[position] not in q.positives


def test_random_sampling_is_seeded_and_independent_of_chunking(world):
    config = MiningConfig(num_negatives=5, range_min=2, range_max=40, sampling="random", seed=7)
    first = _mine(world, config, chunk_size=100)
    again = _mine(world, config, chunk_size=2)
    other = _mine(world, MiningConfig(**{**vars(config), "seed": 8}))
    assert [r.negatives for r in first] == [r.negatives for r in again]
    assert [r.negatives for r in first] != [r.negatives for r in other]
    # Not simply the top of the band.
    assert any(r.candidates.index(r.negatives[-1]) > 6 for r in first)


def test_too_few_candidates_are_reported_not_padded(world):
    encoder, corpus, queries, _ = world
    # max_score 0.5 leaves each query its fillers and the other queries' documents (all below
    # 0.45), but a band starting at rank 95 of a corpus this small runs out.
    n_docs = len(corpus)
    config = MiningConfig(num_negatives=7, range_min=n_docs - 30, range_max=n_docs, max_score=0.5)
    results = list(mine(encoder, queries, corpus, config, show_progress=False))
    for r in results:
        assert not r.complete
        assert len(r.negatives) < 7
        assert len(set(r.negatives)) == len(r.negatives)  # nothing repeated to fill up
        assert all(s <= 0.5 for s in r.candidate_scores)


def test_positive_outside_the_corpus_is_encoded_for_its_score(world):
    encoder, corpus, _, _ = world
    vector = np.zeros(DIM)
    vector[0], vector[DIM - 1] = 0.61, np.sqrt(1 - 0.61**2)
    encoder.tables["document"]["an outside positive"] = vector
    query = MiningQuery("query 0", ("positive 0", "an outside positive"), (), None, "line 1")
    config = MiningConfig(num_negatives=2, range_min=0, range_max=5, relative_margin=0.0)
    (r,) = list(mine(encoder, [query], corpus, config, show_progress=False))
    assert r.positive_scores == pytest.approx([POSITIVE_SCORE, 0.61], abs=1e-6)
    # Relative margin 0 against the lowest positive score: nothing above 0.61 stays.
    assert r.negative_scores == pytest.approx([0.60, 0.58], abs=1e-5)


def test_select_negatives_band():
    top = MiningConfig(num_negatives=3, range_min=2, range_max=10)
    assert select_negatives(20, top, None) == [2, 3, 4]
    assert select_negatives(4, top, None) == [2, 3]
    assert select_negatives(2, top, None) == []
    rnd = MiningConfig(num_negatives=3, range_min=2, range_max=10, sampling="random")
    picks = select_negatives(20, rnd, np.random.default_rng(0))
    assert len(picks) == 3 and picks == sorted(picks) and all(2 <= p < 10 for p in picks)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_negatives": 0}, "num_negatives"),
        ({"range_min": -1}, "range_min"),
        ({"range_min": 95, "range_max": 100}, r"range_max \(100\) must be at least"),
        ({"relative_margin": 1.0}, "relative_margin"),
        ({"absolute_margin": -0.1}, "absolute_margin"),
        ({"sampling": "hardest"}, "sampling"),
    ],
)
def test_bad_settings(options, message):
    with pytest.raises(ValueError, match=message):
        MiningConfig(**options)


def test_bad_corpus():
    with pytest.raises(ValueError, match="duplicate corpus id 'a'"):
        Corpus(["a", "b", "a"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="empty"):
        Corpus([], [])
