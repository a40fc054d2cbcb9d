"""The training-data format, shared by training and mining: examples (a query, its positives and
hard negatives) from JSONL, BEIR directories or ``datasets`` datasets.

* JSONL (optionally gzipped), one example per line: ``query``, ``pos`` (a string or a list) and
  ``neg`` (a list, optional), FlagEmbedding's format; ``positive`` / ``negative`` also work.
  Optional teacher scores, one number per positive / negative: ``pos_scores``, ``neg_scores``
  (as mined files and FlagEmbedding's distillation data carry them).
* A BEIR directory and a qrels split: one example per query, its positives the documents
  judged > 0 (embedded as ``title + " " + text``, like evaluation does).
* A ``datasets`` dataset (saved with ``save_to_disk``, or a Hub id) with ``anchor`` /
  ``positive`` / ``negative`` columns (or ``negative_1`` ... ``negative_n``, or the JSONL names).

Every problem is a :class:`DataError` naming the file and line (or row) at fault.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retriever.data.texts import read_jsonl

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad training data; the message names the file and line (or row) at fault."""


@dataclass(frozen=True)
class Example:
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    source: str  # "file.jsonl:12", for messages
    positive_scores: tuple[float, ...] | None = None  # a teacher's, one per positive
    negative_scores: tuple[float, ...] | None = None  # one per negative


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
        hint = ""
        if {"sentence1", "sentence2"} <= set(record):
            hint = (
                "; these look like STS pairs (sentence1, sentence2, score): train on them as a "
                "source with task: sts, e.g. data.train: [{path: ..., task: sts}]"
            )
        raise DataError(
            f"{where}: missing field '{missing}' (expected {'/'.join(QUERY_KEYS)}, "
            f"{'/'.join(POSITIVE_KEYS)} and optional {'/'.join(NEGATIVE_KEYS)}; "
            f"found {sorted(record)}){hint}"
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
    return Example(
        query,
        positives,
        negatives,
        where,
        _scores(record, "pos_scores", len(positives), where),
        _scores(record, "neg_scores", len(negatives), where),
    )


def _scores(record: Mapping[str, Any], key: str, count: int, where: str) -> tuple | None:
    """A line's teacher scores under ``key``: one finite number per text, or absent."""
    value = record.get(key)
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == count
    if ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        if all(math.isfinite(v) for v in value):
            return tuple(float(v) for v in value)
    texts = "positive" if key == "pos_scores" else "negative"
    raise DataError(
        f"{where}: '{key}' must be a list of {count} finite numbers, one per {texts}, got {value!r}"
    )


def read_jsonl_examples(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """The examples of a JSONL file (the first ``limit``: the rest is not read)."""
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
    check_negatives(examples, negatives)
    return examples


def check_negatives(examples: list[Example], negatives: int) -> None:
    """Every example needs a hard negative when groups take ``negatives`` of them (an error
    names the first without); those with fewer are sampled with replacement (a warning)."""
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
