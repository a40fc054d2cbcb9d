"""Dynamic mining's per-example state (:class:`ExampleState`), and reading the states of a
training set from the file ``retriever mine`` wrote for it.

Line ``n`` of the mined file gives training example ``n`` its state: its negatives
(``neg_ids``, which must name the texts of its ``neg``), their initial scores (``neg_scores``,
when the file has them) and its ranked list (``candidates``). Every id must be one of the
documents of the ``.corpus.jsonl`` beside the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from retriever.mining.files import MiningDataError, read_meta
from retriever.mining.miner import MiningConfig, MiningQuery


@dataclass
class ExampleState:
    """One example's negatives (corpus ids), their initial scores (None until the first pass
    when the mined file had none), its ranked list, the ids it has used and where the next
    replacement search starts in the list."""

    negatives: list[str]
    initial_scores: list[float] | None
    candidates: list[str]
    used: list[str]
    cursor: int

    def next_candidates(self, count: int) -> tuple[list[str], int]:
        """Up to ``count`` unused candidates from the cursor on, and the new cursor."""
        used = set(self.used)
        found, cursor = [], self.cursor
        while len(found) < count and cursor < len(self.candidates):
            candidate = self.candidates[cursor]
            cursor += 1
            if candidate not in used:
                found.append(candidate)
        return found, cursor


def read_mining_config(path: str | os.PathLike) -> MiningConfig:
    """The mining settings recorded in the ``.meta.json`` beside ``path``."""
    meta = read_meta(path)
    try:
        return MiningConfig(**meta["mining"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MiningDataError(f"{path}: the mining settings in its .meta.json: {exc}") from None


def read_states(
    path: str | os.PathLike, examples: Sequence[Any], texts: dict[str, str], range_min: int
) -> tuple[list[ExampleState], list[MiningQuery]]:
    """The state of each of ``examples`` (read from the same file, in order) and its query as
    a refresh searches it; ``texts`` maps the corpus ids the lines may name to their texts."""
    from retriever.eval.data import read_jsonl

    states, queries = [], []
    records = read_jsonl(path)
    for index, example in enumerate(examples):
        line_no, record = next(records, (None, None))
        if record is None:
            raise MiningDataError(
                f"{path}: {len(examples)} training examples but only {index} lines"
            )
        where = f"{path}:{line_no}"
        states.append(_state_from_record(record, example, texts, range_min, where))
        positive_ids = tuple(i for i in record.get("pos_ids") or () if i is not None)
        queries.append(MiningQuery(example.query, example.positives, positive_ids, None, where))
    return states, queries


def _state_from_record(
    record: dict[str, Any], example: Any, texts: dict[str, str], range_min: int, where: str
) -> ExampleState:
    if record.get("query") != example.query:
        raise MiningDataError(
            f"{where}: 'query' differs from the training example read from the same line; "
            "data.train must be the mined file itself"
        )
    for key in ("neg_ids", "candidates"):
        value = record.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MiningDataError(
                f"{where}: field '{key}' must be a list of corpus ids (dynamic mining needs a "
                "file written by `retriever mine`)"
            )
    negatives, candidates = record["neg_ids"], record["candidates"]
    _check_negatives(negatives, example.negatives, texts, where)
    missing = [c for c in candidates if c not in texts]
    if missing:
        raise MiningDataError(
            f"{where}: 'candidates' names {missing[0]!r}, which the .corpus.jsonl lacks"
        )
    scores = _negative_scores(record.get("neg_scores"), len(negatives), where)
    return ExampleState(list(negatives), scores, list(candidates), list(negatives), range_min)


def _check_negatives(
    negatives: list[str], negative_texts: Sequence[str], texts: dict[str, str], where: str
) -> None:
    """That the ids ``negatives`` name the example's ``neg`` texts, one for one."""
    if len(negatives) != len(negative_texts):
        raise MiningDataError(
            f"{where}: 'neg_ids' has {len(negatives)} ids for {len(negative_texts)} 'neg' texts"
        )
    for doc_id, text in zip(negatives, negative_texts):
        if texts.get(doc_id) != text.strip():
            raise MiningDataError(
                f"{where}: 'neg_ids' id {doc_id!r} is not the text in 'neg' (or is missing "
                "from the .corpus.jsonl)"
            )


def _negative_scores(scores: Any, num_negatives: int, where: str) -> list[float] | None:
    """A line's ``neg_scores`` as floats, or None where it has none."""
    if scores is None:
        return None
    if (
        not isinstance(scores, list)
        or len(scores) != num_negatives
        or not all(isinstance(s, (int, float)) for s in scores)
    ):
        raise MiningDataError(f"{where}: 'neg_scores' must be one number per negative")
    return [float(s) for s in scores]


__all__ = ["ExampleState", "read_mining_config", "read_states"]
