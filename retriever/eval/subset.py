"""A smaller task for quick evaluations during training (not comparable with MTEB)."""

from __future__ import annotations

import dataclasses
from typing import Any


def shrink_task(task: Any, max_queries: int | None, max_documents: int | None) -> Any:
    """The first ``max_queries`` queries and a corpus of their judged documents plus the first
    other documents, ``max_documents`` in all (a quick smoke-test evaluation)."""
    query_ids = list(task.queries)[:max_queries] if max_queries else list(task.queries)
    qrels = {q: task.qrels[q] for q in query_ids}
    corpus = task.corpus
    if max_documents:
        keep = dict.fromkeys(d for q in query_ids for d in qrels[q])
        for doc_id in task.corpus:
            if len(keep) >= max_documents:
                break
            keep.setdefault(doc_id)
        corpus = {d: task.corpus[d] for d in keep}
    return dataclasses.replace(
        task, corpus=corpus, queries={q: task.queries[q] for q in query_ids}, qrels=qrels
    )
