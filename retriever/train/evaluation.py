"""Evaluation during training: the tasks of ``eval.data`` loaded and checked at the start, run
on the main process, ``best/`` replaced (whole) when ``eval.metric`` improves, the scores
shared with every process and logged."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retriever.eval.subset import shrink_task
from retriever.fileio import atomic_directory
from retriever.train.config import ConfigError, TrainConfig


def load_eval_tasks(config: TrainConfig, given: Any = None) -> list[Any]:
    """The tasks of ``eval.data`` and those a script ``given`` (a task, a list, or a dict of
    name -> task; retrieval tasks shrunk as ``eval.max_*`` say, STS sets whole), and a check
    that ``eval.metric`` names a score they report; errors name the option."""
    from retriever.eval.data import RetrievalTask

    tasks = _configured_tasks(config)
    tasks += _given_tasks(given, {task.name for task in tasks})
    e = config.eval
    tasks = [shrink_task(task, e.max_queries, e.max_documents)
             if isinstance(task, RetrievalTask) else task for task in tasks]  # fmt: skip
    _default_metric(config, tasks)
    _check_metric_task(config, tasks)
    return tasks


def _given_tasks(given: Any, taken: set[str]) -> list[Any]:
    """Tasks passed as ``Trainer(eval_datasets=...)``, named by their dict keys if a dict."""
    from retriever.eval.data import RetrievalTask
    from retriever.eval.sts import STSTask

    if given is None:
        return []
    named = given.items() if isinstance(given, dict) else [(None, t) for t in _as_list(given)]
    tasks = []
    for name, task in named:
        if not isinstance(task, (RetrievalTask, STSTask)):
            raise ConfigError(
                "Trainer(eval_datasets=...): expected retrieval or STS tasks (retriever.eval."
                f"load_task, retriever.eval.sts.load_sts), got {type(task).__name__}"
            )
        task = dataclasses.replace(task, name=str(name)) if name is not None else task
        if task.name in taken:
            raise ConfigError(
                f"Trainer(eval_datasets=...): two evaluation tasks are named {task.name!r}; "
                "pass a dict of name -> task to tell them apart"
            )
        taken.add(task.name)
        tasks.append(task)
    return tasks


def _as_list(given: Any) -> list[Any]:
    return list(given) if isinstance(given, (list, tuple)) else [given]


def _configured_tasks(config: TrainConfig) -> list[Any]:
    """The tasks of ``eval.data``, loaded and named apart."""
    from retriever.eval.tasks import load_any_task

    specs = [config.eval.data] if isinstance(config.eval.data, str) else config.eval.data or []
    tasks = []
    for i, spec in enumerate(specs):
        key = "eval.data" if isinstance(config.eval.data, str) else f"eval.data[{i}]"
        try:
            tasks.append(load_any_task(spec, config.eval.split))
        except (FileNotFoundError, ValueError, OSError) as exc:
            # A BEIR directory without that split's qrels: the split is what to change.
            if isinstance(exc, FileNotFoundError) and f"qrels/{config.eval.split}.tsv" in str(exc):
                key = "eval.split"
            raise ConfigError(f"{config.where(key)}: {key}: {exc}") from None
    _name_uniquely(config, tasks, specs)
    return tasks


def _name_uniquely(config: TrainConfig, tasks: list[Any], specs: list[str]) -> None:
    """Tasks whose folders share a name (``v1/scifact``, ``v2/scifact``) are named by as much of
    their path as tells them apart: each task's scores are logged under its name."""
    names = [task.name for task in tasks]
    clashing = {name for name in names if names.count(name) > 1}
    if not clashing:
        return
    parts = [Path(str(spec).rstrip("/")).parts for spec in specs]
    for depth in range(2, max(map(len, parts)) + 1):
        longer = ["/".join(p[-depth:]) if n in clashing else n for p, n in zip(parts, names)]
        if len(set(longer)) == len(longer):
            for task, name in zip(tasks, longer):
                task.name = name
            return
    first = names.index(next(iter(clashing)))
    again = names.index(names[first], first + 1)
    raise ConfigError(
        f"{config.where(f'eval.data[{again}]')}: eval.data[{again}]: the same task as "
        f"eval.data[{first}] ({specs[first]}); list each task once"
    )


def _default_metric(config: TrainConfig, tasks: list[Any]) -> None:
    """eval.metric left at its default picks what the tasks report: nDCG@10 of one retrieval
    task, the main score (Spearman) of one STS task, the mean of the main scores of several."""
    from retriever.eval.sts import STSTask

    if not tasks or config.where("eval.metric") != "default":
        return
    if len(tasks) > 1:
        config.eval.metric = "mean_main_score"
    elif isinstance(tasks[0], STSTask):
        config.eval.metric = "main_score"


def _check_metric_task(config: TrainConfig, tasks: list[Any]) -> None:
    """eval.metric must be a score of the tasks loaded: ``TASK/METRIC`` of one of them, or a
    plain metric of the only one, or ``mean_main_score``."""
    from retriever.eval.metrics import metric_names
    from retriever.eval.sts import STSTask

    metric, by_name = config.eval.metric, {t.name: t for t in tasks}
    where = config.where("eval.metric")
    if not tasks or metric == "mean_main_score":
        return
    if "/" in metric:
        name, score = metric.rsplit("/", 1)
        if name not in by_name:
            raise ConfigError(
                f"{where}: eval.metric: {metric!r} names no evaluation task (tasks: "
                f"{', '.join(by_name)})"
            )
        task = by_name[name]
    elif len(tasks) > 1:
        raise ConfigError(
            f"{where}: eval.metric: {metric!r} is ambiguous with {len(tasks)} tasks; use "
            f"TASK/METRIC (e.g. {tasks[0].name}/main_score) or mean_main_score"
        )
    else:
        task, score = tasks[0], metric
    reported = (
        ["main_score", "spearman", "pearson"]
        if isinstance(task, STSTask)
        else ["main_score", *metric_names()]
    )
    if score not in reported:
        kind = "an STS" if isinstance(task, STSTask) else "a retrieval"
        raise ConfigError(
            f"{where}: eval.metric: {task.name} is {kind} task, which does not report "
            f"{score!r} (e.g. {', '.join(reported[:3])})"
        )


def evaluate_step(
    acc: Any,
    encoder: Any,
    tasks: list[Any],
    config: Any,
    state: Any,
    output_dir: Path,
    sharding: Any = None,
    card: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """Scores of ``encoder`` on every task at ``state.step`` (numbers only; with several tasks
    ``TASK/METRIC`` keys and ``mean_main_score``); updates the best metric and step in
    ``state`` and keeps ``best/`` (with ``card(record)`` as its README.md model card). The
    main process evaluates; with a sharded network (`train.sharding`) every process does,
    since its forwards are collective."""
    from accelerate.utils import broadcast_object_list

    metric = config.eval.metric
    result: list[Any] = [None]
    if acc.is_main_process or sharding is not None:
        show = acc.is_local_main_process
        scores, details = score_tasks(
            encoder, tasks, config.eval.batch_size, config.eval.index, show_progress=show
        )
        result = [scores]
    result = broadcast_object_list(result) if acc.num_processes > 1 else result
    scores = result[0]
    record = {"step": state.step, **scores}
    if state.best_metric is None or scores[metric] > state.best_metric:
        whole = sharding.whole_encoder(acc.is_main_process) if sharding else encoder
        if acc.is_main_process:
            with atomic_directory(output_dir / "best") as best:
                whole.save(best)
                text = json.dumps({"step": state.step, **details}, indent=2, default=str)
                (best / "eval.json").write_text(text + "\n", encoding="utf-8")
                if card is not None:
                    (best / "README.md").write_text(card(record), encoding="utf-8")
        state.best_metric, state.best_step = scores[metric], state.step
    state.evaluated_step = state.step
    acc.log({f"eval/{k}": v for k, v in scores.items()}, step=state.step)
    acc.print(f"eval at step {state.step}: {metric} = {scores[metric]:.4f} ({_sizes(scores)})")
    return record


def score_tasks(
    encoder: Any,
    tasks: list[Any],
    batch_size: int,
    index: str = "flat",
    show_progress: bool = False,
) -> tuple[dict, dict]:
    """(numeric scores, full results): one task's keys as they are; several tasks' prefixed
    with the task's name, plus the mean of their main scores. ``show_progress``: a progress bar
    for each task's encoding."""
    from retriever.eval.tasks import run_task

    results = {}
    for task in tasks:
        results[task.name] = run_task(
            encoder, task, batch_size=batch_size, index=index, show_progress=show_progress
        )
    numeric = {name: _numbers(r) for name, r in results.items()}
    if len(tasks) == 1:
        (only,) = numeric.values()
        return {**only, "mean_main_score": only["main_score"]}, next(iter(results.values()))
    scores = {f"{name}/{k}": v for name, r in numeric.items() for k, v in r.items()}
    scores["mean_main_score"] = sum(r["main_score"] for r in numeric.values()) / len(numeric)
    return scores, results


def _numbers(result: dict[str, Any]) -> dict[str, float]:
    return {
        k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _sizes(scores: dict[str, Any]) -> str:
    if "num_queries" in scores:
        return f"{scores['num_queries']} queries, {scores.get('num_documents')} documents"
    return ", ".join(f"{k}={v:.4f}" for k, v in scores.items() if k.endswith("main_score"))


def last_evaluation(output_dir: Path) -> dict[str, Any] | None:
    """The newest eval.jsonl record (also when an earlier process of this run wrote it)."""
    path = Path(output_dir) / "eval.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else None


def describe_progress(
    evaluations: list[dict[str, Any]], metric: str, state: Any, best: Path
) -> str:
    """The first and last evaluation of this process's run, and the best one (whose best/ is
    in the run this one resumed from when that run reached it and this one never beat it)."""
    first, last = evaluations[0], evaluations[-1]
    kept = f"saved in {best}" if best.is_dir() else "saved in best/ of the run this one resumed"
    return (
        f"{metric}: {first[metric]:.4f} at step {first['step']} -> "
        f"{last[metric]:.4f} at step {last['step']} (best {state.best_metric:.4f} at "
        f"step {state.best_step}, {kept})"
    )
