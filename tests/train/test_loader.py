"""One DataLoader for the whole run: workers start once, batches cross epoch boundaries in step
order, and the result does not depend on the number of workers."""

from __future__ import annotations

import os

import pytest
import torch
from train_helpers import load_weights, make_tiny_model, read_log, tiny_config, write_examples

from retriever.train.loader import StepBatches
from retriever.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _train(tmp_path, name, workers, steps=14):
    model = make_tiny_model(tmp_path / "model", dropout=0.1)
    data = write_examples(tmp_path / "train.jsonl", n=48, negatives=2)  # 6 batches an epoch
    config = tiny_config(
        model, data, tmp_path / name, data={"num_workers": workers}, training={"max_steps": steps}
    )
    Trainer(config).train()
    return tmp_path / name


def test_epoch_boundaries_start_no_new_workers(tmp_path, monkeypatch):
    started = tmp_path / "iterators"
    started.mkdir()
    real_iter = StepBatches.__iter__

    def recording_iter(self):
        info = torch.utils.data.get_worker_info()
        (started / f"{os.getpid()}-{info.id if info else 'main'}").touch()
        yield from real_iter(self)

    monkeypatch.setattr(StepBatches, "__iter__", recording_iter)
    run = _train(tmp_path, "two-workers", workers=2)
    epochs = [r["epoch"] for r in read_log(run)]
    assert epochs == [0] * 6 + [1] * 6 + [2] * 2  # two epoch boundaries crossed
    # Each worker started its iterator once: one pid each, for the whole run.
    assert len(list(started.iterdir())) == 2
    assert len({p.name.split("-")[0] for p in started.iterdir()}) == 2


def test_the_number_of_workers_does_not_change_the_run(tmp_path):
    with_workers = load_weights(_train(tmp_path, "workers", workers=2) / "final")
    in_process = load_weights(_train(tmp_path, "no-workers", workers=0) / "final")
    for name in in_process:
        assert torch.equal(with_workers[name], in_process[name]), name
