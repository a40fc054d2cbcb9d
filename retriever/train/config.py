"""The training configuration: the sections of `retriever.train.options`, read from YAML and the
command line, and checked (`train.config_checks`).

``model``, ``data``, ``loss``, ``training``, ``eval`` and ``mining`` are dataclasses whose
fields carry their help text and bounds (`train.options`). A YAML file
sets any subset of them; every option can be overridden on the command line as
``--section.option VALUE`` (the value is read as YAML: ``null``, ``true``, ``1e-4``, ``[a, b]``),
and the common ones have short flags (``--model``, ``--data``, ``--batch-size``, ...).

Every value remembers where it came from (``file.yaml:12`` or ``--batch-size``), so an error
names the line or flag to fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retriever.train.config_checks import suggest, validate
from retriever.train.options import (
    SECTIONS,
    ConfigError,
    DataArguments,
    EvalArguments,
    LossArguments,
    MiningArguments,
    ModelArguments,
    TrainingArguments,
)

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

    @classmethod
    def from_dict(cls, values: dict[str, dict[str, Any]]) -> TrainConfig:
        """A config from nested dicts (the YAML file's shape), checked as the YAML route checks
        it: ``TrainConfig.from_dict({"model": {"name_or_path": ...}, "training": {...}})``.
        ``data.train`` may be left out when the Trainer is given ``train_dataset``."""
        return config_from_dict(values, required=False)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        """A config read from a YAML file; errors name the file and line."""
        return validate(load_config(path), required=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def check_types(config: TrainConfig) -> None:
    """Every option of a config built from its dataclasses in a script, checked and converted
    as a YAML value would be; what a script set is named ``TrainConfig`` in messages."""
    for section in SECTIONS:
        values = getattr(config, section)
        for f in options(section):
            key, value = f"{section}.{f.name}", getattr(values, f.name)
            if key not in config.sources and value != _default(f):
                config.sources[key] = "TrainConfig"
            setattr(values, f.name, convert(value, section, f.name, config.where(key)))


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def options(section: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(SECTIONS[section]))


def _field(section: str, name: str) -> dataclasses.Field:
    return next(f for f in options(section) if f.name == name)


def _type_of(section: str, name: str) -> Any:
    return typing.get_type_hints(SECTIONS[section])[name]


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
    items = _field(section, name).metadata.get("items")
    if items is not None:  # one path, or a list (of sources, of tasks)
        if isinstance(value, str) and value:
            return value
        kind = "mappings" if items is dict else "strings"
        if not isinstance(value, list) or not all(isinstance(v, items) for v in value):
            raise fail(f"a path or a list of {kind}")
        return list(value)
    if typing.get_origin(base) is list:
        out: Any = _to_list(value, fail, typing.get_args(base)[0])
    elif base in _CONVERTERS:
        out = _CONVERTERS[base](value, fail, str in members)
    else:  # pragma: no cover - a new option type
        raise TypeError(f"unsupported option type {tp} for {key}")
    choices = _field(section, name).metadata["choices"]
    if choices is not None and out not in choices:
        raise fail(f"one of {', '.join(choices)}")
    return out


# value, fail(expected) -> ConfigError, whether "auto" is allowed -> the converted value
Fail = typing.Callable[[str], ConfigError]


def _to_bool(value: Any, fail: Fail, auto: bool) -> bool:
    if not isinstance(value, bool):
        raise fail("true or false")
    return value


def _to_int(value: Any, fail: Fail, auto: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail("an integer" + (' or "auto"' if auto else ""))
    return value


def _to_float(value: Any, fail: Fail, auto: bool) -> float:
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise fail("a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail("a number")
    return float(value)


def _to_dict(value: Any, fail: Fail, auto: bool) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise fail("a mapping of option names to values")
    return dict(value)


def _to_str(value: Any, fail: Fail, auto: bool) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise fail("a string")
    return str(value)


def _to_list(value: Any, fail: Fail, item: type) -> list[Any]:
    """A list of ``item`` (str, int or float); one string stands for a list of one."""
    if item is str and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or (item is str and not all(isinstance(v, str) for v in value)):
        raise fail(f"a list of {_ITEM_NAMES[item]}")
    try:
        return [_CONVERTERS[item](v, fail, False) for v in value]
    except ConfigError:
        raise fail(f"a list of {_ITEM_NAMES[item]}") from None


_CONVERTERS: dict[Any, typing.Callable[[Any, Fail, bool], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    dict: _to_dict,
}
_ITEM_NAMES = {str: "strings", int: "integers", float: "numbers"}


class Unlined(str):
    """Where options come from that has no lines to name (a dict a script built)."""


def _line(node: yaml.Node, path: str) -> str:
    return path if isinstance(path, Unlined) else f"{path}:{node.start_mark.line + 1}"


def _first_unplain(value: Any, key: str = "") -> tuple[str, Any]:
    """The dotted key and value of the first entry YAML cannot hold (``_plain``'s output)."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        if not key:
            name = str(k)
        else:
            name = f"{key}.{k}" if isinstance(value, dict) else f"{key}[{k}]"
        if isinstance(v, (dict, list)):
            found = _first_unplain(v, name)
            if found[0]:
                return found
        elif not isinstance(v, (str, int, float, bool, type(None))):
            return name, v
    return "", None


def _plain(value: Any) -> Any:
    """A dict's value as YAML can hold it: paths as strings, numpy scalars as Python's."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


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
                f"{suggest(section, list(SECTIONS))}; sections are {', '.join(SECTIONS)}"
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
                raise ConfigError(f"{where}: unknown option {section}.{name}{suggest(name, names)}")
            if name in seen:
                raise ConfigError(f"{where}: {section}.{name} is set twice")
            seen.add(name)
            value = yaml.safe_load(yaml.serialize(value_node))
            setattr(getattr(config, section), name, convert(value, section, name, where))
            config.sources[f"{section}.{name}"] = where
            if isinstance(value_node, yaml.SequenceNode):  # each entry of a list, by its line
                for i, item in enumerate(value_node.value):
                    config.sources[f"{section}.{name}[{i}]"] = _line(item, path)


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a YAML config file; unknown sections or options and bad values name their line."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:  # a directory, no permission
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
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


def config_from_dict(
    values: dict[str, dict[str, Any]],
    where: str = Unlined("TrainConfig.from_dict"),
    required: bool = True,
) -> TrainConfig:
    """A validated config from nested dicts (the shape of the YAML file); for scripts and tests.
    ``required=False`` leaves the data and output options to be checked when training starts
    (a Trainer given its data)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: the config must be a dict of sections ({', '.join(SECTIONS)})")
    try:
        node = yaml.compose(yaml.safe_dump(_plain(values)))
    except yaml.YAMLError:
        key, value = _first_unplain(_plain(values))
        raise ConfigError(
            f"{where}: {key}: a {type(value).__name__} is not a config value; give strings, "
            "numbers, booleans, lists and dicts"
        ) from None
    config = TrainConfig()
    if node is not None:
        apply_mapping(config, node, where)
    return validate(config, required=required)


def differing_options(old: TrainConfig, new: TrainConfig) -> list[str]:
    """The "section.option" keys whose values differ."""
    a, b = old.to_dict(), new.to_dict()
    return [f"{s}.{n}" for s in SECTIONS for n in a[s] if a[s][n] != b[s][n]]
