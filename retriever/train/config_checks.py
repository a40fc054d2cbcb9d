"""Checks of a whole training configuration, once every value is set: each field's bounds
(its metadata in `train.options`), the required options, and what single values cannot say
(temperature bounds, data.train's sources, eval.metric, mining with negatives, trackers). Every
error names where the value was set (``file.yaml:12`` or the flag)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING

from retriever.train.options import SECTIONS, ConfigError

if TYPE_CHECKING:
    from retriever.train.config import TrainConfig

REQUIRED = {
    "model.name_or_path": "--model",
    "data.train": "--data",
    "training.output_dir": "--output-dir",
}


def suggest(word: str, candidates: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or nothing."""
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_sources(config: TrainConfig) -> None:
    """data.train's sources, parsed now so that a bad entry stops the start before any load."""
    from retriever.train.sources import SourceError, sources_of

    try:
        sources = sources_of(config)
    except SourceError as exc:
        raise ConfigError(str(exc)) from None
    if config.mining.dynamic and (len(sources) > 1 or sources[0].task != "retrieval"):
        raise ConfigError(
            f"{config.where('mining.dynamic')}: mining.dynamic re-mines one retrieval source; "
            "data.train lists several"
        )


def _check_metric(config: TrainConfig) -> None:
    """eval.metric: a metric the evaluators report (retrieval's, or STS's spearman / pearson),
    ``TASK/METRIC`` for one of several tasks, or ``mean_main_score`` (their main scores'
    mean). Task names are checked once the tasks are loaded."""
    from retriever.eval.metrics import metric_names

    names = ["main_score", "spearman", "pearson", *metric_names()]
    metric = config.eval.metric
    name = metric.rsplit("/", 1)[-1]
    if metric != "mean_main_score" and name not in names:
        raise ConfigError(
            f"{config.where('eval.metric')}: eval.metric: {metric!r} is not a metric the "
            f"evaluator reports{suggest(name, names)} (e.g. ndcg_at_10, recall_at_100, "
            "spearman, TASK/ndcg_at_10 with several tasks, or mean_main_score)"
        )


def _expected(f: dataclasses.Field, kind: type) -> str:
    """What the bounds of field ``f`` ask for, in words."""
    meta = f.metadata
    if kind is int:
        low = meta.get("min")
        return "a positive integer" if low == 1 else f"an integer >= {low}"
    if "below" in meta:
        return f"a number in [{meta.get('min', '-inf')}, {meta['below']})"
    return f"a number > {meta['gt']}" if "gt" in meta else f"a number >= {meta['min']}"


def check_bounds(config: TrainConfig) -> None:
    """Every field's bounds (its metadata: ``min``, ``gt``, ``below``), for every section."""
    for section in SECTIONS:
        for f in dataclasses.fields(SECTIONS[section]):
            value = getattr(getattr(config, section), f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # None, "auto", strings, lists: their own checks
            meta = f.metadata
            ok = (
                value >= meta.get("min", float("-inf"))
                and value > meta.get("gt", float("-inf"))
                and value < meta.get("below", float("inf"))
            )
            if not ok:
                kind = int if isinstance(value, int) and "gt" not in meta else float
                key = f"{section}.{f.name}"
                raise ConfigError(
                    f"{config.where(key)}: {key}: expected {_expected(f, kind)}, got {value!r}"
                )


def validate(config: TrainConfig) -> TrainConfig:
    """Bounds and cross-field checks that single values cannot make; errors name where each
    value was set."""
    for key, flag in REQUIRED.items():
        if not config.get(key):
            raise ConfigError(f"{key} is required: set it in the config file or pass {flag}")
    check_bounds(config)
    _check_sources(config)
    loss = config.loss
    if loss.min_temperature > loss.max_temperature:
        raise ConfigError(
            f"{config.where('loss.min_temperature')} / {config.where('loss.max_temperature')}: "
            f"loss.min_temperature ({loss.min_temperature}) is above loss.max_temperature "
            f"({loss.max_temperature})"
        )
    if not loss.min_temperature <= loss.temperature <= loss.max_temperature:
        raise ConfigError(
            f"{config.where('loss.temperature')}: loss.temperature ({loss.temperature}) must lie "
            f"in [loss.min_temperature, loss.max_temperature] = "
            f"[{loss.min_temperature}, {loss.max_temperature}]"
        )
    if config.training.batch_size == 1 and config.data.negatives == 0:
        raise ConfigError(
            f"{config.where('training.batch_size')}: training.batch_size 1 with data.negatives 0 "
            "gives each query its positive as its only candidate: the loss is 0 and nothing is "
            "learned; use a larger batch or hard negatives"
        )
    _check_metric(config)
    if config.mining.dynamic and config.data.negatives == 0:
        raise ConfigError(
            f"{config.where('mining.dynamic')}: mining.dynamic re-mines hard negatives, but "
            "data.negatives is 0 (in-batch negatives only); set data.negatives"
        )
    for tracker in config.training.report_to:
        if tracker not in ("tensorboard", "wandb"):
            raise ConfigError(
                f"{config.where('training.report_to')}: training.report_to: unknown tracker "
                f"{tracker!r} (tensorboard, wandb)"
            )
    return config
