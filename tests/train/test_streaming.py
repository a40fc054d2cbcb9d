"""Streamed training data (issue 29): a run over a stream that is killed and resumed ends as the
uninterrupted run, two processes see each example once per epoch, an endless generator trains
to max_steps, and batches keep the no-duplicate-positive rule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import STOPPED, failing_in_step, load_weights, make_tiny_model, write_examples

from retriever import TrainConfig, Trainer
from retriever.data.inputs import RecordStream
from retriever.data.texts import text_id
from retriever.train.streams import StreamSet

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("streams")
    return {
        "root": root,
        "model": Path(make_tiny_model(root / "model", dropout=0.1)),
        "data": Path(write_examples(root / "train.jsonl", n=32, negatives=2)),
    }


def config_values(files: dict[str, Path], output: Path, **training) -> dict:
    return {
        "model": {"name_or_path": str(files["model"]), "query_max_length": 16,
                  "document_max_length": 24},
        "data": {"train": str(files["data"]), "streaming": True, "negatives": 1,
                 "num_workers": 2},
        "training": {"output_dir": str(output), "batch_size": 8, "chunk_size": 5,
                     "max_steps": 7, "save_steps": 2, "learning_rate": 1e-3,
                     "warmup_steps": 0, "logging_steps": 1, "cpu": True, **training},
    }  # fmt: skip


def assert_same_weights(got: Path, want: Path) -> None:
    a, b = load_weights(got / "final"), load_weights(want / "final")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_batches_follow_the_stream_without_repeating_a_positive(tmp_path):
    positives = "a b a c d e b f g h i j k".split()
    records = [{"query": f"q{i}", "pos": p} for i, p in enumerate(positives)]
    stream = StreamSet(RecordStream(lambda: iter(records), "rows"), 0, seed=0)
    batches = list(stream.epoch_plan(0, 4))
    places = [[key for key, _ in batch] for batch in batches]
    # Row 2 repeats row 0's positive: it waits, and opens the next batch; the last row, k,
    # makes no full batch and is dropped.
    assert places == [[0, 1, 3, 4], [2, 5, 6, 7], [8, 9, 10, 11]]
    for batch in batches:
        positives = [text_id(e.positives[0]) for _, e in batch]
        assert len(set(positives)) == len(positives)


def test_a_killed_streamed_run_resumes_to_the_uninterrupted_one(files, tmp_path):
    """The CLI over a JSONL file read as a stream (data.streaming), two loader workers,
    SIGKILL inside step 5, then --resume from the checkpoint of step 4."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_values(files, tmp_path / "unused")))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def run(output: str, point: str, *options: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, str(ROOT / "tests" / "faults.py"), point, "--", "train",
                str(config), "--output-dir", str(tmp_path / output), *options]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)

    done = run("whole", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run("killed", "step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run("killed", "none", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "killed", tmp_path / "whole")


def test_a_datasets_stream_resumed_after_a_failure_ends_as_the_uninterrupted_run(files, tmp_path):
    """A datasets.IterableDataset (load_dataset(..., streaming=True)) across epochs: 32
    examples make 4 batches an epoch, so 7 steps start a second one."""
    import datasets

    def stream():
        return datasets.load_dataset(
            "json", data_files=str(files["data"]), split="train", streaming=True
        )

    def config(output: str) -> TrainConfig:
        values = config_values(files, tmp_path / output)
        del values["data"]["train"], values["data"]["streaming"]
        return TrainConfig.from_dict(values)

    Trainer(config("whole"), train_dataset=stream()).train()
    with failing_in_step(5), pytest.raises(RuntimeError, match=STOPPED):
        Trainer(config("failed"), train_dataset=stream()).train()
    Trainer(config("failed"), train_dataset=stream(), resume=True).train()
    assert_same_weights(tmp_path / "failed", tmp_path / "whole")


def test_an_endless_generator_trains_to_max_steps(files, tmp_path):
    def endless():
        i = 0
        while True:
            yield {"query": f"what is item {i}?", "pos": f"item {i} is a thing {i % 7}"}
            i += 1

    values = config_values(files, tmp_path / "run", max_steps=5, save_steps=None)
    del values["data"]["train"], values["data"]["streaming"]
    values["data"]["negatives"] = 0
    summary = Trainer(TrainConfig.from_dict(values), train_dataset=endless).train()
    assert summary["steps"] == 5
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]


def test_a_stream_needs_max_steps(files, tmp_path):
    from retriever.train.config import ConfigError

    values = config_values(files, tmp_path / "run", max_steps=None, save_steps=None)
    with pytest.raises(ConfigError, match="training.max_steps is required with a streamed"):
        TrainConfig.from_dict(values)


WORKER = """
import json, sys
from retriever.train.config import load_config
from retriever.train.trainer import Trainer

config = load_config(sys.argv[1])
trainer = Trainer(config)
seen = []
real_step = trainer._step

def record(parts):
    batch = parts[0].batch
    seen.append(batch.candidate_ids[: batch.num_queries].tolist())  # the queries' positives
    return real_step(parts)

trainer._step = record
trainer.train()
rank = trainer.accelerator.process_index
with open(sys.argv[2] + f".{rank}", "w") as f:
    json.dump(seen, f)
"""


def test_two_processes_each_read_their_shard_once_per_epoch(files, tmp_path):
    """32 examples, 8 a step over 2 processes: each reads its 16 in 4 batches of 4."""
    values = config_values(files, tmp_path / "run", max_steps=4, save_steps=None)
    values["data"]["num_workers"] = 1
    values["model"]["name_or_path"] = str(files["model"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(values))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(script), str(config), str(tmp_path / "seen")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"seen.{rank}").read_text()) for rank in (0, 1)]
    per_rank = [[i for step in steps for i in step] for steps in seen]
    assert all(len(steps) == 4 and all(len(s) == 4 for s in steps) for steps in seen)
    assert not set(per_rank[0]) & set(per_rank[1])
    positives = [json.loads(line)["pos"] for line in files["data"].read_text().splitlines()]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(text_id(p) for p in positives)


def test_a_bad_line_met_by_a_loader_worker_is_named_without_a_traceback(files, tmp_path, capsys):
    """Lines past the first 1,000 are read only by the workers, as training goes."""
    import argparse

    from retriever.train.cli import add_arguments, run

    lines = [
        json.dumps({"query": f"question {i}", "pos": f"answer {i}" if i != 1500 else 5})
        for i in range(2000)
    ]
    data = tmp_path / "late.jsonl"
    data.write_text("\n".join(lines) + "\n")
    values = config_values(files, tmp_path / "run", max_steps=30, save_steps=None)
    values["data"].update(train=str(data), negatives=0)
    values["training"]["batch_size"] = 64
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(values))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(config)])) == 2
    err = capsys.readouterr().err
    assert f"{data}:1501: 'pos' must be a string or a list of strings" in err
    assert "Traceback" not in err


def test_max_examples_cuts_the_stream_before_its_shards(tmp_path):
    records = [{"query": f"q{i}", "pos": f"p{i}"} for i in range(40)]
    stream = RecordStream(lambda: iter(records), "rows", limit=10)
    assert [w for w, _ in stream.epoch(0)] == [f"rows row {n}" for n in range(1, 11)]
    halves = [[w for w, _ in stream.shard(rank, 2).epoch(0)] for rank in (0, 1)]
    assert halves == [[f"rows row {n}" for n in (1, 3, 5, 7, 9)],
                      [f"rows row {n}" for n in (2, 4, 6, 8, 10)]]  # fmt: skip


def test_a_saved_dataset_streams_from_yaml(files, tmp_path):
    """data.format: datasets with data.streaming: a save_to_disk directory is read as a
    stream; one that is not there is named."""
    import datasets

    from retriever.train.config import config_from_dict
    from retriever.train.trainer import train

    rows = [json.loads(line) for line in files["data"].read_text().splitlines()]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    values = config_values(files, tmp_path / "stream", max_steps=3, save_steps=None)
    values["data"].update(train=str(saved), format="datasets", num_workers=0)
    summary = train(config_from_dict(values))
    assert summary["steps"] == 3
    values["data"]["train"] = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match="cannot be streamed as a dataset"):
        train(config_from_dict({**values, "training": {**values["training"],
                                "output_dir": str(tmp_path / "bad")}}))  # fmt: skip
