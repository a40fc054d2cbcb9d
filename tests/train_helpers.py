"""Shared pieces of the trainer tests: a tiny random BERT, small training files, configs, runs
resumed from a checkpoint, an in-process failure inside a step, and the direct (uncached)
embedding a cached step is compared with."""

from __future__ import annotations

import contextlib
import copy
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
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


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so that the next ``Trainer`` starts afresh (the
    ``fresh_accelerate_state`` fixture of tests/conftest.py does this after a test)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def copy_checkpoint(run_dir: Path, into: Path, step: int, *, config: bool = True) -> None:
    """Start the run directory ``into`` from checkpoint ``step`` of ``run_dir`` (and, with
    ``config``, its config.yaml), as a resumed run finds it."""
    name = f"step-{step:08d}"
    shutil.copytree(run_dir / "checkpoints" / name, into / "checkpoints" / name)
    if config:
        shutil.copy(run_dir / "config.yaml", into / "config.yaml")


def config_for(config: TrainConfig, output_dir: Path) -> TrainConfig:
    """A copy of ``config`` that writes to ``output_dir``."""
    other = copy.deepcopy(config)
    other.training.output_dir = str(output_dir)
    return other


def text_groups(n: int) -> list[tuple[str, str, list[str]]]:
    """``n`` (query, positive, negatives) groups: query i's positive is also query i+1's
    negative, and "shared" is everyone's negative, so candidate ids must reach the loss."""
    positives = [f"passage about topic {i} " + "word " * (i % 5) for i in range(n)]
    return [
        (f"question {i} " + "x " * (i % 3), positives[i], [positives[(i + 1) % n], "shared"])
        for i in range(n)
    ]


def embed_directly(encoder, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, documents) of ``batch`` embedded in one graph, chunk by chunk in the order the
    cached step embeds them (so that the same seed draws the same dropout masks)."""
    chunks = batch.query_chunks + batch.document_chunks
    embeddings = torch.cat([encoder(c.features("cpu")) for c in chunks])
    q = embeddings[: batch.num_queries][batch.query_order]
    d = embeddings[batch.num_queries :][batch.document_order]
    return q, d


def assert_cached_step_is_exact(encoder, batch, loss_fn, chunk_size=None, dropout=True) -> None:
    """The cached step's loss and gradients (network and temperature) equal those of the same
    float64 InfoNCE computed in one graph under the same seed; with ``dropout``, also that a
    direct pass under another seed (other masks) lands elsewhere, so the check can fail."""
    from reference import reference_loss

    from retriever.train.step import cached_step

    params = [*encoder.parameters(), loss_fn.log_scale]

    def direct(seed: int) -> tuple[float, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        torch.manual_seed(seed)  # the cache's RNG order: the same chunks in order
        q, d = embed_directly(encoder, batch)
        # Row i's positive is d[i]; candidates with the positive's id (other than itself) are
        # left out of the denominator.
        labels = torch.arange(batch.num_queries)
        loss = reference_loss(q, d, loss_fn.scale, labels, batch.candidate_ids)
        loss.backward()
        return loss.item(), grads_or_zeros(params)

    want_loss, want = direct(seed=5)
    _, other = direct(seed=6)
    for p in params:
        p.grad = None
    torch.manual_seed(5)
    got_loss = cached_step(encoder, batch, loss_fn, chunk_size=chunk_size)
    assert got_loss.item() == pytest.approx(want_loss, rel=1e-5)
    assert_grads_close(grads_or_zeros(params), want)
    if dropout:  # other dropout masks give another gradient
        assert max((a - b).abs().max().item() for a, b in zip(want, other)) > 1e-4


def grads_or_zeros(params) -> list[torch.Tensor]:
    """Each parameter's gradient, zero where it has none (e.g. BERT's pooler, unused by the
    embeddings)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Cached and direct parameter gradients agree, with errors relative to the gradient's
    scale (some entries are exactly zero in theory, e.g. the attention key biases, and float
    noise there has no relative meaning)."""
    scale = max(w.abs().max().item() for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * scale)


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


STOPPED = "stopped by the test"


@contextlib.contextmanager
def failing_in_step(step: int) -> Iterator[None]:
    """Runs in the block raise RuntimeError(STOPPED) inside optimizer step ``step`` (after its
    gradient, before its update; an in-process failure, unlike tests/faults.py's kills)."""
    from retriever.train import trainer

    original = trainer.Trainer._optimizer_step

    def optimizer_step(self, batch, params):
        if self.state.step + 1 == step:
            raise RuntimeError(STOPPED)
        return original(self, batch, params)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.Trainer, "_optimizer_step", optimizer_step)
        yield
