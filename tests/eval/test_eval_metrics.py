"""Metrics against pytrec_eval (trec_eval) on random runs with graded qrels."""

import numpy as np
import pytest

from retriever.eval.metrics import evaluate, evaluate_ranked

pytrec_eval = pytest.importorskip("pytrec_eval", reason="needs pytrec-eval-terrier")

KS = (1, 3, 5, 10, 100, 1000)
TREC = {"ndcg": "ndcg_cut", "recall": "recall", "precision": "P", "map": "map_cut"}


def _random_task(seed, n_queries=40, n_docs=1500, tie_scores=False, negative_grades=False):
    rng = np.random.default_rng(seed)
    doc_ids = [f"d{i}" for i in rng.permutation(n_docs)]  # ids not in score order
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        n_judged = int(rng.integers(0, 30))
        judged = rng.choice(n_docs, size=n_judged, replace=False)
        low = -1 if negative_grades else 0
        qrels[qid] = {doc_ids[j]: int(rng.integers(low, 4)) for j in judged}
        n_ret = int(rng.integers(0, min(1200, n_docs)))
        retrieved = rng.choice(n_docs, size=n_ret, replace=False)
        # Bias judged documents upward so that the top ranks hold relevant ones.
        scores = rng.normal(size=n_ret) + np.isin(retrieved, judged) * rng.uniform(0, 3)
        if tie_scores:
            scores = np.round(scores, 0)
        run[qid] = {doc_ids[j]: float(s) for j, s in zip(retrieved, scores, strict=True)}
        if not qrels[qid]:
            del qrels[qid]
    # A query in the run with no qrels is ignored by both sides.
    run["unjudged"] = {doc_ids[0]: 1.0}
    return qrels, run


def _pytrec(qrels, run, ks=KS):
    cut = ",".join(map(str, ks))
    measures = {f"{m}.{cut}" for m in TREC.values()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    expected = {}
    for metric, trec in TREC.items():
        for k in ks:
            expected[f"{metric}_at_{k}"] = np.mean([r[f"{trec}_{k}"] for r in per_query.values()])
    # MRR@k: recip_rank of each run cut to its top k under trec_eval's order.
    for k in ks:
        cut_run = {}
        for q, docs in run.items():
            ranked = sorted(docs.items(), key=lambda x: (x[1], x[0].encode()), reverse=True)
            cut_run[q] = dict(ranked[:k])
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut_run)
        expected[f"mrr_at_{k}"] = np.mean([r["recip_rank"] for q, r in rr.items() if q in run])
    return expected


@pytest.mark.parametrize(
    "seed,ties,negative", [(0, False, False), (1, True, False), (2, True, True)]
)
def test_metrics_equal_pytrec_eval(seed, ties, negative):
    qrels, run = _random_task(seed, tie_scores=ties, negative_grades=negative)
    got = evaluate(qrels, run, KS)
    expected = _pytrec(qrels, run)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key


def test_ties_are_broken_by_document_id_descending():
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 1.0, "b": 1.0}}  # trec_eval ranks b first
    assert evaluate(qrels, run, [1])["precision_at_1"] == 0.0
    assert _pytrec(qrels, run, [1])["precision_at_1"] == 0.0


def test_ignore_identical_ids_equals_pytrec_eval_on_filtered_run():
    qrels, run = _random_task(3, n_queries=20, n_docs=300)
    for q in list(run)[:15]:  # put each query's own id near the top of its results
        run[q][q] = 10.0
        qrels.setdefault(q, {})[q] = 2  # judged relevant: keeping it would inflate scores
    filtered = {q: {d: s for d, s in docs.items() if d != q} for q, docs in run.items()}
    got = evaluate(qrels, run, KS, ignore_identical_ids=True)
    expected = _pytrec(qrels, filtered)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    assert evaluate(qrels, run, KS)["ndcg_at_10"] != pytest.approx(expected["ndcg_at_10"])


def test_evaluate_ranked_equals_dict_run():
    rng = np.random.default_rng(4)
    corpus_ids = np.array([f"doc{i}" for i in range(50)], dtype=object)
    query_ids = [f"q{i}" for i in range(8)]
    scores = np.sort(rng.normal(size=(8, 20)), axis=1)[:, ::-1]
    idx = np.stack([rng.choice(50, 20, replace=False) for _ in range(8)])
    doc_ids = corpus_ids[idx]
    doc_ids[0, 15:] = None  # a short result list
    qrels = {
        q: {corpus_ids[j]: int(rng.integers(1, 3)) for j in idx[i, :6:2]}
        for i, q in enumerate(query_ids)
    }
    run = {
        q: {d: float(s) for d, s in zip(doc_ids[i], scores[i], strict=True) if d is not None}
        for i, q in enumerate(query_ids)
    }
    ks = (1, 5, 10, 30)
    assert evaluate_ranked(qrels, query_ids, doc_ids, scores, ks) == pytest.approx(
        _pytrec(qrels, run, ks), abs=1e-9
    )


def test_bad_k_values():
    with pytest.raises(ValueError, match="k values"):
        evaluate({"q": {"a": 1}}, {"q": {"a": 1.0}}, [0, 10])


def test_evaluate_ranked_from_positions_equals_ids():
    rng = np.random.default_rng(5)
    corpus_ids = [f"doc{i}" for i in rng.permutation(300)]
    query_ids = [f"q{i}" for i in range(12)] + ["doc7"]  # one query shares a document's id
    positions = np.stack([rng.choice(300, 50, replace=False) for _ in query_ids])
    positions[0, 40:] = -1  # what an approximate index returns when it finds too few
    scores = np.round(rng.normal(size=positions.shape), 1)  # ties
    qrels = {
        q: {corpus_ids[j]: int(rng.integers(0, 3)) for j in positions[i, :30:3]}
        for i, q in enumerate(query_ids)
    }
    qrels["doc7"]["doc7"] = 2
    ids = np.where(positions >= 0, np.asarray(corpus_ids, dtype=object)[positions], None)
    run = {
        q: {d: float(s) for d, s in zip(ids[i], scores[i], strict=True) if d is not None}
        for i, q in enumerate(query_ids)
    }
    for ignore in (False, True):
        expected = evaluate(qrels, run, (1, 5, 20, 50), ignore_identical_ids=ignore)
        got = evaluate_ranked(
            qrels,
            query_ids,
            positions,
            scores,
            (1, 5, 20, 50),
            corpus_ids=corpus_ids,
            ignore_identical_ids=ignore,
        )
        assert got == pytest.approx(expected, abs=1e-12)
