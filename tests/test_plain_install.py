"""A plain install (``pip install retriever-train``, no extras) runs the quickstart with every
option at its default: no tracker, evaluation or LoRA package is needed unless asked for."""

from __future__ import annotations

from pathlib import Path

from blocked_imports import retriever_without
from train_helpers import make_tiny_model, write_beir, write_examples

ROOT = Path(__file__).resolve().parents[1]
# Packages of the optional extras (dev, bench, mteb, lora) and trackers: none may be needed.
OPTIONAL = {
    "tensorboard", "tensorboardX", "wandb", "mlflow", "peft", "mteb", "pytrec_eval",
    "matplotlib", "inf_cl", "memeff", "liger_kernel", "pytest",
}  # fmt: skip


def test_the_quickstart_needs_no_optional_package(tmp_path):
    model = make_tiny_model(tmp_path / "model", dropout=0.0)
    data = write_examples(tmp_path / "train.jsonl", n=48, negatives=1)
    task = write_beir(tmp_path / "task", data, n=8)
    done = retriever_without(
        OPTIONAL, "train", str(ROOT / "configs" / "quickstart.yaml"), "--model", model,
        "--data", data, "--eval-data", task, "--output-dir", str(tmp_path / "run"),
        "--batch-size", "8", "--chunk-size", "8", "--training.cpu", "true",
        "--model.query_max_length", "16", "--model.document_max_length", "24",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "modules.json").is_file()
    assert not (tmp_path / "run" / "logs").exists()  # no tracker by default
