"""log.jsonl carries the sigmoid loss's bias, learnt along with the temperature."""

from __future__ import annotations

import pytest
from train_helpers import make_tiny_model, read_log, tiny_config, write_examples

from retriever.loss import InfoNCELoss
from retriever.loss.matryoshka import MatryoshkaLoss
from retriever.loss.sigmoid import SigmoidLoss
from retriever.train.step_log import sigmoid_bias
from retriever.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_sigmoid_bias_is_found_where_there_is_one():
    assert sigmoid_bias(SigmoidLoss(bias=-3.0)) == -3.0
    assert sigmoid_bias(MatryoshkaLoss(SigmoidLoss(bias=-2.0), [8, 4])) == -2.0
    assert sigmoid_bias(InfoNCELoss()) is None


def test_the_log_records_the_learnt_bias(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    data = write_examples(tmp_path / "train.jsonl", n=32, negatives=1)
    loss = {"objective": "sigmoid", "sigmoid_bias": -5.0, "learnable_temperature": True}
    config = tiny_config(model, data, tmp_path / "run", loss=loss, training={"max_steps": 3})
    Trainer(config).train()
    records = read_log(tmp_path / "run")
    biases = [r["bias"] for r in records]
    assert len(biases) == 3 and biases[0] != -5.0 and len(set(biases)) == 3  # it moves
    assert all("temperature" in r for r in records)
