"""Training data: examples, per-epoch groups, batches without duplicate positives, and collation.

An example is a query with one or more positives and optional hard negatives. Three sources:

* JSONL (optionally gzipped), one example per line: ``query``, ``pos`` (a string or a list) and
  ``neg`` (a list, optional), FlagEmbedding's format; ``positive`` / ``negative`` also work.
* A BEIR directory and a qrels split: one example per query, its positives the documents
  judged > 0 (embedded as ``title + " " + text``, like evaluation does).
* A ``datasets`` dataset (saved with ``save_to_disk``, or a Hub id) with ``anchor`` /
  ``positive`` / ``negative`` columns (or ``negative_1`` ... ``negative_n``, or the JSONL names).

Each epoch, every example yields a *group*: one of its positives and ``negatives`` of its hard
negatives, drawn from a generator seeded by (seed, epoch, example), so a group does not depend
on which worker builds it or on whether the run was resumed. Batches are global (all processes)
and never hold the same positive text twice; candidates that still coincide (a negative of one
query that is another's positive) are told apart by ``candidate_ids`` (a hash of the text),
which the loss uses to leave them out of the denominator instead of counting a false negative.

Every distinct query and document text is tokenised once, before training, into a token cache
on disk that later epochs and runs reuse (:meth:`TrainSet.attach_tokens`, `retriever.train.tokens`).
A group is then three token-table rows, and the ``Collator`` (in the DataLoader's workers) only
gathers them, sorts each side by token length, pads and cuts it into the chunks the embedding
cache embeds: the training loop receives ready-to-run tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from retriever.model import Encoder
from retriever.train.tokens import (
    SideSettings,
    TokenTable,
    load_or_build,
    tokenize,
    tokenizer_fingerprint,
)

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad training data; the message names the file and line (or row) at fault."""


@dataclass(frozen=True)
class Example:
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    source: str  # "file.jsonl:12", for messages


# Accepted names for each field, in order of preference.
QUERY_KEYS = ("query", "anchor")
POSITIVE_KEYS = ("pos", "positive")
NEGATIVE_KEYS = ("neg", "negative")


def _texts(value: Any, where: str, key: str, allow_empty: bool) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        raise DataError(f"{where}: '{key}' must be a string or a list of strings")
    if any(not t.strip() for t in items):
        raise DataError(f"{where}: '{key}' holds an empty text")
    if not items and not allow_empty:
        raise DataError(f"{where}: '{key}' is empty; every query needs a positive")
    return tuple(items)


def example_from_record(record: Mapping[str, Any], where: str) -> Example:
    """An ``Example`` from a JSON object or dataset row; errors name ``where`` and the field."""
    query_key = next((k for k in QUERY_KEYS if k in record), None)
    positive_key = next((k for k in POSITIVE_KEYS if k in record), None)
    if query_key is None or positive_key is None:
        missing = "query" if query_key is None else "pos"
        raise DataError(
            f"{where}: missing field '{missing}' (expected {'/'.join(QUERY_KEYS)}, "
            f"{'/'.join(POSITIVE_KEYS)} and optional {'/'.join(NEGATIVE_KEYS)}; "
            f"found {sorted(record)})"
        )
    query = record[query_key]
    if not isinstance(query, str) or not query.strip():
        raise DataError(f"{where}: '{query_key}' must be a non-empty string, got {query!r}")
    positives = _texts(record[positive_key], where, positive_key, allow_empty=False)
    negatives: tuple[str, ...] = ()
    negative_key = next((k for k in NEGATIVE_KEYS if k in record), None)
    if negative_key is not None and record[negative_key] is not None:
        negatives = _texts(record[negative_key], where, negative_key, allow_empty=True)
    # sentence-transformers' n-tuple columns: negative_1, negative_2, ...
    numbered = sorted(
        (k for k in record if k.startswith("negative_") and k[9:].isdigit()),
        key=lambda k: int(k[9:]),
    )
    for key in numbered:
        negatives += _texts(record[key], where, key, allow_empty=False)
    return Example(query, positives, negatives, where)


def read_jsonl_examples(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """The examples of a JSONL file (the first ``limit``: the rest is not read)."""
    from retriever.eval.data import read_jsonl

    examples = []
    try:
        for n, obj in read_jsonl(path):
            if limit is not None and len(examples) == limit:
                break
            examples.append(example_from_record(obj, f"{path}:{n}"))
    except ValueError as exc:  # read_jsonl's malformed-line errors name the line too
        raise DataError(str(exc)) from None
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def read_beir_examples(directory: str | os.PathLike, split: str) -> list[Example]:
    """One example per query judged in ``split``, its positives the documents with score > 0."""
    from retriever.eval.data import document_text, load_beir

    try:
        task = load_beir(directory, split)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(str(exc)) from None
    examples = []
    for query_id, text in task.queries.items():
        positives = [
            document_text(task.corpus[doc_id])
            for doc_id, score in task.qrels[query_id].items()
            if score > 0
        ]
        positives = [p for p in positives if p]
        if positives and text.strip():
            where = f"{directory}/qrels/{split}.tsv query {query_id}"
            examples.append(Example(text, tuple(dict.fromkeys(positives)), (), where))
    if not examples:
        raise DataError(f"{directory}/qrels/{split}.tsv: no query has a positive (score > 0)")
    return examples


def read_dataset_examples(spec: str, split: str) -> list[Example]:
    """Rows of a ``datasets`` dataset: a ``save_to_disk`` directory or a Hub id."""
    import datasets

    try:
        if os.path.isdir(spec):
            loaded = datasets.load_from_disk(spec)
        else:
            loaded = datasets.load_dataset(spec, split=split)
    except Exception as exc:  # datasets raises many kinds (not found, offline, bad files)
        where = "saved dataset directory" if os.path.isdir(spec) else "Hub dataset"
        raise DataError(
            f"{spec}: cannot be read as a {where} ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{spec}: no split {split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    examples = [example_from_record(row, f"{spec} row {n}") for n, row in enumerate(loaded, 1)]
    if not examples:
        raise DataError(f"{spec}: the dataset has no rows")
    return examples


def detect_format(path: str) -> str:
    if os.path.isdir(path):
        has_corpus = any((Path(path) / n).is_file() for n in ("corpus.jsonl", "corpus.jsonl.gz"))
        return "beir" if has_corpus else "datasets"
    if os.path.isfile(path):
        return "jsonl"
    raise DataError(
        f"data.train: {path}: no such file or directory (for a Hub dataset set data.format: "
        "datasets)"
    )


def load_examples(
    path: str,
    *,
    format: str = "auto",
    split: str = "train",
    negatives: int = 0,
    max_examples: int | None = None,
) -> list[Example]:
    """Read training examples and check they can make groups of ``negatives`` hard negatives.

    Examples with no negative at all when ``negatives > 0`` are an error (naming the first);
    examples with fewer than ``negatives`` are sampled with replacement and counted in a warning.
    """
    kind = detect_format(path) if format == "auto" else format
    if kind == "jsonl":
        examples = read_jsonl_examples(path, max_examples)
    elif kind == "beir":
        examples = read_beir_examples(path, split)
    elif kind == "datasets":
        examples = read_dataset_examples(path, split)
    else:
        raise DataError(f"data.format: unknown format {kind!r}")
    if max_examples is not None:
        examples = examples[:max_examples]
    if negatives > 0:
        none = [e for e in examples if not e.negatives]
        if none:
            raise DataError(
                f"{none[0].source}: no hard negatives, but data.negatives is {negatives} "
                f"({len(none)} of {len(examples)} examples have none). Add negatives (e.g. "
                "`retriever mine`) or set data.negatives: 0 for in-batch negatives only"
            )
        short = [e for e in examples if len(e.negatives) < negatives]
        if short:
            logger.warning(
                "%d of %d examples have fewer than %d hard negatives (first: %s); theirs are "
                "sampled with replacement",
                len(short),
                len(examples),
                negatives,
                short[0].source,
            )
    return examples


def text_id(text: str) -> int:
    """A 64-bit id of a text (stable across processes and runs), for ``candidate_ids``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


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


class TrainSet(torch.utils.data.Dataset):
    """Examples as per-epoch groups. Indexed by ``(epoch, example index)``, returns
    ``(query, positive, [negatives])``, the same for a given key in any process.

    After :meth:`attach_tokens`, :meth:`rows` gives the same group as token-table rows, which
    is what the DataLoader's workers collate (no tokenisation during training)."""

    def __init__(self, examples: Sequence[Example], negatives: int, seed: int) -> None:
        self.examples = list(examples)
        self.negatives = negatives
        self.seed = seed
        # Positive text ids, to keep duplicates out of a batch without hashing every epoch.
        self._positive_ids = [[text_id(p) for p in e.positives] for e in self.examples]
        self.queries: TextPool | None = None
        self.documents: TextPool | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def attach_tokens(
        self,
        tokenizer: Any,
        query: SideSettings,
        document: SideSettings,
        cache_dir: str | os.PathLike | None,
        **kwargs: Any,
    ) -> None:
        """Tokenise every query, positive and negative once (``retriever.train.tokens``)."""
        self.queries, self.documents = TextPool(query), TextPool(document)
        self._query_rows = np.array([self.queries.add(e.query) for e in self.examples])
        self._positive_rows = [tuple(map(self.documents.add, e.positives)) for e in self.examples]
        self._negative_rows = [tuple(map(self.documents.add, e.negatives)) for e in self.examples]
        fingerprint = tokenizer_fingerprint(tokenizer)
        for pool, side in ((self.queries, "queries"), (self.documents, "documents")):
            pool.tokenize(
                tokenizer, cache_dir, f"tokenize {side}", tokenizer_hash=fingerprint, **kwargs
            )

    def fingerprint(self) -> str:
        """A hash of every example's texts, in order (a resumed run checks it)."""
        import xxhash

        h = xxhash.xxh3_128()
        for e in self.examples:
            for text in (e.query, *e.positives, "\x00", *e.negatives, "\x01"):
                h.update(text.encode("utf-8"))
                h.update(b"\x1f")
        return h.hexdigest()

    def set_negatives(self, index: int, negatives: Sequence[str]) -> None:
        """Replace an example's hard negatives (dynamic mining); new texts are tokenised."""
        example = self.examples[index]
        if tuple(negatives) == example.negatives:
            return
        self.examples[index] = dataclasses.replace(example, negatives=tuple(negatives))
        if self.documents is not None:
            self._negative_rows[index] = tuple(map(self.documents.row_of, negatives))

    def _rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])

    def _positive_index(self, rng: np.random.Generator, index: int) -> int:
        count = len(self.examples[index].positives)
        return int(rng.integers(count)) if count > 1 else 0

    def positive_id(self, epoch: int, index: int) -> int:
        ids = self._positive_ids[index]
        return ids[self._positive_index(self._rng(epoch, index), index)] if len(ids) > 1 else ids[0]

    def _pick(self, epoch: int, index: int) -> tuple[int, list[int]]:
        """(positive, negatives) of this epoch's group, as indices into the example's lists."""
        example = self.examples[index]
        if len(example.positives) == 1 and self.negatives == 0:
            return 0, []  # nothing to draw: no generator (it costs more than the rest)
        rng = self._rng(epoch, index)
        positive = self._positive_index(rng, index)
        pool, n = len(example.negatives), self.negatives
        if n == 0:
            return positive, []
        if pool >= n:
            picked = rng.choice(pool, size=n, replace=False)
        else:  # every negative once, the rest drawn with replacement
            extra = rng.integers(pool, size=n - pool)
            picked = rng.permutation(np.concatenate([np.arange(pool), extra]))
        return positive, [int(i) for i in picked]

    def __getitem__(self, key: tuple[int, int]) -> tuple[str, str, list[str]]:
        epoch, index = key
        example = self.examples[index]
        positive, negatives = self._pick(epoch, index)
        return example.query, example.positives[positive], [example.negatives[i] for i in negatives]

    def rows(self, epoch: int, index: int) -> tuple[int, int, list[int]]:
        """The group of ``(epoch, index)`` as (query row, positive row, negative rows)."""
        positive, negatives = self._pick(epoch, index)
        negative_rows = self._negative_rows[index]
        return (
            int(self._query_rows[index]),
            self._positive_rows[index][positive],
            [negative_rows[i] for i in negatives],
        )


def epoch_batches(train_set: TrainSet, epoch: int, batch_size: int) -> list[list[int]]:
    """The global batches of ``epoch``: a seeded shuffle cut into batches of ``batch_size``
    examples whose positives are all different texts. An example whose positive is already in
    the batch waits for the next one; the incomplete last batch is dropped."""
    order = np.random.default_rng([train_set.seed, epoch]).permutation(len(train_set))
    pending = deque(int(i) for i in order)
    batches: list[list[int]] = []
    while len(pending) >= batch_size:
        batch: list[int] = []
        seen: set[int] = set()
        deferred: list[int] = []
        while pending and len(batch) < batch_size:
            index = pending.popleft()
            key = train_set.positive_id(epoch, index)
            if key in seen:
                deferred.append(index)
            else:
                seen.add(key)
                batch.append(index)
        pending.extendleft(reversed(deferred))  # they open the next batch
        if len(batch) < batch_size:
            break
        batches.append(batch)
    return batches


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

    def pin_memory(self) -> TokenChunk:
        return TokenChunk(self.input_ids.pin_memory(), self.lengths.pin_memory(), self.left_padding)


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

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True) so host-to-GPU copies can be asynchronous."""
        return Batch(
            [c.pin_memory() for c in self.query_chunks],
            [c.pin_memory() for c in self.document_chunks],
            self.query_order.pin_memory(),
            self.document_order.pin_memory(),
            self.candidate_ids.pin_memory(),
            self.num_queries,
            self.num_tokens,
        )


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


def batch_of_texts(
    encoder: Encoder,
    groups: Sequence[tuple[str, str, Sequence[str]]],
    chunk_size: int,
    sort_by_length: bool = True,
) -> Batch:
    """The ``Batch`` the trainer makes of text groups ``(query, positive, [negatives])``,
    tokenised in memory (for tests, scripts and one-off steps)."""
    examples = [Example(q, (p,), tuple(n), f"group {i}") for i, (q, p, n) in enumerate(groups)]
    train_set = TrainSet(examples, len(groups[0][2]), seed=0)
    train_set.attach_tokens(
        encoder.tokenizer,
        encoder.side_settings("query"),
        encoder.side_settings("document"),
        None,
        show_progress=False,
    )
    assert train_set.queries is not None and train_set.documents is not None
    collator = Collator(
        train_set.queries, train_set.documents, encoder.tokenizer, chunk_size, sort_by_length
    )
    # Each group's own negatives, in order (no sampling: the groups are given).
    rows = [
        (
            int(train_set._query_rows[i]),
            train_set._positive_rows[i][0],
            list(train_set._negative_rows[i]),
        )
        for i in range(len(groups))
    ]
    return collator(rows)
