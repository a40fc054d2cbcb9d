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

Tokenisation happens in the DataLoader's worker processes (``Collator``), which also sorts each
side by length and cuts it into the chunks the embedding cache embeds, so the training loop
receives ready-to-run tensors.
"""

from __future__ import annotations

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
from torch import Tensor, nn

from retriever.modeling import Encoder

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


def read_jsonl_examples(path: str | os.PathLike) -> list[Example]:
    from retriever.eval.data import read_jsonl

    try:
        examples = [example_from_record(obj, f"{path}:{n}") for n, obj in read_jsonl(path)]
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

    if os.path.isdir(spec):
        loaded = datasets.load_from_disk(spec)
    else:
        loaded = datasets.load_dataset(spec, split=split)
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
        examples = read_jsonl_examples(path)
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


class TrainSet(torch.utils.data.Dataset):
    """Examples as per-epoch groups. Indexed by ``(epoch, example index)``, returns
    ``(query, positive, [negatives])``, the same for a given key in any process."""

    def __init__(self, examples: Sequence[Example], negatives: int, seed: int) -> None:
        self.examples = list(examples)
        self.negatives = negatives
        self.seed = seed
        # Positive text ids, to keep duplicates out of a batch without hashing every epoch.
        self._positive_ids = [[text_id(p) for p in e.positives] for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def _rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])

    def _positive_index(self, rng: np.random.Generator, index: int) -> int:
        count = len(self.examples[index].positives)
        return int(rng.integers(count)) if count > 1 else 0

    def positive_id(self, epoch: int, index: int) -> int:
        ids = self._positive_ids[index]
        return ids[self._positive_index(self._rng(epoch, index), index)] if len(ids) > 1 else ids[0]

    def __getitem__(self, key: tuple[int, int]) -> tuple[str, str, list[str]]:
        epoch, index = key
        example = self.examples[index]
        rng = self._rng(epoch, index)
        positive = example.positives[self._positive_index(rng, index)]
        pool, n = example.negatives, self.negatives
        if n == 0:
            return example.query, positive, []
        if len(pool) >= n:
            picked = rng.choice(len(pool), size=n, replace=False)
        else:  # every negative once, the rest drawn with replacement
            extra = rng.integers(len(pool), size=n - len(pool))
            picked = rng.permutation(np.concatenate([np.arange(len(pool)), extra]))
        return example.query, positive, [pool[i] for i in picked]


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


def tokenizer_only(encoder: Encoder) -> Encoder:
    """A copy of ``encoder`` without its network, for DataLoader workers (cheap to pickle)."""
    return Encoder(
        nn.Identity(),
        encoder.tokenizer,
        pooling=encoder.pooling,
        normalize=encoder.normalize,
        query_prefix=encoder.query_prefix,
        document_prefix=encoder.document_prefix,
        query_max_length=encoder.query_max_length,
        document_max_length=encoder.document_max_length,
        do_lower_case=encoder.do_lower_case,
    )


@dataclass
class Batch:
    """One process's share of a global batch, tokenised and cut into embedding chunks.

    ``query_chunks`` / ``document_chunks`` are tokenizer feature dicts in embedding order (by
    length when sorting is on); ``query_order[i]`` is the row, in that order, of query i (so
    ``embeddings[query_order]`` is in batch order), likewise ``document_order``. Documents are
    ``[positives; first negatives; second negatives; ...]``, so query i's positive is
    document i. ``candidate_ids`` are the documents' text ids in batch order. Each chunk also
    says whether it has ``no_padding`` (then the network needs no attention mask).
    """

    query_chunks: list[dict[str, Any]]
    document_chunks: list[dict[str, Any]]
    query_order: Tensor
    document_order: Tensor
    candidate_ids: Tensor
    num_queries: int
    num_tokens: int

    def _map(self, fn: Any) -> Batch:
        def chunks(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{k: fn(v) if isinstance(v, Tensor) else v for k, v in c.items()} for c in items]

        return Batch(
            chunks(self.query_chunks),
            chunks(self.document_chunks),
            fn(self.query_order),
            fn(self.document_order),
            fn(self.candidate_ids),
            self.num_queries,
            self.num_tokens,
        )

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True) so host-to-GPU copies can be asynchronous."""
        return self._map(lambda t: t.pin_memory())


class Collator:
    """Turns groups ``(query, positive, negatives)`` into a ``Batch`` (runs in the workers)."""

    def __init__(self, encoder: Encoder, chunk_size: int, sort_by_length: bool = True) -> None:
        self.tokenizer = tokenizer_only(encoder)
        self.chunk_size = chunk_size
        self.sort_by_length = sort_by_length

    def _chunks(self, texts: list[str], side: str) -> tuple[list[dict[str, Tensor]], Tensor]:
        if self.sort_by_length:  # longest first: an out-of-memory shows on the first chunk
            order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        else:
            order = list(range(len(texts)))
        chunks = []
        for start in range(0, len(texts), self.chunk_size):
            features: dict[str, Any] = self.tokenizer.tokenize(
                [texts[i] for i in order[start : start + self.chunk_size]], side
            )
            # Known here on the host, so the forward pass needs no device sync to learn it.
            features["no_padding"] = bool(features["attention_mask"].all())
            chunks.append(features)
        position = torch.empty(len(texts), dtype=torch.long)
        position[torch.tensor(order, dtype=torch.long)] = torch.arange(len(texts))
        return chunks, position

    def __call__(self, groups: Iterable[tuple[str, str, list[str]]]) -> Batch:
        groups = list(groups)
        queries = [g[0] for g in groups]
        n_negatives = len(groups[0][2])
        documents = [g[1] for g in groups]
        for j in range(n_negatives):
            documents.extend(g[2][j] for g in groups)
        query_chunks, query_order = self._chunks(queries, "query")
        document_chunks, document_order = self._chunks(documents, "document")
        tokens = sum(int(c["attention_mask"].sum()) for c in query_chunks + document_chunks)
        ids = torch.tensor([text_id(t) for t in documents], dtype=torch.long)
        return Batch(
            query_chunks, document_chunks, query_order, document_order, ids, len(queries), tokens
        )
