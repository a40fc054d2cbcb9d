"""Shared pieces of the trainer tests: a tiny random BERT, small training files, configs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from tiny_encoder import save_tiny_bert

from retriever.train.config import TrainConfig, config_from_dict

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = (
    "cell protein gene cancer brain heart blood virus drug immune liver kidney lung bone skin "
    "muscle nerve enzyme tumor dose"
).split()


def make_tiny_model(path: Path, *, dropout: float = 0.1, seed: int = 0) -> str:
    """A 2-layer, 32-wide random BERT with the all-MiniLM-L6-v2 tokenizer, saved to ``path``."""
    return str(save_tiny_bert(path, seed=seed, dropout=dropout, max_positions=64))


def write_examples(path: Path, n: int = 96, negatives: int = 3, seed: int = 0) -> str:
    """A JSONL file of ``n`` learnable examples: the query's words are in its positive."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = rng.sample(WORDS, 4)
            record = {
                "query": f"{words[0]} {words[1]} case {i}",
                "pos": f"{' '.join(words)} report {i}",
                "neg": [" ".join(rng.sample(WORDS, 4)) for _ in range(negatives)],
            }
            f.write(json.dumps(record) + "\n")
    return str(path)


def tiny_config(
    model_path: str, data_path: str, output_dir: Path, **sections: dict[str, Any]
) -> TrainConfig:
    """A CPU config for the tiny model; ``sections`` update the defaults section by section."""
    values: dict[str, dict[str, Any]] = {
        "model": {"name_or_path": model_path, "query_max_length": 16, "document_max_length": 24},
        "data": {"train": data_path, "negatives": 1, "num_workers": 0},
        "training": {
            "output_dir": str(output_dir),
            "batch_size": 8,
            "chunk_size": 5,
            "max_steps": 6,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "logging_steps": 1,
            "report_to": [],
            "cpu": True,
        },
    }
    for section, updates in sections.items():
        values.setdefault(section, {}).update(updates)
    return config_from_dict(values)


def read_log(run_dir: Path, name: str = "log.jsonl") -> list[dict[str, Any]]:
    with open(run_dir / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def write_beir(root: Path, data_file: str, n: int = 24) -> str:
    """A small BEIR task from the first ``n`` training examples: each query's positive is its
    one relevant document; the corpus also holds the other examples' positives."""
    with open(data_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": row["pos"]}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        for i, row in enumerate(rows[:n]):
            f.write(json.dumps({"_id": f"q{i}", "text": row["query"]}) + "\n")
    with open(root / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"q{i}\td{i}\t1\n" for i in range(n))
    return str(root)
