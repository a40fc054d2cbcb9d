"""Without triton (macOS, Windows: no wheel), every command still imports and runs on CPU: triton
is imported only where a kernel runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from blocked_imports import retriever_without
from train_helpers import make_tiny_model, write_beir, write_examples

TESTS = Path(__file__).resolve().parent


def _retriever(*argv: str) -> subprocess.CompletedProcess:
    return retriever_without({"triton"}, *argv)


def test_eval_mine_and_train_run_without_triton(tmp_path):
    model = make_tiny_model(tmp_path / "model", dropout=0.0)
    data = write_examples(tmp_path / "train.jsonl", n=24, negatives=2)
    task = write_beir(tmp_path / "task", data, n=8)
    done = _retriever("eval", "--model", model, "--data", task, "--no-progress", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nDCG@10" in done.stdout
    done = _retriever(
        "mine", "--model", model, "--data", data, "--output", str(tmp_path / "mined.jsonl"),
        "--num-negatives", "2", "--range-min", "1", "--range-max", "10", "--no-progress",
        "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    done = _retriever(
        "train", "--model", model, "--data", data, "--output-dir", str(tmp_path / "run"),
        "--max-steps", "1", "--batch-size", "4", "--chunk-size", "3", "--training.cpu", "true",
        "--training.report_to", "[]", "--data.num_workers", "0", "--model.query_max_length",
        "16", "--model.document_max_length", "24", "--loss.impl", "torch",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "modules.json").is_file()
