"""What mining reads and writes.

Inputs (:func:`load_queries`, :func:`load_corpus`):

* training queries: a BEIR directory (queries judged in a qrels split, positives the documents
  with score > 0, known by id) or a training JSONL file (``query``, ``pos``; positives known by
  text, and by id where the text is in the corpus);
* the corpus: a BEIR directory or its ``corpus.jsonl`` (``_id``, ``title``, ``text``), or a
  training JSONL file, whose positives and negatives are the documents (id: a hash of the text).

Output, for ``mined.jsonl``:

* ``mined.jsonl``: one line per query in the training format (``query``, ``pos``, ``neg``) plus
  ``pos_scores``, ``neg_scores``, ``pos_ids``, ``neg_ids``, ``candidates`` (the ranked list's
  corpus ids, rank 0 first), ``candidate_scores`` and ``query_id`` (BEIR input) or ``source``;
* ``mined.corpus.jsonl``: every document named in ``candidates``, as BEIR corpus lines, so that
  dynamic mining can turn ids back into texts without the original corpus;
* ``mined.meta.json``: the settings, model, inputs, counts and timings.

All three are written under temporary names and renamed at the end, so an interrupted run never
leaves a half-written file where a finished one was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from retriever.fileio import file_hash
from retriever.mining.miner import Corpus, MinedExample, MiningQuery


class MiningDataError(ValueError):
    """Bad mining input; the message names the file and line (or query) at fault."""


def sidecar_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """(corpus file, meta file) written beside ``output``: ``x.jsonl`` -> ``x.corpus.jsonl``,
    ``x.meta.json``."""
    output = Path(output)
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(f"{stem}.corpus.jsonl"), output.with_name(f"{stem}.meta.json")


def output_paths(output: str | os.PathLike) -> list[Path]:
    return [Path(output), *sidecar_paths(output)]


def text_hash_id(text: str) -> str:
    """The corpus id of a text read from a training file (stable across runs)."""
    from retriever.data.texts import text_id

    return f"t{text_id(text.strip()) & 0xFFFFFFFFFFFFFFFF:016x}"


def _is_beir_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("corpus.jsonl", "corpus.jsonl.gz"))


# --------------------------------------------------------------------------- inputs


def load_queries(data: str | os.PathLike, split: str = "train") -> list[MiningQuery]:
    """Training queries from a BEIR directory (``split``'s qrels) or a training JSONL file."""
    path = Path(data)
    if path.is_dir():
        return _beir_queries(path, split)
    if not path.is_file():
        raise MiningDataError(f"--data: {path}: no such file or directory")
    from retriever.data.examples import DataError, read_jsonl_examples

    try:
        examples = read_jsonl_examples(path)
    except DataError as exc:
        raise MiningDataError(str(exc)) from None
    return [MiningQuery(e.query, e.positives, source=e.source) for e in examples]


def _beir_queries(root: Path, split: str) -> list[MiningQuery]:
    from retriever.eval.data import document_text, load_beir

    try:
        task = load_beir(root, split)
    except (FileNotFoundError, ValueError) as exc:
        raise MiningDataError(str(exc)) from None
    queries = []
    for query_id, text in task.queries.items():
        ids = [d for d, score in task.qrels[query_id].items() if score > 0]
        texts = [document_text(task.corpus[d]) for d in ids]
        if not ids or not text.strip():
            continue  # judged non-relevant only: nothing to mine against
        source = f"{root}/qrels/{split}.tsv query {query_id}"
        queries.append(MiningQuery(text, tuple(texts), tuple(ids), query_id, source))
    if not queries:
        raise MiningDataError(f"{root}/qrels/{split}.tsv: no query has a positive (score > 0)")
    return queries


def load_corpus(spec: str | os.PathLike) -> Corpus:
    """A BEIR directory, a BEIR ``corpus.jsonl``, or a training JSONL file (its texts)."""
    from retriever.eval.data import document_text, read_jsonl
    from retriever.eval.data import load_corpus as load_beir_corpus

    path = Path(spec)
    if path.is_dir():
        found = [path / n for n in ("corpus.jsonl", "corpus.jsonl.gz") if (path / n).is_file()]
        if not found:
            raise MiningDataError(f"--corpus: {path}: a directory without corpus.jsonl")
        path = found[0]
    elif not path.is_file():
        raise MiningDataError(f"--corpus: {path}: no such file or directory")
    try:
        first = next(read_jsonl(path), None)
        if first is None:
            raise MiningDataError(f"{path}: the corpus file is empty")
        line_no, record = first
        if "_id" in record:
            docs = load_beir_corpus(path)
            return Corpus(list(docs), [document_text(d) for d in docs.values()])
        if any(k in record for k in ("query", "anchor")):
            return corpus_from_training_file(path)
    except ValueError as exc:
        if isinstance(exc, MiningDataError):
            raise
        raise MiningDataError(str(exc)) from None
    raise MiningDataError(
        f"{path}:{line_no}: neither a corpus line (fields _id, title, text) nor a training line "
        f"(query, pos, neg); found fields {sorted(record)}"
    )


def corpus_from_training_file(path: str | os.PathLike) -> Corpus:
    """Every distinct positive and negative text of a training JSONL file, in order."""
    from retriever.data.examples import DataError, read_jsonl_examples

    try:
        examples = read_jsonl_examples(path)
    except DataError as exc:
        raise MiningDataError(str(exc)) from None
    texts = dict.fromkeys(t.strip() for e in examples for t in (*e.positives, *e.negatives))
    return Corpus([text_hash_id(t) for t in texts], list(texts))


def default_corpus(data: str | os.PathLike) -> Corpus:
    """The corpus of ``--data``: a BEIR directory's own, or a training file's texts."""
    path = Path(data)
    return load_corpus(path) if _is_beir_dir(path) else corpus_from_training_file(path)


# --------------------------------------------------------------------------- output


def _round(values: Iterable[float]) -> list[float]:
    return [round(float(v), 6) for v in values]


def record_of(example: MinedExample, corpus: Corpus) -> dict[str, Any]:
    """The output line of one mined query."""
    query = example.query
    positive_ids = list(query.positive_ids) or [
        corpus.ids[corpus.position_of_text[p.strip()]]
        if p.strip() in corpus.position_of_text
        else None
        for p in query.positives
    ]
    record: dict[str, Any] = {"query": query.query}
    if query.query_id is not None:
        record["query_id"] = query.query_id
    else:
        record["source"] = query.source
    record.update(
        {
            "pos": list(query.positives),
            "neg": [corpus.texts[i] for i in example.negatives],
            "pos_scores": _round(example.positive_scores),
            "neg_scores": _round(example.negative_scores),
            "pos_ids": positive_ids,
            "neg_ids": [corpus.ids[i] for i in example.negatives],
            "candidates": [corpus.ids[i] for i in example.candidates],
            "candidate_scores": _round(example.candidate_scores),
        }
    )
    return record


class MinedWriter:
    """Streams mined queries to ``output`` and its sidecars; use as a context manager. The
    files appear under their names only when the block ends without an error."""

    def __init__(self, output: str | os.PathLike, corpus: Corpus, *, overwrite: bool = False):
        if str(output).endswith(".gz"):
            raise ValueError(f"--output {output}: write a plain .jsonl file (gzip it afterwards)")
        self.paths = output_paths(output)
        existing = [str(p) for p in self.paths if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{', '.join(existing)} exist(s); pass --overwrite to replace")
        self.corpus = corpus
        self.referenced: set[int] = set()
        self.count = 0
        self._tmp = [p.with_name(p.name + ".partial") for p in self.paths]
        for stale in self._tmp:  # what a killed run of the same command left
            stale.unlink(missing_ok=True)
        self._file: IO[str] | None = None

    def __enter__(self) -> MinedWriter:
        self.paths[0].parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp[0], "w", encoding="utf-8")
        return self

    def write(self, example: MinedExample) -> None:
        assert self._file is not None, "use MinedWriter as a context manager"
        self._file.write(json.dumps(record_of(example, self.corpus), ensure_ascii=False) + "\n")
        self.referenced.update(example.candidates)
        self.count += 1

    def finish(self, meta: dict[str, Any]) -> None:
        """Write the sidecars and move the three files into place."""
        assert self._file is not None
        self._file.close()
        with open(self._tmp[1], "w", encoding="utf-8") as f:
            for position in sorted(self.referenced):
                doc_id, text = self.corpus.ids[position], self.corpus.texts[position]
                line = {"_id": doc_id, "title": "", "text": text}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        # The meta file records what the other two hold and is renamed last: a kill between
        # the renames leaves files that disagree with it, which readers detect.
        meta["files"] = {
            path.name: {"size": tmp.stat().st_size, "xxh3_128": file_hash(tmp)}
            for tmp, path in zip(self._tmp[:2], self.paths[:2])
        }
        self._tmp[2].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for tmp, path in zip(self._tmp, self.paths):
            os.replace(tmp, path)
        self._file = None

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self._file is not None:  # not finished: an error, or finish() was never called
            self._file.close()
            for tmp in self._tmp:
                tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reading back


def read_meta(mined: str | os.PathLike) -> dict[str, Any]:
    _, meta_path = sidecar_paths(mined)
    if not meta_path.is_file():
        raise MiningDataError(
            f"{meta_path}: missing; dynamic mining needs the files `retriever mine` writes "
            f"beside {mined}"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MiningDataError(f"{meta_path}: not valid JSON ({exc})") from None
    for name, expected in (meta.get("files") or {}).items():
        path = meta_path.parent / name
        if not path.is_file() or path.stat().st_size != expected.get("size"):
            raise MiningDataError(
                f"{path}: does not match {meta_path} (written by another `retriever mine`, or "
                "an interrupted --overwrite); mine it again"
            )
    return meta


def read_candidate_corpus(mined: str | os.PathLike) -> Corpus:
    """The documents named in a mined file's candidate lists (its ``.corpus.jsonl``)."""
    corpus_path, _ = sidecar_paths(mined)
    if not corpus_path.is_file():
        raise MiningDataError(
            f"{corpus_path}: missing; dynamic mining needs the files `retriever mine` writes "
            f"beside {mined}"
        )
    return load_corpus(corpus_path)


__all__ = [
    "MinedWriter",
    "MiningDataError",
    "corpus_from_training_file",
    "default_corpus",
    "load_corpus",
    "load_queries",
    "output_paths",
    "read_candidate_corpus",
    "read_meta",
    "record_of",
    "sidecar_paths",
    "text_hash_id",
]
