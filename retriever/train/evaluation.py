"""Evaluation during training: the task on the main process, ``best/`` replaced (whole) when
``eval.metric`` improves, the scores shared with every process and logged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retriever.fileio import atomic_directory


def evaluate_step(
    acc: Any, encoder: Any, task: Any, config: Any, state: Any, output_dir: Path
) -> dict:
    """Scores of ``encoder`` on ``task`` at ``state.step`` (numbers only); updates the best
    metric and step in ``state`` and keeps ``best/``."""
    from accelerate.utils import broadcast_object_list

    from retriever.eval.evaluator import evaluate_task

    metric = config.eval.metric
    result: list[Any] = [None]
    if acc.is_main_process:
        scores = evaluate_task(
            encoder, task, batch_size=config.eval.batch_size, show_progress=False
        )
        result = [{k: v for k, v in scores.items() if isinstance(v, (int, float))}]
        if state.best_metric is None or result[0][metric] > state.best_metric:
            with atomic_directory(output_dir / "best") as best:
                encoder.save(best)
                text = json.dumps({"step": state.step, **scores}, indent=2, default=str)
                (best / "eval.json").write_text(text + "\n", encoding="utf-8")
    result = broadcast_object_list(result) if acc.num_processes > 1 else result
    scores = result[0]
    if state.best_metric is None or scores[metric] > state.best_metric:
        state.best_metric, state.best_step = scores[metric], state.step
    state.evaluated_step = state.step
    acc.log({f"eval/{k}": v for k, v in scores.items()}, step=state.step)
    acc.print(
        f"eval at step {state.step}: {metric} = {scores[metric]:.4f} "
        f"({scores.get('num_queries')} queries, {scores.get('num_documents')} documents)"
    )
    return {"step": state.step, **scores}
