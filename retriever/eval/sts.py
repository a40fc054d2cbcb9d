"""Semantic textual similarity (STS) evaluation, as MTEB's STS tasks: the Spearman (main score)
and Pearson correlations between the cosine similarity of each pair's embeddings and its gold
score.

Data: JSONL(.gz) with ``sentence1``, ``sentence2`` and ``score`` per line (as
``../shared/data/stsb/test.jsonl``), or a directory holding ``{split}.jsonl``. Both sentences
are embedded as queries (a symmetric task: the query side's prefix, as instruction-tuned
embedders expect).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retriever.data.texts import read_jsonl

logger = logging.getLogger(__name__)


@dataclass
class STSTask:
    name: str
    split: str
    first: list[str]
    second: list[str]
    scores: np.ndarray  # float64 [N]


def sts_path(spec: str | os.PathLike, split: str) -> Path:
    """The JSONL file ``spec`` names: itself, or ``spec/{split}.jsonl(.gz)``."""
    path = Path(spec)
    if path.is_dir():
        for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no {split}.jsonl (an STS task directory needs one)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return path


def is_sts(spec: str | os.PathLike, split: str = "test") -> bool:
    """Whether ``spec`` looks like STS data (its first line has sentence1/sentence2/score)."""
    try:
        path = sts_path(spec, split)
        _, first = next(read_jsonl(path))
    except (FileNotFoundError, StopIteration, ValueError):
        return False
    return {"sentence1", "sentence2", "score"} <= set(first)


def load_sts(spec: str | os.PathLike, split: str = "test") -> STSTask:
    """Read an STS task; a line without a text or a finite numeric score is an error naming it."""
    path = sts_path(spec, split)
    name = path.parent.name if path.name.startswith(split) else path.stem
    records = ((f"{path}:{line_no}", obj) for line_no, obj in read_jsonl(path))
    return sts_from_records(records, name, split, str(path))


def sts_from_records(
    records: Iterable[tuple[str, Mapping[str, Any]]], name: str, split: str = "train",
    where: str | None = None,
) -> STSTask:  # fmt: skip
    """An STS task from ``(where, record)`` pairs with ``sentence1``, ``sentence2`` and
    ``score``; ``where`` names the whole (a file) in messages about it."""
    first, second, scores = [], [], []
    for place, obj in records:
        a, b, score = obj.get("sentence1"), obj.get("sentence2"), obj.get("score")
        if not isinstance(a, str) or not isinstance(b, str) or not a.strip() or not b.strip():
            hint = ""
            if "sentence1" not in obj and {"query", "anchor"} & set(obj):
                hint = (
                    " (this line looks like a retrieval example: give its source task: retrieval)"
                )
            raise ValueError(
                f"{place}: 'sentence1' and 'sentence2' must be non-empty strings{hint}"
            )
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ValueError(f"{place}: 'score' must be a number, got {score!r}")
        if not math.isfinite(score):
            raise ValueError(f"{place}: 'score' must be a finite number, got {score!r}")
        first.append(a)
        second.append(b)
        scores.append(float(score))
    where = where or name
    if len(scores) < 2:
        raise ValueError(f"{where}: an STS task needs at least 2 pairs, found {len(scores)}")
    if len(set(scores)) == 1:
        logger.warning(
            "%s: all %d scores are %g: correlations with them are undefined (nan) and a CoSENT "
            "loss learns nothing from these pairs",
            where, len(scores), scores[0],
        )  # fmt: skip
    return STSTask(name, split, first, second, np.asarray(scores, dtype=np.float64))


def evaluate_sts(encoder: Any, task: STSTask, *, batch_size: int = 64, show_progress: bool = False,
                 dtype: Any = None) -> dict[str, Any]:  # fmt: skip
    """Spearman and Pearson correlations (x 1, not x 100) of cosine similarity with the gold
    scores; ``main_score`` is the Spearman correlation, as in MTEB."""
    from scipy.stats import pearsonr, spearmanr

    start = time.perf_counter()
    texts = list(dict.fromkeys(task.first + task.second))  # each distinct sentence once
    vectors = encoder.encode(texts, "query", batch_size=batch_size, dtype=dtype,
                             show_progress=show_progress).astype(np.float64)  # fmt: skip
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    row = {text: i for i, text in enumerate(texts)}
    a = vectors[[row[t] for t in task.first]]
    b = vectors[[row[t] for t in task.second]]
    cosine = (a * b).sum(axis=1)
    with warnings.catch_warnings():  # constant inputs: nan, and said once (load_sts, below)
        warnings.simplefilter("ignore")
        spearman = float(spearmanr(cosine, task.scores).statistic)
        pearson = float(pearsonr(cosine, task.scores).statistic)
    if np.ptp(cosine) == 0:
        logger.warning("%s: every pair has the same cosine similarity (%g): the model embeds "
                       "all sentences alike; the correlations are undefined (nan)",
                       task.name, cosine[0])  # fmt: skip
    return {
        "task": task.name,
        "split": task.split,
        "task_type": "sts",
        "main_score": spearman,
        "spearman": spearman,
        "pearson": pearson,
        "num_pairs": len(task.scores),
        "seconds": time.perf_counter() - start,
    }
