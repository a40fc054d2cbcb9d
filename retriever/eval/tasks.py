"""Any evaluation task, by what its data is: STS pairs (``sentence1``, ``sentence2``, ``score``)
or a retrieval task (a BEIR directory or Hub id), loaded and run through one pair of calls, so
``retriever eval`` and evaluation during training take the same data.

    task = load_any_task("../shared/data/stsb", "test")   # an STSTask
    result = run_task(encoder, task, batch_size=64)      # result["main_score"]: Spearman
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from retriever.eval.data import RetrievalTask, load_task
from retriever.eval.sts import STSTask, is_sts, load_sts


def load_any_task(spec: str | os.PathLike, split: str = "test") -> RetrievalTask | STSTask:
    """STS pairs if ``spec`` is a file (BEIR tasks are directories) or a directory of STS
    splits; else a retrieval task (`eval.data.load_task`). Bad data names its file and line."""
    if Path(spec).is_file() or is_sts(spec, split):
        return load_sts(spec, split)
    return load_task(str(spec), split)


def run_task(encoder: Any, task: RetrievalTask | STSTask, **options: Any) -> dict[str, Any]:
    """Evaluate ``task``; ``options`` are `evaluate_task`'s (an STS task uses ``batch_size``,
    ``dtype`` and ``show_progress`` of them)."""
    if isinstance(task, STSTask):
        from retriever.eval.sts import evaluate_sts

        keep = ("batch_size", "dtype", "show_progress")
        return evaluate_sts(encoder, task, **{k: v for k, v in options.items() if k in keep})
    from retriever.eval.evaluator import evaluate_task

    return evaluate_task(encoder, task, **options)
