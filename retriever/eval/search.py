"""Encode a corpus, index it, search it: the one module that evaluation and mining share.

    scores, indices = search(encoder, queries, documents, top_k=100)

``indices[i, j]`` is the position in ``documents`` of query i's j-th best match (scores are
inner products; with a normalising encoder, cosine similarities), best first.

Indexes (``kind``):

* ``flat``: exact inner product (faiss ``IndexFlatIP``); on a GPU when the installed faiss has
  GPU support;
* ``hnsw``: faiss ``IndexHNSWFlat`` (approximate; ``hnsw_m``, ``ef_construction``,
  ``ef_search``), always on CPU;
* ``ivf``: faiss ``IndexIVFFlat`` (approximate; ``nlist`` cells, ``nprobe`` searched); GPU as
  ``flat``;
* ``torch``: exact, a chunked matrix product and top-k in PyTorch on any device: the exact GPU
  search when faiss has no GPU support.

The search-time knobs of a built index (``nprobe``, ``ef_search``) change through
:meth:`SearchIndex.set_search_params`, without a rebuild.

Corpus embeddings can be cached on disk (``cache_dir``). The key hashes the model's weights and
tokenizer, the encoder's settings, the encoding dtype and device type, and every document text,
so a changed model or corpus is a different file and never a stale hit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retriever.model import Encoder
from retriever.model.fingerprint import encoder_fingerprint

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw", "ivf", "torch")
_CACHE_VERSION = "retriever-corpus-embeddings-v1"


@dataclass
class IndexConfig:
    """How to index the corpus; see the module docstring for the kinds."""

    kind: str = "flat"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 256
    nlist: int | None = None  # IVF cells; default 4 * sqrt(N), at most N / 39
    nprobe: int = 32
    train_size: int | None = None  # IVF training sample; default min(N, 256 * nlist)
    use_gpu: bool | None = None  # None: use a GPU when faiss (or torch, for kind="torch") has one
    query_chunk_size: int = 4096  # queries searched per call

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        # faiss aborts the whole process (not an exception) on some of these, e.g. hnsw_m = 0.
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "query_chunk_size"):
            _require_positive(name, getattr(self, name), minimum=2 if name == "hnsw_m" else 1)
        for name in ("nlist", "train_size"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))

    def check_corpus_size(self, n_documents: int) -> None:
        """Raise before any encoding if this index cannot be built over ``n_documents``."""
        if self.kind == "ivf" and self.nlist is not None and self.nlist > n_documents:
            raise ValueError(
                f"nlist={self.nlist}: an IVF index cannot have more cells than the corpus has "
                f"documents ({n_documents})"
            )


def _require_positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def faiss_has_gpu() -> bool:
    """Whether the installed faiss was built with GPU support and sees a GPU."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class SearchIndex:
    """An inner-product index over [N, D] float32 embeddings (faiss, or torch for ``torch``)."""

    def __init__(self, embeddings: np.ndarray | torch.Tensor, config: IndexConfig | None = None):
        self.config = config = config or IndexConfig()
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"expected [N>0, D] embeddings, got shape {tuple(embeddings.shape)}")
        self.size, self.dim = int(embeddings.shape[0]), int(embeddings.shape[1])
        self.device = "cpu"
        if config.kind == "torch":
            use_gpu = torch.cuda.is_available() if config.use_gpu is None else config.use_gpu
            self.device = "cuda" if use_gpu else "cpu"
            self._matrix = torch.as_tensor(embeddings, dtype=torch.float32).to(self.device)
            self._faiss = None
        else:
            self._matrix = None
            self._faiss = self._build_faiss(_as_float32(embeddings))

    def _build_faiss(self, x: np.ndarray) -> Any:
        import faiss

        config, n, d = self.config, self.size, self.dim
        if config.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif config.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.ef_construction
            index.hnsw.efSearch = config.ef_search
        else:  # ivf
            # faiss wants >= 39 training points per cell; 4 * sqrt(N) is its usual guidance.
            config.check_corpus_size(n)
            nlist = config.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            train_size = min(n, config.train_size or 256 * nlist)
            rng = np.random.default_rng(0)
            sample = x if train_size >= n else x[rng.choice(n, train_size, replace=False)]
            index.train(sample)
            index.nprobe = min(config.nprobe, nlist)
        want_gpu = faiss_has_gpu() if config.use_gpu is None else config.use_gpu
        if want_gpu and config.kind != "hnsw":
            if not faiss_has_gpu():
                raise RuntimeError(
                    "use_gpu=True but the installed faiss has no GPU support (faiss-cpu); "
                    "use kind='torch' for exact search on a GPU"
                )
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
            self.device = "cuda"
        index.add(x)
        return index

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the search-time knobs of a built index, without rebuilding it: ``nprobe``
        (IVF cells searched, at most the index's ``nlist``) or ``ef_search`` (HNSW search
        width). ``None`` leaves a knob as it is; ``self.config`` records the new values.

        Raises ValueError for a value below 1 or a knob of another kind of index (``nprobe``
        for ``ivf`` only, ``ef_search`` for ``hnsw`` only), as IndexConfig does."""
        changes = {}
        for name, value, kind in (("nprobe", nprobe, "ivf"), ("ef_search", ef_search, "hnsw")):
            if value is None:
                continue
            if self.config.kind != kind:
                raise ValueError(
                    f"{name} applies to {kind!r} indexes only (this index is {self.config.kind!r})"
                )
            _require_positive(name, value)
            changes[name] = value
        if not changes:
            return
        # A copy: the caller's IndexConfig (often shared with other indexes) stays as it was.
        self.config = dataclasses.replace(self.config, **changes)
        if nprobe is not None:
            # GPU IVF indexes (faiss GPU builds) take the attribute as well.
            self._faiss.nprobe = min(nprobe, self._faiss.nlist)
        if ef_search is not None:
            self._faiss.hnsw.efSearch = ef_search

    def search(
        self, queries: np.ndarray | torch.Tensor, top_k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``min(top_k, N)`` (scores float32, positions int64) per query, best first."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected [Q, {self.dim}] queries, got {tuple(queries.shape)}")
        k = min(int(top_k), self.size)
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        n_q = int(queries.shape[0])
        scores = np.empty((n_q, k), dtype=np.float32)
        indices = np.empty((n_q, k), dtype=np.int64)
        chunk = self.config.query_chunk_size
        if self._matrix is not None:
            # Keep each chunk's [chunk, N] score block near 1 GiB.
            chunk = max(1, min(chunk, (1 << 28) // self.size))
        for start in range(0, n_q, chunk):
            block = queries[start : start + chunk]
            if self._matrix is not None:
                q = torch.as_tensor(block, dtype=torch.float32).to(self.device)
                top = torch.topk(q @ self._matrix.T, k, dim=1)
                s, i = top.values.cpu().numpy(), top.indices.cpu().numpy()
            else:
                s, i = self._faiss.search(_as_float32(block), k)
            scores[start : start + len(block)] = s
            indices[start : start + len(block)] = i
        return scores, indices


def _as_float32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(embeddings: np.ndarray | torch.Tensor, **config: Any) -> SearchIndex:
    """``SearchIndex(embeddings, IndexConfig(**config))``."""
    return SearchIndex(embeddings, IndexConfig(**config))


# ---------------------------------------------------------------------------- the cache


def corpus_fingerprint(texts: Sequence[str]) -> str:
    """A hash of the document texts, in order."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguity at joins
        h.update(data)
    return h.hexdigest()


def corpus_cache_path(
    encoder: Encoder,
    texts: Sequence[str],
    cache_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Where :func:`encode_corpus` caches these texts' embeddings by this encoder."""
    key = hashlib.sha256(
        "\n".join(
            [
                _CACHE_VERSION,
                encoder_fingerprint(encoder),
                corpus_fingerprint(texts),
                str(dtype),  # autocast changes the numbers
                encoder.device.type,
            ]
        ).encode()
    ).hexdigest()[:40]
    return Path(cache_dir) / f"corpus-{key}.npy"


def encode_corpus(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    cache_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> np.ndarray:
    """[N, D] float32 document embeddings, read from / written to ``cache_dir`` when given.

    ``cache_path`` (from :func:`corpus_cache_path`) may be given instead of ``cache_dir`` to
    skip hashing the model a second time.
    """
    path = None
    if cache_path is not None:
        path = Path(cache_path)
    elif cache_dir is not None:
        path = corpus_cache_path(encoder, texts, cache_dir, dtype=dtype)
    if path is not None:
        if path.is_file():
            embeddings = np.load(path)
            if embeddings.shape[0] == len(texts) and embeddings.ndim == 2:
                logger.info("corpus embeddings read from the cache %s", path)
                return embeddings
            logger.warning("cache file %s has shape %s; re-encoding", path, embeddings.shape)
    embeddings = encoder.encode(
        list(texts), "document", batch_size=batch_size, dtype=dtype, show_progress=show_progress
    )
    if path is not None:
        _save_atomically(path, embeddings, encoder, len(texts))
    return embeddings


def _save_atomically(path: Path, embeddings: np.ndarray, encoder: Encoder, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write under a temporary name, then rename, so a crash never leaves a truncated hit.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, embeddings)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {
        "model": getattr(encoder.model.config, "_name_or_path", ""),
        "documents": n,
        "dim": int(embeddings.shape[1]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("corpus embeddings cached at %s", path)


# ---------------------------------------------------------------------------- one call


def search(
    encoder: Encoder,
    queries: Sequence[str],
    corpus: Sequence[str],
    top_k: int = 100,
    *,
    index: str | IndexConfig = "flat",
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
    **index_options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``queries`` and ``corpus`` (document texts) with ``encoder`` and search.

    Returns (scores [Q, k] float32, positions in ``corpus`` [Q, k] int64), k = min(top_k, N),
    best first. ``index`` is a kind (``index_options`` fill its :class:`IndexConfig`) or a
    config. Approximate indexes may return -1 positions when they find fewer than k.
    """
    config = index if isinstance(index, IndexConfig) else IndexConfig(kind=index, **index_options)
    doc_embeddings = encode_corpus(
        encoder,
        corpus,
        batch_size=batch_size,
        cache_dir=cache_dir,
        dtype=dtype,
        show_progress=show_progress,
    )
    query_embeddings = encoder.encode(
        list(queries), "query", batch_size=batch_size, dtype=dtype, show_progress=show_progress
    )
    return SearchIndex(doc_embeddings, config).search(query_embeddings, top_k)


__all__ = [
    "INDEX_KINDS",
    "IndexConfig",
    "SearchIndex",
    "build_index",
    "corpus_cache_path",
    "corpus_fingerprint",
    "encode_corpus",
    "encoder_fingerprint",
    "faiss_has_gpu",
    "search",
]
