"""Batches for the embedding cache: a global batch's share of one process, gathered from the
token tables, sorted by token length and padded chunk by chunk (in the DataLoader's workers).

* :class:`TextPool`: one side's distinct texts, their token table and text ids;
* :class:`TokenChunk`: texts embedded in one forward pass (int32 ids, lengths on the host);
* :class:`Batch`: query and document chunks, the orders that put embeddings back in batch
  order, and the documents' text ids;
* :class:`Collator`: groups of token rows -> a ``Batch``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from retriever.data.texts import text_id
from retriever.model.settings import SideSettings
from retriever.train.tokens import TokenTable, load_or_build, tokenize


class TextPool:
    """The distinct texts of one side (queries or documents) with stable row numbers, their
    token table (`retriever.train.tokens`) and their 64-bit text ids (``candidate_ids``)."""

    def __init__(self, settings: SideSettings) -> None:
        self.settings = settings
        self.texts: list[str] = []
        self.row: dict[str, int] = {}
        self.table: TokenTable | None = None
        self.text_ids = np.zeros(0, dtype=np.int64)
        self._tokenizer: Any = None

    def add(self, text: str) -> int:
        row = self.row.get(text)
        if row is None:
            row = self.row[text] = len(self.texts)
            self.texts.append(text)
        return row

    def tokenize(self, tokenizer: Any, cache_dir: Any, desc: str, **kwargs: Any) -> None:
        """Tokenise every text added so far (through the on-disk cache when ``cache_dir``)."""
        self.table = load_or_build(
            tokenizer, self.texts, self.settings, cache_dir, desc=desc, **kwargs
        )
        self.text_ids = np.fromiter((text_id(t) for t in self.texts), np.int64, len(self.texts))
        self._tokenizer = tokenizer

    def row_of(self, text: str) -> int:
        """The row of ``text``; a text not seen before is tokenised now (re-mined negatives)."""
        if text in self.row:
            return self.row[text]
        row = self.add(text)
        assert self.table is not None, "tokenize() first"
        self.table = TokenTable.concatenate(
            [self.table, tokenize(self._tokenizer, [text], self.settings)]
        )
        self.text_ids = np.append(self.text_ids, np.int64(text_id(text)))
        return row


@dataclass
class TokenChunk:
    """Texts embedded in one forward pass: token ids padded to the chunk's longest text.

    ``input_ids`` [n, width] int32 (in pinned host memory during training) and ``lengths``
    [n] (always on the host, so slicing never reads the GPU). The attention mask is made on
    the device from the lengths, so only 4 bytes per token cross to the GPU.
    """

    input_ids: Tensor
    lengths: Tensor
    left_padding: bool = False

    @property
    def size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def no_padding(self) -> bool:
        return bool(self.lengths.min() == self.input_ids.shape[1]) if self.size else True

    def split(self, size: int) -> list[TokenChunk]:
        """Consecutive row slices of at most ``size`` rows, each trimmed to its own longest
        text (views: no copy)."""
        if size >= self.size:
            return [self]
        out, width = [], self.input_ids.shape[1]
        for start in range(0, self.size, size):
            lengths = self.lengths[start : start + size]
            w = int(lengths.max())
            cols = slice(width - w, width) if self.left_padding else slice(0, w)
            out.append(
                TokenChunk(self.input_ids[start : start + size, cols], lengths, self.left_padding)
            )
        return out

    def features(self, device: torch.device | str) -> dict[str, Any]:
        """The encoder's input on ``device``: int64 ids, the attention mask, ``no_padding``."""
        ids = self.input_ids.to(device, non_blocking=True).long()
        lengths = self.lengths.to(device, non_blocking=True)
        columns = torch.arange(ids.shape[1], device=ids.device)
        if self.left_padding:
            mask = columns[None, :] >= (ids.shape[1] - lengths)[:, None]
        else:
            mask = columns[None, :] < lengths[:, None]
        # Known here on the host: without padding the network runs without a mask.
        return {"input_ids": ids, "attention_mask": mask.long(), "no_padding": self.no_padding}


@dataclass
class PackedChunks:
    """One side's chunks as two flat tensors, ``ids`` (every chunk's padded ids, one chunk
    after another) and ``lengths``, with each chunk's (rows, width, left padding): the form in
    which a batch crosses from a DataLoader worker and is pinned. A tensor per chunk would cost
    the receiving process a shared-memory handshake (and a pinned allocation) each: measured on
    2 CPU cores, receiving 1,024 chunks took 0.51-0.71 s of the main process's CPU (1.1-2.3 s
    wall), packed 0.06-0.08 s (`scripts/bench_batch_transfer.py`)."""

    ids: Tensor
    lengths: Tensor
    shapes: list[tuple[int, int, bool]]

    @classmethod
    def of(cls, chunks: list[TokenChunk]) -> PackedChunks:
        shapes = [(*c.input_ids.shape, c.left_padding) for c in chunks]
        if not chunks:
            return cls(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.long), [])
        ids = torch.cat([c.input_ids.reshape(-1) for c in chunks])
        return cls(ids, torch.cat([c.lengths for c in chunks]), shapes)

    def chunks(self) -> list[TokenChunk]:
        """The chunks again, as views of the two tensors (no copy)."""
        out, at, row = [], 0, 0
        for rows, width, left in self.shapes:
            ids = self.ids[at : at + rows * width].view(rows, width)
            out.append(TokenChunk(ids, self.lengths[row : row + rows], left))
            at, row = at + rows * width, row + rows
        return out

    def pin_memory(self) -> PackedChunks:
        return PackedChunks(self.ids.pin_memory(), self.lengths.pin_memory(), self.shapes)

    def holds(self, chunks: list[TokenChunk]) -> bool:
        """Whether ``chunks`` are still the views :meth:`chunks` made of these tensors."""
        base = self.ids.untyped_storage().data_ptr()
        return len(chunks) == len(self.shapes) and all(
            c.input_ids.untyped_storage().data_ptr() == base
            and (*c.input_ids.shape, c.left_padding) == shape
            for c, shape in zip(chunks, self.shapes)
        )


@dataclass
class Batch:
    """One process's share of a global batch, cut into embedding chunks.

    ``query_chunks`` / ``document_chunks`` are in embedding order (longest text first when
    sorting is on); ``query_order[i]`` is the row, in that order, of query i (so
    ``embeddings[query_order]`` is in batch order), likewise ``document_order``. Documents are
    ``[positives; first negatives; second negatives; ...]``, so query i's positive is
    document i. ``candidate_ids`` are the documents' text ids in batch order.
    """

    query_chunks: list[TokenChunk]
    document_chunks: list[TokenChunk]
    query_order: Tensor
    document_order: Tensor
    candidate_ids: Tensor
    num_queries: int
    num_tokens: int
    # Gold scores of scored pairs (an STS source) [Bq], or a teacher's scores of each query's
    # group [Bq, 1 + n] (positive first), in batch order.
    scores: Tensor | None = None
    example_indices: Tensor | None = None  # [Bq] each query's example in its dataset
    # The chunks' flat tensors, when the chunks are views of them (after crossing from a
    # worker, or pinning): pickling and pinning then move two tensors a side, not two a chunk.
    packed: tuple[PackedChunks, PackedChunks] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def num_documents(self) -> int:
        return int(self.document_order.shape[0])

    def _rest(self) -> tuple:
        """The fields after the chunks, in order."""
        return (self.query_order, self.document_order, self.candidate_ids, self.num_queries,
                self.num_tokens, self.scores, self.example_indices)  # fmt: skip

    def _packed(self) -> tuple[PackedChunks, PackedChunks]:
        """The packed form: the one the chunks are views of, or (if they are not, say after
        someone replaced them) packed anew."""
        chunks = (self.query_chunks, self.document_chunks)
        if self.packed is not None and all(p.holds(c) for p, c in zip(self.packed, chunks)):
            return self.packed
        return PackedChunks.of(chunks[0]), PackedChunks.of(chunks[1])

    def __reduce__(self) -> tuple:
        """Pickled (from a DataLoader worker) with each side's chunks packed flat."""
        return (_unpack_batch, (self._packed(), *self._rest()))

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True) so host-to-GPU copies can be asynchronous:
        two pinned tensors a side, the chunks views of them."""
        rest = [x.pin_memory() if isinstance(x, Tensor) else x for x in self._rest()]
        return _unpack_batch(tuple(p.pin_memory() for p in self._packed()), *rest)


def _unpack_batch(packed: tuple[PackedChunks, PackedChunks], *rest: Any) -> Batch:
    queries, documents = packed
    batch = Batch(queries.chunks(), documents.chunks(), *rest)
    batch.packed = packed
    return batch


class Collator:
    """Groups of token rows ``(query, positive, [negatives])`` -> a ``Batch``: a gather, a sort
    by token length and a pad per chunk (it runs in the DataLoader's workers)."""

    def __init__(
        self,
        queries: TextPool,
        documents: TextPool,
        tokenizer: Any,
        chunk_size: int,
        sort_by_length: bool = True,
    ) -> None:
        self.queries, self.documents = queries, documents
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.left_padding = tokenizer.padding_side == "left"
        self.chunk_size = chunk_size
        self.sort_by_length = sort_by_length

    @classmethod
    def of(cls, dataset: Any, tokenizer: Any, chunk_size: int, sort_by_length: bool) -> Collator:
        """The Collator of a dataset's token pools (``queries``, ``documents``)."""
        return cls(dataset.queries, dataset.documents, tokenizer, chunk_size, sort_by_length)

    def _chunks(self, pool: TextPool, rows: np.ndarray) -> tuple[list[TokenChunk], Tensor]:
        assert pool.table is not None
        lengths = pool.table.lengths[rows]
        if self.sort_by_length:  # longest first: an out-of-memory shows on the first chunk
            order = np.argsort(-lengths, kind="stable")
        else:
            order = np.arange(len(rows))
        chunks = []
        for start in range(0, len(rows), self.chunk_size):
            picked = rows[order[start : start + self.chunk_size]]
            ids = pool.table.padded(picked, self.pad_id, left=self.left_padding)
            chunks.append(
                TokenChunk(
                    torch.from_numpy(ids),
                    torch.from_numpy(pool.table.lengths[picked]),
                    self.left_padding,
                )
            )
        position = torch.empty(len(rows), dtype=torch.long)
        position[torch.from_numpy(order)] = torch.arange(len(rows))
        return chunks, position

    def __call__(self, groups: Iterable[tuple[int, int, list[int]]]) -> Batch:
        groups = list(groups)
        queries = np.array([g[0] for g in groups], dtype=np.int64)
        n_negatives = len(groups[0][2])
        documents = np.array(
            [g[1] for g in groups] + [g[2][j] for j in range(n_negatives) for g in groups],
            dtype=np.int64,
        )
        query_chunks, query_order = self._chunks(self.queries, queries)
        document_chunks, document_order = self._chunks(self.documents, documents)
        assert self.queries.table is not None and self.documents.table is not None
        tokens = int(self.queries.table.lengths[queries].sum())
        tokens += int(self.documents.table.lengths[documents].sum())
        ids = torch.from_numpy(self.documents.text_ids[documents])
        return Batch(
            query_chunks, document_chunks, query_order, document_order, ids, len(queries), tokens
        )
