"""Retrieval tasks: a corpus, queries and graded qrels, from a BEIR directory or the Hub.

BEIR layout (as in ``../shared/data/scifact``)::

    corpus.jsonl     {"_id": ..., "title": ..., "text": ...}   one document per line
    queries.jsonl    {"_id": ..., "text": ...}
    qrels/<split>.tsv  query-id <TAB> corpus-id <TAB> score    (header line optional)

``.jsonl.gz`` / ``.tsv.gz`` are read too. Every problem names its file and line: a missing file,
a malformed line, an empty corpus or query set and duplicate ids are errors; qrels that name
unknown queries or documents are dropped, counted and reported (BEIR releases have a few), as
are queries without any judgement in the split (they are not evaluated, as in BEIR and MTEB).
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retriever.data.texts import read_jsonl

logger = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]


@dataclass
class LoadReport:
    """What a loader dropped, so that callers can print or check it."""

    unknown_query_ids: int = 0  # qrels lines whose query is not in the queries file
    unknown_corpus_ids: int = 0  # qrels lines whose document is not in the corpus
    duplicate_qrels: int = 0  # repeated (query, document) pairs; the last score is kept
    queries_without_qrels: int = 0  # queries with no judgement in this split (not evaluated)
    examples: list[str] = field(default_factory=list)  # a few of the unknown ids

    def messages(self, source: str) -> list[str]:
        out = []
        if self.unknown_query_ids or self.unknown_corpus_ids:
            out.append(
                f"{source}: dropped {self.unknown_query_ids} qrels line(s) naming unknown "
                f"queries and {self.unknown_corpus_ids} naming unknown documents "
                f"(e.g. {', '.join(self.examples[:5])})"
            )
        if self.duplicate_qrels:
            out.append(
                f"{source}: {self.duplicate_qrels} repeated (query, document) pair(s); "
                "the last score was kept"
            )
        return out


@dataclass
class RetrievalTask:
    """A retrieval task ready to evaluate.

    ``corpus`` maps document id -> {"title", "text"}; ``queries`` holds only the queries that
    have judgements in ``split``; ``qrels`` maps query id -> {document id: graded score}.
    """

    name: str
    split: str
    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: Qrels
    report: LoadReport = field(default_factory=LoadReport)

    def document_texts(self) -> tuple[list[str], list[str]]:
        """(ids, texts) of the corpus, each text ``title + " " + text`` stripped, as MTEB."""
        ids = list(self.corpus)
        return ids, [document_text(self.corpus[i]) for i in ids]

    def query_texts(self) -> tuple[list[str], list[str]]:
        ids = list(self.queries)
        return ids, [self.queries[i] for i in ids]


def document_text(doc: Mapping[str, Any]) -> str:
    """A document as embedded: ``title + " " + text``, stripped (MTEB's convention)."""
    return (str(doc.get("title") or "") + " " + str(doc.get("text") or "")).strip()


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded one by one so that a byte that is not UTF-8
    is named by its line."""
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                yield line_no, raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}:{line_no}: not UTF-8 text ({exc.reason})") from None
    except (OSError, EOFError) as exc:  # a .gz that is not gzip, a truncated archive, ...
        raise ValueError(f"{path}: cannot be read ({exc})") from None


def _find(path: Path) -> Path | None:
    """``path`` or its ``.gz`` twin, whichever exists."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _require_id(obj: dict[str, Any], path: Path, line_no: int) -> str:
    if "_id" not in obj:
        raise ValueError(f"{path}:{line_no}: missing field '_id'")
    return str(obj["_id"])


def load_corpus(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Read a BEIR ``corpus.jsonl``: id -> {"title", "text"}. Duplicate ids are an error."""
    path = Path(path)
    corpus: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for line_no, obj in read_jsonl(path):
        doc_id = _require_id(obj, path, line_no)
        if "text" not in obj:
            raise ValueError(f"{path}:{line_no}: document {doc_id!r} has no 'text'")
        if doc_id in corpus:
            raise ValueError(
                f"{path}:{line_no}: duplicate document id {doc_id!r} (first on line "
                f"{first_line[doc_id]})"
            )
        first_line[doc_id] = line_no
        corpus[doc_id] = {"title": str(obj.get("title") or ""), "text": str(obj.get("text") or "")}
    if not corpus:
        raise ValueError(f"{path}: the corpus is empty")
    return corpus


def load_queries(path: str | os.PathLike) -> dict[str, str]:
    """Read a BEIR ``queries.jsonl``: id -> text. Duplicate ids are an error."""
    path = Path(path)
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line_no, obj in read_jsonl(path):
        query_id = _require_id(obj, path, line_no)
        if "text" not in obj:
            raise ValueError(f"{path}:{line_no}: query {query_id!r} has no 'text'")
        if query_id in queries:
            raise ValueError(
                f"{path}:{line_no}: duplicate query id {query_id!r} (first on line "
                f"{first_line[query_id]})"
            )
        first_line[query_id] = line_no
        queries[query_id] = str(obj["text"])
    if not queries:
        raise ValueError(f"{path}: no queries")
    return queries


def load_qrels(path: str | os.PathLike, report: LoadReport | None = None) -> Qrels:
    """Read a BEIR qrels TSV (``query-id, corpus-id, score``; the header line is optional).

    Scores must be integers (graded relevance). A repeated (query, document) pair keeps the
    last score and is counted in ``report``.
    """
    path = Path(path)
    report = report if report is not None else LoadReport()
    qrels: Qrels = {}
    for line_no, line in _text_lines(path):
        judgement = _judgement(path, line_no, line)
        if judgement is None:
            continue
        query_id, doc_id, grade = judgement
        judged = qrels.setdefault(query_id, {})
        if doc_id in judged:
            report.duplicate_qrels += 1
        judged[doc_id] = grade
    if not qrels:
        raise ValueError(f"{path}: no relevance judgements")
    return qrels


def _judgement(path: Path, line_no: int, line: str) -> tuple[str, str, int] | None:
    """(query id, document id, grade) of a qrels line; None for a blank or header line."""
    row = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE), [])
    if not row or not "".join(row).strip():
        return None
    if line_no == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
        return None
    if len(row) == 4:  # TREC format: qid 0 docid score
        row = [row[0], row[2], row[3]]
    if len(row) != 3:
        raise ValueError(
            f"{path}:{line_no}: expected 3 tab-separated fields (query-id, corpus-id, score), "
            f"got {len(row)}"
        )
    query_id, doc_id, score = (x.strip() for x in row)
    try:
        value = float(score)
    except ValueError:
        raise ValueError(f"{path}:{line_no}: score {score!r} is not a number") from None
    if value != int(value):
        raise ValueError(f"{path}:{line_no}: score {score!r} is not an integer grade")
    return query_id, doc_id, int(value)


def restrict_to_known(
    corpus: Mapping[str, Any], queries: Mapping[str, str], qrels: Qrels, report: LoadReport
) -> tuple[dict[str, str], Qrels]:
    """Drop qrels naming unknown ids (counted in ``report``) and queries without qrels.

    Returns (queries to evaluate, cleaned qrels).
    """
    clean: Qrels = {}
    for query_id, judged in qrels.items():
        if query_id not in queries:
            report.unknown_query_ids += len(judged)
            if len(report.examples) < 10:
                report.examples.append(f"query {query_id!r}")
            continue
        kept = {}
        for doc_id, score in judged.items():
            if doc_id in corpus:
                kept[doc_id] = score
            else:
                report.unknown_corpus_ids += 1
                if len(report.examples) < 10:
                    report.examples.append(f"document {doc_id!r}")
        if kept:
            clean[query_id] = kept
    selected = {q: queries[q] for q in queries if q in clean}
    report.queries_without_qrels = len(queries) - len(selected)
    return selected, clean


def load_beir(directory: str | os.PathLike, split: str = "test") -> RetrievalTask:
    """Load a BEIR-layout directory (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``).

    Raises ``FileNotFoundError`` naming every missing file (and the splits that exist),
    ``ValueError`` for malformed content. Unknown ids in the qrels are dropped with a warning;
    the counts are in ``task.report``.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    corpus_file = _find(root / "corpus.jsonl")
    queries_file = _find(root / "queries.jsonl")
    qrels_file = _find(root / "qrels" / f"{split}.tsv")
    missing = [
        str(p)
        for p, found in (
            (root / "corpus.jsonl", corpus_file),
            (root / "queries.jsonl", queries_file),
            (root / "qrels" / f"{split}.tsv", qrels_file),
        )
        if found is None
    ]
    if missing:
        splits = (
            sorted(p.name.split(".")[0] for p in (root / "qrels").glob("*.tsv*"))
            if (root / "qrels").is_dir()
            else []
        )
        hint = f"; qrels exist for splits: {', '.join(splits)}" if splits else ""
        raise FileNotFoundError(f"{root}: missing {', '.join(missing)}{hint}")
    assert corpus_file and queries_file and qrels_file
    report = LoadReport()
    corpus = load_corpus(corpus_file)
    queries = load_queries(queries_file)
    qrels = load_qrels(qrels_file, report)
    queries, qrels = restrict_to_known(corpus, queries, qrels, report)
    _warn(report, str(qrels_file))
    if not queries:
        raise ValueError(f"{qrels_file}: no judged query is in {queries_file}")
    return RetrievalTask(root.name, split, corpus, queries, qrels, report)


def _warn(report: LoadReport, source: str) -> None:
    for message in report.messages(source):
        logger.warning(message)


def load_hub(
    repo_id: str,
    split: str = "test",
    *,
    revision: str | None = None,
    qrels_repo_id: str | None = None,
) -> RetrievalTask:
    """Load a retrieval task from the Hugging Face Hub with ``datasets`` (needs network).

    MTEB layout: configs ``corpus`` and ``queries`` of ``repo_id`` (BEIR's ``BeIR/<name>`` too),
    qrels in the ``default`` config's ``split`` of ``repo_id`` (MTEB) or of
    ``qrels_repo_id`` (default ``<repo_id>-qrels``, BEIR).
    """
    import datasets

    def load(repo: str, config: str | None, split_name: str | None):
        return datasets.load_dataset(repo, config, split=split_name, revision=revision)

    def one_split(dataset_dict: Any, what: str):
        if isinstance(dataset_dict, datasets.DatasetDict):
            names = list(dataset_dict)
            if len(names) != 1:
                raise ValueError(f"{repo_id} ({what}): expected one split, found {names}")
            return dataset_dict[names[0]]
        return dataset_dict

    corpus_rows = one_split(load(repo_id, "corpus", None), "corpus")
    query_rows = one_split(load(repo_id, "queries", None), "queries")
    qrels_rows = None
    errors = []
    for repo, config in ((repo_id, "default"), (qrels_repo_id or f"{repo_id}-qrels", None)):
        try:
            qrels_rows = load(repo, config, split)
            break
        except Exception as exc:  # datasets raises many types for "not there"
            errors.append(f"{repo}: {exc}")
    if qrels_rows is None:
        raise FileNotFoundError(f"no qrels for split {split!r}: " + " | ".join(errors))
    return task_from_rows(repo_id, split, corpus_rows, query_rows, qrels_rows)


def task_from_rows(name: str, split: str, corpus_rows, query_rows, qrels_rows) -> RetrievalTask:
    """Build a task from iterables of dict rows (Hub datasets, or anything shaped like them).

    Row numbers in errors count from 1 in each table.
    """
    corpus: dict[str, dict[str, str]] = {}
    for n, row in enumerate(corpus_rows, 1):
        doc_id = str(_field(row, "_id", f"{name} corpus row {n}"))
        if doc_id in corpus:
            raise ValueError(f"{name} corpus row {n}: duplicate document id {doc_id!r}")
        corpus[doc_id] = {"title": str(row.get("title") or ""), "text": str(row.get("text") or "")}
    queries: dict[str, str] = {}
    for n, row in enumerate(query_rows, 1):
        query_id = str(_field(row, "_id", f"{name} queries row {n}"))
        if query_id in queries:
            raise ValueError(f"{name} queries row {n}: duplicate query id {query_id!r}")
        queries[query_id] = str(_field(row, "text", f"{name} queries row {n}"))
    if not corpus:
        raise ValueError(f"{name}: the corpus is empty")
    if not queries:
        raise ValueError(f"{name}: no queries")
    report = LoadReport()
    qrels: Qrels = {}
    for n, row in enumerate(qrels_rows, 1):
        where = f"{name} qrels/{split} row {n}"
        query_id = str(_field(row, "query-id", where))
        doc_id = str(_field(row, "corpus-id", where))
        judged = qrels.setdefault(query_id, {})
        if doc_id in judged:
            report.duplicate_qrels += 1
        judged[doc_id] = int(_field(row, "score", where))
    if not qrels:
        raise ValueError(f"{name}: no relevance judgements for split {split!r}")
    queries, qrels = restrict_to_known(corpus, queries, qrels, report)
    _warn(report, f"{name} qrels/{split}")
    if not queries:
        raise ValueError(f"{name}: no judged query of split {split!r} is in the queries")
    return RetrievalTask(name.rsplit("/", 1)[-1], split, corpus, queries, qrels, report)


def _field(row: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise ValueError(f"{where}: missing field {key!r} (fields: {sorted(row)})")
    return row[key]


def load_task(spec: str, split: str = "test") -> RetrievalTask:
    """A BEIR directory if ``spec`` is one, else a Hub dataset id (``owner/name``)."""
    if os.path.isdir(spec):
        return load_beir(spec, split)
    if os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise FileNotFoundError(
            f"{spec}: not a BEIR directory (corpus.jsonl, queries.jsonl, qrels/) "
            "nor a Hugging Face dataset id like 'mteb/scifact'"
        )
    return load_hub(spec, split)
