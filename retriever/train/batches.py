"""Batches for the embedding cache: a global batch's share of one process, gathered from the
token tables, sorted by token length and cut into chunks (in the DataLoader's workers): padded
chunks of a number of texts, or padding-free streams of a number of tokens.

* :class:`TextPool`: one side's distinct texts, their token table and text ids;
* :class:`TokenChunk`: texts embedded in one forward pass, padded (int32 ids, lengths on the host);
* :class:`StreamChunk`: texts embedded in one forward pass as one token stream, padding-free;
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

    def layout(self) -> tuple:
        """What `PackedChunks` keeps to rebuild the chunk from its flat ids and lengths."""
        return ("padded", *self.input_ids.shape, self.left_padding)

    @classmethod
    def from_flat(cls, ids: Tensor, lengths: Tensor, layout: tuple) -> TokenChunk:
        _, rows, width, left = layout
        return cls(ids.view(rows, width), lengths, left)


def stream_cuts(lengths: np.ndarray, budget: int) -> list[int]:
    """Where consecutive groups of texts start (and, last, where the last ends): each group
    holds at most ``budget`` tokens, filled greedily in order; a text longer than the budget
    is a group of its own."""
    ends = np.cumsum(lengths, dtype=np.int64)
    cuts = [0]
    while cuts[-1] < len(lengths):
        start = cuts[-1]
        before = int(ends[start - 1]) if start else 0
        end = int(np.searchsorted(ends, before + budget, side="right"))
        cuts.append(max(end, start + 1))
    return cuts


SEGMENT_BUCKET = 128  # a static stream's number of bounds is rounded up to a multiple of this


@dataclass
class StreamChunk:
    """Texts embedded in one forward pass as one token stream, padding-free (design notes
    section 9): their ids one after another, ``ids`` [T] int32 (in pinned host memory during
    training), and their ``lengths`` [n] (on the host). No padding enters a matrix product:
    attention runs within each text (`retriever.model.varlen`) and pooling reads the bounds.

    ``max_length`` bounds a text's length (the attention kernels size their work by it; one
    value for every chunk, so compiled graphs see one). ``pad_to``, a static shape: the stream
    is padded to that many tokens by a tail of dummy texts that no embedding reads, and its
    bounds to a multiple of `SEGMENT_BUCKET`, so every chunk of a budget has one shape (what
    compiled graphs and CUDA graphs need).
    """

    ids: Tensor
    lengths: Tensor
    max_length: int
    pad_to: int | None = None

    @property
    def size(self) -> int:
        """Real tokens: what a stream chunk's budget counts (``training.chunk_tokens``)."""
        return int(self.ids.shape[0])

    @property
    def texts(self) -> int:
        return int(self.lengths.shape[0])

    def split(self, tokens: int) -> list[StreamChunk]:
        """Consecutive pieces of at most ``tokens`` real tokens each (a longer text alone),
        views of this stream; a static shape pads each to ``tokens``."""
        if tokens >= self.size:
            return [self]
        cuts = stream_cuts(self.lengths.numpy(), tokens)
        starts = np.concatenate([[0], np.cumsum(self.lengths.numpy(), dtype=np.int64)])
        pad_to = tokens if self.pad_to is not None else None
        return [
            StreamChunk(self.ids[starts[a] : starts[b]], self.lengths[a:b], self.max_length, pad_to)
            for a, b in zip(cuts[:-1], cuts[1:])
        ]

    def bounds(self) -> Tensor:
        """[segments] the lengths of the stream's segments: the texts, then a static shape's
        tail (dummy texts of at most ``max_length`` tokens, then empty ones)."""
        lengths = self.lengths.long()
        tail = (self.pad_to or 0) - self.size
        if tail <= 0:
            return lengths
        full, rest = divmod(tail, self.max_length)
        pieces = [lengths, torch.full((full,), self.max_length, dtype=torch.long)]
        pieces.append(torch.tensor([rest] if rest else [], dtype=torch.long))
        count = sum(p.numel() for p in pieces)
        pieces.append(torch.zeros(-count % SEGMENT_BUCKET, dtype=torch.long))
        return torch.cat(pieces)

    def features(self, device: torch.device | str) -> dict[str, Any]:
        """The encoder's input on ``device``: int64 ``input_ids`` [width], ``position_ids``
        (restarting at 0 for each text), ``cu_seqlens`` (int32 bounds), ``max_length`` and
        ``texts`` (host ints)."""
        segments = self.bounds()
        width = int(segments.sum())
        cu = torch.zeros(segments.numel() + 1, dtype=torch.int32)
        cu[1:] = segments.cumsum(0)
        ids = self.ids.to(device, non_blocking=True).long()
        if width > self.size:
            ids = torch.cat([ids, ids.new_zeros(width - self.size)])
        segments, cu = segments.to(ids.device), cu.to(ids.device)
        starts = torch.repeat_interleave(cu[:-1].long(), segments, output_size=width)
        positions = torch.arange(width, device=ids.device) - starts
        return {"input_ids": ids, "position_ids": positions, "cu_seqlens": cu,
                "max_length": self.max_length, "texts": self.texts}  # fmt: skip

    def layout(self) -> tuple:
        return ("stream", self.texts, self.size, self.max_length, self.pad_to)

    @classmethod
    def from_flat(cls, ids: Tensor, lengths: Tensor, layout: tuple) -> StreamChunk:
        return cls(ids, lengths, *layout[3:])


Chunk = TokenChunk | StreamChunk


@dataclass
class PackedChunks:
    """One side's chunks as two flat tensors, ``ids`` (every chunk's ids, padded or streamed,
    one chunk after another) and ``lengths``, with each chunk's layout (`TokenChunk.layout`,
    `StreamChunk.layout`): the form in which a batch crosses from a DataLoader worker and is
    pinned. A tensor per chunk would cost the receiving process a shared-memory handshake (and
    a pinned allocation) each: measured on 2 CPU cores, receiving 1,024 chunks took 0.51-0.71 s
    of the main process's CPU (1.1-2.3 s wall), packed 0.06-0.08 s
    (`scripts/bench_batch_transfer.py`)."""

    ids: Tensor
    lengths: Tensor
    layouts: list[tuple]

    @classmethod
    def of(cls, chunks: list[Chunk]) -> PackedChunks:
        layouts = [c.layout() for c in chunks]
        if not chunks:
            return cls(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.long), [])
        ids = torch.cat([_flat_ids(c) for c in chunks])
        return cls(ids, torch.cat([c.lengths for c in chunks]), layouts)

    def chunks(self) -> list[Chunk]:
        """The chunks again, as views of the two tensors (no copy)."""
        out, at, row = [], 0, 0
        for layout in self.layouts:
            kind, rows = layout[:2]
            numel = layout[2] * (layout[1] if kind == "padded" else 1)
            chunk_class = TokenChunk if kind == "padded" else StreamChunk
            ids, lengths = self.ids[at : at + numel], self.lengths[row : row + rows]
            out.append(chunk_class.from_flat(ids, lengths, layout))
            at, row = at + numel, row + rows
        return out

    def pin_memory(self) -> PackedChunks:
        return PackedChunks(self.ids.pin_memory(), self.lengths.pin_memory(), self.layouts)

    def holds(self, chunks: list[Chunk]) -> bool:
        """Whether ``chunks`` are still the views :meth:`chunks` made of these tensors."""
        base = self.ids.untyped_storage().data_ptr()
        return len(chunks) == len(self.layouts) and all(
            _flat_ids(c).untyped_storage().data_ptr() == base and c.layout() == layout
            for c, layout in zip(chunks, self.layouts)
        )


def _flat_ids(chunk: Chunk) -> Tensor:
    return chunk.input_ids.reshape(-1) if isinstance(chunk, TokenChunk) else chunk.ids


@dataclass
class Batch:
    """One process's share of a global batch, cut into embedding chunks.

    ``query_chunks`` / ``document_chunks`` are in embedding order (longest text first when
    sorting is on); ``query_order[i]`` is the row, in that order, of query i (so
    ``embeddings[query_order]`` is in batch order), likewise ``document_order``. Documents are
    ``[positives; first negatives; second negatives; ...]``, so query i's positive is
    document i. ``candidate_ids`` are the documents' text ids in batch order.
    """

    query_chunks: list[Chunk]
    document_chunks: list[Chunk]
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


@dataclass(frozen=True)
class Packing:
    """How a Collator cuts padding-free chunks (`StreamChunk`); its chunk size then counts
    real tokens. ``max_length``: the longest a text of either side can be; ``static``: pad every
    stream to the budget (one shape per chunk)."""

    max_length: int
    static: bool = False


class Collator:
    """Groups of token rows ``(query, positive, [negatives])`` -> a ``Batch``: a gather, a sort
    by token length and, per chunk, a pad (``chunk_size`` texts) or, with ``packing``, a
    concatenation (``chunk_size`` tokens). It runs in the DataLoader's workers."""

    def __init__(
        self,
        queries: TextPool,
        documents: TextPool,
        tokenizer: Any,
        chunk_size: int,
        sort_by_length: bool = True,
        packing: Packing | None = None,
    ) -> None:
        self.queries, self.documents = queries, documents
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.left_padding = tokenizer.padding_side == "left"
        self.chunk_size = chunk_size
        self.sort_by_length = sort_by_length
        self.packing = packing

    @classmethod
    def of(
        cls,
        dataset: Any,
        tokenizer: Any,
        chunk_size: int,
        sort_by_length: bool,
        packing: Packing | None = None,
    ) -> Collator:
        """The Collator of a dataset's token pools (``queries``, ``documents``)."""
        return cls(
            dataset.queries, dataset.documents, tokenizer, chunk_size, sort_by_length, packing
        )

    def _chunks(self, pool: TextPool, rows: np.ndarray) -> tuple[list[Chunk], Tensor]:
        assert pool.table is not None
        lengths = pool.table.lengths[rows]
        if self.sort_by_length:  # longest first: an out-of-memory shows on the first chunk
            order = np.argsort(-lengths, kind="stable")
        else:
            order = np.arange(len(rows))
        if self.packing is not None:
            chunks = self._streams(pool, rows[order], lengths[order])
        else:
            chunks = [
                self._padded(pool, rows[order[start : start + self.chunk_size]])
                for start in range(0, len(rows), self.chunk_size)
            ]
        position = torch.empty(len(rows), dtype=torch.long)
        position[torch.from_numpy(order)] = torch.arange(len(rows))
        return chunks, position

    def _padded(self, pool: TextPool, picked: np.ndarray) -> TokenChunk:
        ids = pool.table.padded(picked, self.pad_id, left=self.left_padding)
        lengths = torch.from_numpy(pool.table.lengths[picked])
        return TokenChunk(torch.from_numpy(ids), lengths, self.left_padding)

    def _streams(self, pool: TextPool, rows: np.ndarray, lengths: np.ndarray) -> list[Chunk]:
        packing, budget = self.packing, self.chunk_size
        cuts = stream_cuts(lengths, budget)
        ids = torch.from_numpy(pool.table.concatenated(rows))
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        pad_to = budget if packing.static else None
        return [
            StreamChunk(
                ids[starts[a] : starts[b]],
                torch.from_numpy(lengths[a:b]),
                packing.max_length,
                pad_to,
            )  # fmt: skip
            for a, b in zip(cuts[:-1], cuts[1:])
        ]

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
