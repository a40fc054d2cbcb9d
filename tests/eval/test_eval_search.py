"""FAISS / torch search against brute-force numpy, and the corpus-embedding cache."""

import dataclasses

import numpy as np
import pytest
import torch
from tiny_encoder import save_tiny_bert

from retriever.eval.search import (
    IndexConfig,
    SearchIndex,
    corpus_cache_path,
    encode_corpus,
    search,
)
from retriever.model import Encoder


def _brute_force(queries, docs, k):
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(2000, 24)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = rng.normal(size=(130, 24)).astype(np.float32)
    return queries, docs


@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_exact_search_equals_brute_force(vectors, kind):
    queries, docs = vectors
    # A query chunk smaller than the query count exercises the chunked loop.
    index = SearchIndex(docs, IndexConfig(kind=kind, query_chunk_size=50))
    scores, ids = index.search(queries, 10)
    expected_scores, expected_ids = _brute_force(queries, docs, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64


def test_ivf_with_every_cell_probed_is_exact(vectors):
    queries, docs = vectors
    index = SearchIndex(docs, IndexConfig(kind="ivf", nlist=16, nprobe=16))
    _, ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, _brute_force(queries, docs, 10)[1])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_have_high_recall(vectors, kind):
    queries, docs = vectors
    index = SearchIndex(docs, IndexConfig(kind=kind, nlist=16, nprobe=8, ef_search=128))
    _, ids = index.search(queries, 10)
    _, exact = _brute_force(queries, docs, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])
    assert recall > 0.8, recall  # a broken index (wrong metric, no add) scores ~0.005


def test_top_k_larger_than_corpus_and_bad_shapes(vectors):
    queries, docs = vectors
    scores, ids = SearchIndex(docs[:5]).search(queries[:3], 100)
    assert ids.shape == (3, 5) and sorted(ids[0]) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"\[Q, 24\]"):
        SearchIndex(docs).search(queries[:, :10], 5)
    with pytest.raises(ValueError, match="index kind"):
        IndexConfig(kind="annoy")
    with pytest.raises(ValueError, match="N>0"):
        SearchIndex(np.zeros((0, 4), dtype=np.float32))


def test_set_search_params_changes_the_faiss_knobs_without_a_rebuild(vectors):
    queries, docs = vectors
    config = IndexConfig(kind="ivf", nlist=16, nprobe=2)
    ivf = SearchIndex(docs, config)
    built = ivf._faiss
    ivf.set_search_params(nprobe=16)
    assert ivf._faiss is built and built.nprobe == 16 and ivf.config.nprobe == 16
    assert config.nprobe == 2  # the caller's config is not changed
    np.testing.assert_array_equal(ivf.search(queries, 10)[1], _brute_force(queries, docs, 10)[1])
    ivf.set_search_params(nprobe=1000)  # at most nlist, as when the index is built
    assert built.nprobe == 16
    ivf.set_search_params()  # nothing given: nothing changes
    assert built.nprobe == 16

    hnsw = SearchIndex(docs, IndexConfig(kind="hnsw", ef_search=16))
    hnsw.set_search_params(ef_search=99)
    assert hnsw._faiss.hnsw.efSearch == 99 and hnsw.config.ef_search == 99

    with pytest.raises(ValueError, match="nprobe applies to 'ivf' indexes only"):
        hnsw.set_search_params(nprobe=4)
    with pytest.raises(ValueError, match="ef_search applies to 'hnsw' indexes only"):
        SearchIndex(docs, IndexConfig(kind="torch")).set_search_params(ef_search=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="nprobe must be an integer >= 1"):
            ivf.set_search_params(nprobe=bad)
    assert built.nprobe == 16


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return Encoder.from_pretrained(str(save_tiny_bert(tmp_path_factory.mktemp("tiny"))))


DOCS = [f"document number {i} about {'cats' if i % 2 else 'dogs'} and {i * 7}" for i in range(40)]
QUERIES = ["cats", "dogs and 14", "number 3"]


def test_search_encodes_and_ranks_like_brute_force(encoder):
    scores, ids = search(encoder, QUERIES, DOCS, top_k=7, show_progress=False)
    q = encoder.encode(QUERIES, "query", show_progress=False)
    d = encoder.encode(DOCS, "document", show_progress=False)
    expected_scores, expected_ids = _brute_force(q, d, 7)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_corpus_cache_hits_and_is_keyed_by_model_and_corpus(encoder, tmp_path):
    first = encode_corpus(encoder, DOCS, cache_dir=tmp_path, show_progress=False)
    path = corpus_cache_path(encoder, DOCS, tmp_path)
    assert path.is_file() and path.with_suffix(".json").is_file()
    # A hit returns the stored array: prove it by planting a marker in the file.
    np.save(path, np.full_like(first, 7.0))
    assert (encode_corpus(encoder, DOCS, cache_dir=tmp_path, show_progress=False) == 7.0).all()

    # Another corpus, other settings or other weights are other keys: never a stale hit.
    assert corpus_cache_path(encoder, DOCS[:-1] + ["changed"], tmp_path) != path
    encoder.settings = dataclasses.replace(encoder.settings, document_prefix="passage: ")
    assert corpus_cache_path(encoder, DOCS, tmp_path) != path
    encoder.settings = dataclasses.replace(encoder.settings, document_prefix="")
    with torch.no_grad():
        encoder.model.embeddings.word_embeddings.weight[5, 0] += 1e-3
    try:
        assert corpus_cache_path(encoder, DOCS, tmp_path) != path
    finally:
        with torch.no_grad():
            encoder.model.embeddings.word_embeddings.weight[5, 0] -= 1e-3
    assert corpus_cache_path(encoder, DOCS, tmp_path) == path

    # A file of the wrong shape under the key is re-encoded, not trusted.
    np.save(path, np.zeros((3, 32), dtype=np.float32))
    again = encode_corpus(encoder, DOCS, cache_dir=tmp_path, show_progress=False)
    np.testing.assert_allclose(again, first, atol=1e-6)
