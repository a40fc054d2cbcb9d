"""Retrieval evaluation (MTEB/BEIR style): load a task, encode, search with FAISS, score.

    from retriever.eval import evaluate_task, load_beir
    from retriever.model import Encoder

    result = evaluate_task(Encoder.from_pretrained(path), load_beir("scifact", "test"))

Modules: ``data`` (loaders), ``search`` (encode + index + search, shared with mining),
``metrics`` (pytrec_eval-identical metrics), ``evaluator`` (a task end to end), ``cli``
(``retriever eval``), ``mteb_encoder`` (the ``mteb`` package's encoder protocol).
"""

from retriever.eval.data import RetrievalTask, load_beir, load_hub, load_task
from retriever.eval.evaluator import evaluate_task
from retriever.eval.metrics import evaluate, evaluate_ranked
from retriever.eval.search import IndexConfig, SearchIndex, encode_corpus, search

__all__ = [
    "IndexConfig",
    "RetrievalTask",
    "SearchIndex",
    "encode_corpus",
    "evaluate",
    "evaluate_ranked",
    "evaluate_task",
    "load_beir",
    "load_hub",
    "load_task",
    "search",
]
