"""Checks of a whole training configuration, once every value is set: each field's bounds
(its metadata in `train.options`), the required options, and what single values cannot say
(temperature bounds, data.train's sources, eval.metric, mining with negatives, trackers). Every
error names where the value was set (``file.yaml:12`` or the flag)."""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from retriever.train.options import SECTIONS, ConfigError

if TYPE_CHECKING:
    from retriever.train.config import TrainConfig

logger = logging.getLogger(__name__)

REQUIRED = {
    "model.name_or_path": "--model",
    "data.train": "--data",
    "training.output_dir": "--output-dir",
}


def suggest(word: str, candidates: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or nothing."""
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_sources(config: TrainConfig, sources: list | None) -> list | None:
    """data.train's sources (or those a script passed), parsed now so that a bad entry stops
    the start before any load; None when neither is known yet."""
    from retriever.train.sources import SourceError, sources_of

    if sources is None and config.data.train is None:
        return None
    try:
        sources = sources_of(config) if sources is None else sources
    except SourceError as exc:
        raise ConfigError(str(exc)) from None
    where = config.where
    if any(s.streaming for s in sources) and config.training.max_steps is None:
        raise ConfigError(
            f"{where('training.max_steps')}: training.max_steps is required with a streamed "
            "source (data.streaming, or a stream passed to the Trainer): a stream's length is "
            "not known in advance"
        )
    for option, value, what in (
        ("mining.dynamic", config.mining.dynamic, "re-mines examples held in memory"),
        ("loss.objective", config.loss.objective == "gcl", "keeps a state per example"),
    ):
        if value and any(s.streaming for s in sources):
            raise ConfigError(
                f"{where(option)}: {option} {what}: it cannot train on a streamed source "
                "(set data.streaming: false)"
            )
    if any(s.streaming and s.task == "sts" for s in sources):
        raise ConfigError(
            f"{where('data.train')}: data.train: an sts source is read whole (set its "
            "streaming: false); streams carry retrieval examples"
        )
    if config.mining.dynamic and (len(sources) > 1 or sources[0].task != "retrieval"):
        raise ConfigError(
            f"{config.where('mining.dynamic')}: mining.dynamic re-mines one retrieval source; "
            "data.train lists several"
        )
    if all(source.loss_weight == 0 for source in sources):
        raise ConfigError(
            f"{config.where('data.train')}: data.train: every source has loss_weight 0, so the "
            "loss is 0 and nothing would be trained; give at least one source a loss_weight "
            "> 0 (or leave it unset: its share of the batch)"
        )
    return sources


def _check_model(config: TrainConfig, sources: list) -> None:
    """Templates, instructions and LoRA options, checked before anything loads."""
    from retriever.model.settings import template_prefix

    m, where = config.model, config.where
    for side in ("query", "document"):
        template, prefix = getattr(m, f"{side}_template"), getattr(m, f"{side}_prefix")
        key = f"model.{side}_template"
        if template is not None and prefix is not None:
            raise ConfigError(
                f"{where(key)}: {key} and model.{side}_prefix both set; a template "
                "replaces the prefix, keep one"
            )
        if side == "document" and template is not None and "{instruction}" in template:
            raise ConfigError(
                f"{where(key)}: {key}: documents take no instruction; {{instruction}} goes in "
                "model.query_template only"
            )
        try:
            if template is not None:  # its form; which instruction fills it is checked below
                template_prefix(template, "")
        except ValueError as exc:
            raise ConfigError(f"{where(key)}: {key}: {exc}") from None
    has_slot = m.query_template is not None and "{instruction}" in m.query_template
    if m.instruction is not None and not has_slot:
        raise ConfigError(
            f"{where('model.instruction')}: model.instruction needs a model.query_template "
            "with an {instruction} (where it goes), e.g. 'Instruct: {instruction}\\nQuery: "
            "{text}'"
        )
    if has_slot and m.instruction is None:
        raise ConfigError(
            f"{where('model.query_template')}: model.query_template has an {{instruction}} but "
            "model.instruction is not set (it fills the saved model's query prompt; a source's "
            "own instruction replaces it for that source's queries)"
        )
    for i, source in enumerate(sources):
        if source.instruction is not None and not has_slot:
            raise ConfigError(
                f"{where(f'data.train[{i}]')}: data.train[{i}]: instruction "
                "needs a model.query_template with an {instruction} (where it goes)"
            )
        if source.instruction is not None and source.query_prefix is not None:
            raise ConfigError(
                f"{where(f'data.train[{i}]')}: data.train[{i}]: instruction and "
                "query_prefix both set; keep one"
            )
    _check_lora(config)


def _check_lora(config: TrainConfig) -> None:
    from retriever.model.lora import LORA_KEYS

    lora, where = config.model.lora, config.where("model.lora")
    if lora is None:
        if config.model.save_adapter:
            raise ConfigError(
                f"{config.where('model.save_adapter')}: model.save_adapter "
                "saves LoRA adapters, but model.lora is not set"
            )
        return
    for key, value in lora.items():
        if key not in LORA_KEYS:
            raise ConfigError(
                f"{where}: model.lora: unknown key {key!r}"
                f"{suggest(key, list(LORA_KEYS))}; keys are {', '.join(LORA_KEYS)}"
            )
        if isinstance(value, bool) or not isinstance(value, LORA_KEYS[key]):
            raise ConfigError(f"{where}: model.lora: {key}: got {value!r}, of the wrong type")
    bad = lora.get("r", 8) < 1 or lora.get("alpha", 1) <= 0 or not 0 <= lora.get("dropout", 0) < 1
    if bad:
        raise ConfigError(
            f"{where}: model.lora: expected r >= 1, alpha > 0 and dropout in [0, 1), got {lora}"
        )
    modules = lora.get("target_modules", "all-linear")
    if isinstance(modules, list) and not (modules and all(isinstance(x, str) for x in modules)):
        raise ConfigError(
            f"{where}: model.lora: target_modules: expected module names "
            f"(e.g. [q_proj, v_proj]) or all-linear, got {modules!r}"
        )


def check_fsdp(config: TrainConfig) -> None:
    """What a sharded network cannot do (`train.sharding`)."""
    if not config.training.fsdp:
        return
    where = config.where("training.fsdp")
    if config.model.dtype == "bfloat16":
        raise ConfigError(
            f"{where}: training.fsdp keeps fp32 shards and computes in bf16 itself: use "
            "model.dtype: float32 with training.mixed_precision: bf16 (or auto)"
        )
    if config.mining.dynamic:
        raise ConfigError(
            f"{where}: training.fsdp with mining.dynamic: re-mining embeds a different part of "
            "the corpus on each process, which a sharded (collective) forward cannot; mine "
            "before training (retriever mine) instead"
        )


def check_padding_free(config: TrainConfig) -> None:
    """What padding-free chunks (model.padding_free) ask of the other options."""
    m, t, where = config.model, config.training, config.where
    if m.padding_free is False and t.chunk_tokens is not None:
        raise ConfigError(
            f"{where('training.chunk_tokens')}: training.chunk_tokens sizes padding-free chunks, "
            "but model.padding_free is false (padded chunks count texts: training.chunk_size)"
        )
    if m.compile not in (None, "off") and m.padding_free is False:
        raise ConfigError(
            f"{where('model.compile')}: model.compile compiles the layers for padding-free "
            "chunks; set model.padding_free: true (or model.compile: off)"
        )
    if m.compile not in (None, "off") and m.gradient_checkpointing:
        raise ConfigError(
            f"{where('model.compile')}: model.compile with model.gradient_checkpointing: the "
            "checkpointed recomputation runs outside the compiled graphs; choose one"
        )


LOSS_OPTIONS = ("directions", "partition_mode", "hardness_mode", "hardness_strength",
                "false_negative_margin", "debias", "label_smoothing")  # fmt: skip


def check_loss_options(config: TrainConfig) -> None:
    """InfoNCE's options (loss.directions, ...): what they ask of each other and of
    loss.objective, with the loss's own checks (`retriever.loss.objective`)."""
    from retriever.loss.objective import make_objective

    loss, where = config.loss, config.where
    options = {name: getattr(loss, name) for name in LOSS_OPTIONS}
    defaults = {f.name: f.default for f in dataclasses.fields(loss) if f.name in LOSS_OPTIONS}
    changed = [name for name in LOSS_OPTIONS if options[name] != defaults[name]]
    if changed and loss.objective != "infonce":
        key = f"loss.{changed[0]}"
        raise ConfigError(
            f"{where(key)}: {key} is an option of loss.objective infonce (docs/objectives.md, "
            f"Loss options); loss.objective is {loss.objective}"
        )
    try:
        make_objective(symmetric=loss.symmetric, **options)
    except ValueError as exc:
        named = next((n for n in LOSS_OPTIONS if n in str(exc)), "symmetric")
        key = f"loss.{named}"
        raise ConfigError(f"{where(key)}: {key}: {exc}") from None


def _check_objective(config: TrainConfig, sources: list) -> None:
    """What the loss options ask of each other and of the data."""
    loss, where = config.loss, config.where
    dims, weights = loss.matryoshka_dims, loss.matryoshka_weights
    if dims is not None:
        if not dims or min(dims) < 1 or len(set(dims)) != len(dims):
            raise ConfigError(
                f"{where('loss.matryoshka_dims')}: loss.matryoshka_dims: expected distinct "
                f"positive sizes, got {dims}"
            )
        if loss.objective == "gcl":
            raise ConfigError(
                f"{where('loss.matryoshka_dims')}: loss.matryoshka_dims cannot combine with "
                "loss.objective gcl (its per-example averages would move once per dimension)"
            )
    if weights is not None and (dims is None or len(weights) != len(dims) or min(weights) < 0):
        raise ConfigError(
            f"{where('loss.matryoshka_weights')}: loss.matryoshka_weights: expected one weight "
            f">= 0 per loss.matryoshka_dims entry ({dims}), got {weights}"
        )
    if loss.distill_weight > 0:
        if config.mining.dynamic:
            raise ConfigError(
                f"{where('loss.distill_weight')}: loss.distill_weight distils fixed teacher "
                "scores, but mining.dynamic replaces the negatives they score"
            )
        if sources is not None and not any(
            s.task == "retrieval" and s.negatives > 0 for s in sources
        ):
            raise ConfigError(
                f"{where('loss.distill_weight')}: loss.distill_weight compares the teacher's and "
                "the model's scores of each query's positive and hard negatives, but no source "
                "has hard negatives (data.negatives)"
            )
    if loss.objective == "sigmoid" and loss.symmetric:
        raise ConfigError(
            f"{where('loss.symmetric')}: loss.symmetric: the sigmoid loss already scores every "
            "pair once in both roles; set it to false"
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


# option -> (whether this config uses it, what would use it)
_USED_ONLY_WITH: dict[str, tuple[Callable[[TrainConfig, list], bool], str]] = {
    "loss.gcl_gamma_min": (lambda c, s: c.loss.objective == "gcl", "loss.objective: gcl"),
    "loss.gcl_decay_steps": (lambda c, s: c.loss.objective == "gcl", "loss.objective: gcl"),
    "loss.sigmoid_bias": (lambda c, s: c.loss.objective == "sigmoid", "loss.objective: sigmoid"),
    "loss.teacher_temperature": (lambda c, s: c.loss.distill_weight > 0, "loss.distill_weight > 0"),
    "loss.cosent_scale": (
        lambda c, s: any(x.task == "sts" for x in s),
        "a data.train source with task: sts",
    ),
    "training.save_total_limit": (
        lambda c, s: c.training.save_checkpoints,
        "training.save_checkpoints: true",
    ),
    "training.memory_gb": (
        lambda c, s: "auto" in (c.training.chunk_size, c.training.embed_chunk_size),
        "training.chunk_size or training.embed_chunk_size: auto",
    ),
    **{
        f"mining.{f.name}": (lambda c, s: c.mining.dynamic, "mining.dynamic: true")
        for f in dataclasses.fields(SECTIONS["mining"])
        if f.name != "dynamic"
    },
    **{
        f"eval.{f.name}": (lambda c, s: bool(c.eval.data), "eval.data")
        for f in dataclasses.fields(SECTIONS["eval"])
        if f.name != "data"
    },
}


def warn_unused(config: TrainConfig, sources: list, eval_given: bool = False) -> list[str]:
    """Warn of each option set (in the file or on the command line) that this configuration
    never reads (``eval_given``: a script passed evaluation tasks); returns the warnings."""
    said = []
    for key, (used, user) in _USED_ONLY_WITH.items():
        if eval_given and key.startswith("eval."):
            continue
        if key in config.sources and not used(config, sources):
            said.append(f"{config.where(key)}: {key} does nothing here: it is used with {user}")
    warned = config.__dict__.setdefault("_warned", set())  # a Trainer checks it again
    for text in said:
        if text not in warned:
            warned.add(text)
            logger.warning(text)
    return said


def _expected(f: dataclasses.Field, kind: type) -> str:
    """What the bounds of field ``f`` ask for, in words."""
    meta = f.metadata
    if kind is int:
        low = meta.get("min")
        return "a positive integer" if low == 1 else f"an integer >= {low}"
    if "below" in meta:
        return f"a number in [{meta.get('min', '-inf')}, {meta['below']})"
    if "max" in meta:
        low = f"({meta['gt']}" if "gt" in meta else f"[{meta.get('min', '-inf')}"
        return f"a number in {low}, {meta['max']}]"
    return f"a number > {meta['gt']}" if "gt" in meta else f"a number >= {meta['min']}"


def check_bounds(config: TrainConfig) -> None:
    """Every field's bounds (its metadata: ``min``, ``gt``, ``below``, ``max``), for every
    section."""
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
                and value <= meta.get("max", float("inf"))
            )
            if not ok:
                kind = int if isinstance(value, int) and "gt" not in meta else float
                key = f"{section}.{f.name}"
                raise ConfigError(
                    f"{config.where(key)}: {key}: expected {_expected(f, kind)}, got {value!r}"
                )


def validate(
    config: TrainConfig,
    *,
    required: bool = True,
    sources: list | None = None,
    model_given: bool = False,
    eval_given: bool = False,
) -> TrainConfig:
    """Bounds and cross-field checks that single values cannot make; errors name where each
    value was set. ``required=False``: the model, data and output options may still be unset
    (a config built in a script, completed by the Trainer). ``sources``: the training sources
    a script passed (instead of ``data.train``); ``model_given``, ``eval_given``: it passed
    the model, evaluation tasks."""
    given = {"data.train": sources is not None, "model.name_or_path": model_given}
    for key, flag in REQUIRED.items():
        # An empty list of sources says so itself, below.
        if required and not given.get(key) and config.get(key) in (None, ""):
            raise ConfigError(f"{key} is required: set it in the config file or pass {flag}")
    check_bounds(config)
    sources = _check_sources(config, sources)
    _check_model(config, sources or [])
    _check_objective(config, sources)
    check_loss_options(config)
    check_fsdp(config)
    check_padding_free(config)
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
    if (
        config.training.batch_size == 1
        and config.data.negatives == 0
        and (loss.objective != "sigmoid")
    ):
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
    if config.training.save_steps and not config.training.save_checkpoints:
        raise ConfigError(
            f"{config.where('training.save_steps')}: training.save_steps asks for checkpoints "
            f"but training.save_checkpoints is false ({config.where('training.save_checkpoints')})"
        )
    if sources is not None:
        warn_unused(config, sources, eval_given)
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for tracker in config.training.report_to:
        if tracker not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"{config.where('training.report_to')}: training.report_to: unknown tracker "
                f"{tracker!r}{suggest(tracker, list(LOGGER_TYPE_TO_CLASS))} (trackers: "
                f"{', '.join(LOGGER_TYPE_TO_CLASS)})"
            )
    return config
