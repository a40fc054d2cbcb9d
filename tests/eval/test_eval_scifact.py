"""SciFact test with all-MiniLM-L6-v2: our nDCG@10 equals sentence-transformers' evaluator.

Slow (the corpus is 5,183 long abstracts, encoded on CPU). To encode the corpus once rather than
twice, sentence-transformers' InformationRetrievalEvaluator is given our document embeddings;
everything else on its side is its own (query encoding, cosine scores, top-k, metrics), and
our document embeddings are checked against sentence-transformers' on a random sample of
documents, long ones included. Our side is the whole pipeline: loader, Encoder, FAISS, metrics.
"""

import numpy as np
import pytest
import torch
from tiny_encoder import minilm_path
from train_helpers import SHARED_DATA

from retriever.eval import evaluate_task, load_beir
from retriever.eval.search import encode_corpus
from retriever.model import Encoder

SCIFACT = SHARED_DATA / "scifact"


@pytest.mark.slow
@pytest.mark.skipif(not SCIFACT.is_dir(), reason=f"SciFact is not at {SCIFACT}")
def test_scifact_ndcg_equals_sentence_transformers_evaluator(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    path = minilm_path()
    task = load_beir(SCIFACT, "test")
    assert len(task.corpus) == 5183 and len(task.queries) == 300
    encoder = Encoder.from_pretrained(path)
    ours = evaluate_task(encoder, task, batch_size=64, cache_dir=tmp_path, show_progress=False)
    doc_ids, doc_texts = task.document_texts()
    doc_embeddings = encode_corpus(encoder, doc_texts, cache_dir=tmp_path)  # a cache hit

    st = SentenceTransformer(path, device="cpu")
    sample = np.random.default_rng(0).choice(len(doc_texts), 150, replace=False)
    reference = st.encode_document([doc_texts[i] for i in sample], batch_size=32)
    np.testing.assert_allclose(doc_embeddings[sample], reference, atol=1e-5)

    relevant = {q: {d for d, s in docs.items() if s > 0} for q, docs in task.qrels.items()}
    evaluator = InformationRetrievalEvaluator(
        task.queries,
        dict(zip(doc_ids, doc_texts, strict=True)),
        relevant,
        ndcg_at_k=[10],
        mrr_at_k=[10],
        map_at_k=[100],
        precision_recall_at_k=[1, 10, 100],
        score_functions={"cosine": cos_sim},
        write_csv=False,
    )
    compute = getattr(evaluator, "compute_all_metrics", None) or evaluator.compute_metrices
    theirs = compute(st, corpus_embeddings=torch.from_numpy(doc_embeddings))["cosine"]

    assert ours["ndcg_at_10"] == pytest.approx(theirs["ndcg@k"][10], abs=1e-4)
    assert ours["mrr_at_10"] == pytest.approx(theirs["mrr@k"][10], abs=1e-4)
    assert ours["recall_at_100"] == pytest.approx(theirs["recall@k"][100], abs=1e-4)
    assert ours["precision_at_1"] == pytest.approx(theirs["precision@k"][1], abs=1e-4)
    assert ours["ndcg_at_10"] == pytest.approx(0.645, abs=0.005)  # the MTEB leaderboard value
