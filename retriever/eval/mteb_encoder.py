"""Evaluate an :class:`~retriever.model.encoder.Encoder` with the ``mteb`` package (optional extra).

    import mteb
    from retriever.eval.mteb_encoder import MTEBEncoder

    model = MTEBEncoder.from_pretrained("runs/my-model/final")
    mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact"]))

``MTEBEncoder`` implements mteb's encoder protocol: ``encode`` (mteb 2.x passes a DataLoader of
batches and a ``prompt_type``; mteb 1.x a list of strings), ``similarity``,
``similarity_pairwise`` and ``mteb_model_meta``. Queries get the encoder's query prefix and
max length, documents the document ones; tasks without a prompt type (STS, classification,
...) are encoded as queries. :func:`to_mteb_task` wraps a local :class:`RetrievalTask` (e.g. a
BEIR directory) as an mteb retrieval task, so local data can be scored by mteb too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from retriever.eval.data import RetrievalTask
from retriever.model import Encoder


class MTEBEncoder:
    """mteb's encoder protocol around an :class:`Encoder`."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        name: str | None = None,
        revision: str | None = None,
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
        show_progress: bool = False,
    ) -> None:
        self.encoder = encoder
        self.name = name or getattr(encoder.model.config, "_name_or_path", "") or "retriever-model"
        self.revision = revision
        self.batch_size = batch_size
        self.dtype = dtype
        self.show_progress = show_progress

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        revision: str | None = None,
        *,
        device: str | None = None,
        batch_size: int = 64,
        **encoder_kwargs: Any,
    ) -> MTEBEncoder:
        """Load with :meth:`Encoder.from_pretrained` (the signature mteb's loaders call)."""
        encoder = Encoder.from_pretrained(model_name, **encoder_kwargs)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(encoder.to(device), name=model_name, revision=revision, batch_size=batch_size)

    @property
    def mteb_model_meta(self) -> Any:
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        similarity = (
            ScoringFunction.COSINE if self.encoder.normalize else ScoringFunction.DOT_PRODUCT
        )
        return ModelMeta.create_empty(
            overwrites={
                "name": self.name,
                "revision": self.revision,
                "embed_dim": self.encoder.embedding_dim,
                "max_tokens": self.encoder.document_max_length,
                "similarity_fn_name": similarity,
                "framework": ["PyTorch"],
                "n_parameters": sum(p.numel() for p in self.encoder.parameters()),
            }
        )

    def encode(
        self,
        inputs: Any,
        *,
        prompt_type: Any = None,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """[N, D] float32 embeddings of a DataLoader of ``{"text": [...]}`` batches or a list of
        strings; ``prompt_type`` 'document' selects the document side, anything else queries."""
        texts = _texts(inputs)
        side = (
            "document" if str(getattr(prompt_type, "value", prompt_type)) == "document" else "query"
        )
        progress = self.show_progress if show_progress_bar is None else show_progress_bar
        return self.encoder.encode(
            texts,
            side,
            batch_size=batch_size or self.batch_size,
            dtype=self.dtype,
            show_progress=progress,
        )

    def similarity(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        a, b = _2d(embeddings1), _2d(embeddings2)
        if self.encoder.normalize:
            a, b = (
                torch.nn.functional.normalize(a, dim=-1),
                torch.nn.functional.normalize(b, dim=-1),
            )
        return a @ b.T

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        a, b = _2d(embeddings1), _2d(embeddings2)
        if self.encoder.normalize:
            a, b = (
                torch.nn.functional.normalize(a, dim=-1),
                torch.nn.functional.normalize(b, dim=-1),
            )
        return (a * b).sum(dim=-1)


def _2d(x: Any) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    return x.unsqueeze(0) if x.ndim == 1 else x


def _texts(inputs: Any) -> list[str]:
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs):
        return list(inputs)
    texts: list[str] = []
    for batch in inputs:  # mteb 2.x: a DataLoader of dict batches
        if not isinstance(batch, dict) or "text" not in batch:
            raise TypeError(f"expected batches with a 'text' field, got {type(batch).__name__}")
        texts.extend(batch["text"])
    return texts


def to_mteb_task(task: RetrievalTask, *, name: str | None = None) -> Any:
    """An mteb (2.x) retrieval task holding ``task``'s corpus, queries and qrels."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    task_name = name or f"Local{task.name}"
    metadata = TaskMetadata(
        name=task_name,
        description=f"Local retrieval task {task.name} loaded by retriever.",
        reference=None,
        dataset={"path": task_name, "revision": "local"},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[task.split],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation="",
    )
    split_data = {
        "corpus": Dataset.from_list(
            [{"id": i, "title": d["title"], "text": d["text"]} for i, d in task.corpus.items()]
        ),
        "queries": Dataset.from_list([{"id": i, "text": t} for i, t in task.queries.items()]),
        "relevant_docs": task.qrels,
        "top_ranked": None,
    }

    class LocalRetrievalTask(AbsTaskRetrieval):
        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = {"default": {task.split: split_data}}
            self.data_loaded = True

    LocalRetrievalTask.metadata = metadata
    return LocalRetrievalTask()
