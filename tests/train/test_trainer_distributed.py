"""Two gloo processes (``torchrun ... -m retriever train``) train to the same parameters as one
process on the concatenated batch: the ring loss, DDP's gradient average and the data split
must together reproduce the single-process step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import load_weights, make_tiny_model, read_log, write_examples

from retriever.train.config import load_config
from retriever.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose package the processes import


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _two_processes(config_file: Path, output_dir: Path, *options: str):
    """``retriever train`` in two gloo processes (torchrun); the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "-m", "retriever", "train", str(config_file), "--output-dir",
               str(output_dir), *options]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _train_both_ways(config: dict, root) -> tuple[dict, dict]:
    """Train ``config`` in two gloo processes (``torchrun ... -m retriever train``) into
    root/two and in this process into root/one: the final weights (one, two)."""
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    done = _two_processes(config_file, root / "two")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one = load_config(config_file)
    one.training.output_dir = str(root / "one")
    train(one)
    return load_weights(root / "one" / "final"), load_weights(root / "two" / "final")


# bf16: the network's rounding depends on a chunk's shape, which differs between the runs
# unless each chunk is one text; what remains are ulp-level differences that Adam's first steps
# (about sign(gradient) * lr for small gradients) can turn into parameter differences of a few
# 1e-4. fp32 must agree to float noise.
@pytest.mark.parametrize("dtype, chunk_size, atol", [("float32", 3, 1e-5), ("bfloat16", 1, 1.5e-3)])
def test_two_processes_match_one_process_on_the_concatenated_batch(
    tmp_path, dtype, chunk_size, atol
):
    # No dropout: the processes draw their masks from their own RNG streams.
    model = make_tiny_model(tmp_path / "model", dropout=0.0)
    data = write_examples(tmp_path / "train.jsonl", n=64, negatives=2)
    config = {
        "model": {
            "name_or_path": model,
            "query_max_length": 16,
            "document_max_length": 24,
            "dtype": dtype,
        },
        "data": {"train": data, "negatives": 2, "num_workers": 0},
        "loss": {"learnable_temperature": True},
        "training": {
            "batch_size": 8,
            "chunk_size": chunk_size,
            "max_steps": 3,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "logging_steps": 1,
            "report_to": [],
            "cpu": True,
        },
    }
    want, got = _train_both_ways(config, tmp_path)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=atol, msg=name)
    logs = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=100 * atol)
        assert b["temperature"] == pytest.approx(a["temperature"], rel=atol)
    assert logs[0][-1]["temperature"] != pytest.approx(0.05, rel=1e-4)  # it did learn


def test_two_processes_match_one_process_with_two_sources_and_uneven_shares(tmp_path):
    """Cross-GPU batch balance: every process holds a share of both sources (here 4 + 3
    retrieval queries and 1 + 1 STS pairs a step), the ring gives the retrieval source its
    whole global batch and CoSENT gathers every pair: the parameters of one process on the
    concatenated batch."""
    import json
    import random

    from train_helpers import WORDS

    model = make_tiny_model(tmp_path / "model", dropout=0.0)
    data = write_examples(tmp_path / "train.jsonl", n=40, negatives=2)
    rng = random.Random(0)
    with open(tmp_path / "sts.jsonl", "w") as f:
        for i in range(12):
            words = rng.sample(WORDS, 4)
            pair = {"sentence1": " ".join(words), "sentence2": " ".join(words[:2]) + f" {i}",
                    "score": float(rng.randint(0, 5))}  # fmt: skip
            f.write(json.dumps(pair) + "\n")
    config = {
        "model": {"name_or_path": model, "query_max_length": 16, "document_max_length": 24},
        "data": {
            "train": [{"path": data, "weight": 7, "negatives": 1},
                      {"path": str(tmp_path / "sts.jsonl"), "task": "sts", "weight": 2}],
            "num_workers": 0,
        },  # fmt: skip
        "training": {"batch_size": 9, "chunk_size": 3, "max_steps": 3, "learning_rate": 1e-3,
                     "warmup_steps": 0, "logging_steps": 1, "report_to": [], "cpu": True},
    }  # fmt: skip
    want, got = _train_both_ways(config, tmp_path)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    start = load_weights(tmp_path / "model")["embeddings.word_embeddings.weight"]
    assert not torch.equal(want["embeddings.word_embeddings.weight"], start)  # it trained


def _fsdp_config(tmp_path, lora: bool) -> dict:
    """A tiny Qwen2 decoder sharded across two processes (training.fsdp), with a checkpoint
    at step 2 and evaluations (collective under FSDP) that keep best/."""
    from tiny_encoder import save_tiny_decoder
    from train_helpers import write_beir

    model = str(save_tiny_decoder(tmp_path / "model"))
    data = write_examples(tmp_path / "train.jsonl", n=40, negatives=1)
    return {
        "model": {"name_or_path": model, "append_eos": True, "query_max_length": 16,
                  "document_max_length": 24, "lora": {"r": 4} if lora else None},
        "data": {"train": data, "negatives": 1, "num_workers": 0},
        "eval": {"data": write_beir(tmp_path / "beir", data), "steps": 2, "at_start": False},
        "training": {"batch_size": 8, "chunk_size": 2, "max_steps": 3, "learning_rate": 1e-3,
                     "warmup_steps": 0, "logging_steps": 1, "report_to": [], "cpu": True,
                     "fsdp": True, "save_steps": 2},
    }  # fmt: skip


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_two_processes_match_one_process_and_resume_exactly(tmp_path, lora):
    """FSDP2 shards across two gloo processes (the cache's chunk forwards all-gather each
    layer, one gradient reduce-scatter a step): the final weights (merged, for LoRA) are
    those of one unsharded process on the concatenated batch; a sharded run resumed from its
    step-2 checkpoint (the whole model and optimizer state) ends bit for bit where the
    uninterrupted one did; final/ and best/ are plain sentence-transformers directories."""
    from sentence_transformers import SentenceTransformer
    from train_helpers import copy_checkpoint

    config = _fsdp_config(tmp_path, lora)
    want, got = _train_both_ways(config, tmp_path)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (tmp_path / "two" / "best" / "eval.json").is_file()
    checkpoint = tmp_path / "two" / "checkpoints" / "step-00000002"
    assert not (checkpoint / "model.safetensors").exists()  # not DDP's: the sharded state
    whole = [torch.load(p, weights_only=False) for p in checkpoint.glob("custom_checkpoint_*")]
    assert any(isinstance(w, dict) and w.keys() == {"model", "optimizer"} for w in whole)
    SentenceTransformer(str(tmp_path / "two" / "final"), device="cpu").encode(["a cell"])

    copy_checkpoint(tmp_path / "two", tmp_path / "resumed", 2)
    done = _two_processes(tmp_path / "config.yaml", tmp_path / "resumed", "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = load_weights(tmp_path / "resumed" / "final")
    for name in got:
        assert torch.equal(resumed[name], got[name]), name
    last, resumed_last = read_log(tmp_path / "two")[-1], read_log(tmp_path / "resumed")[-1]
    for key in ("step", "loss", "grad_norm", "lr"):
        assert resumed_last[key] == last[key], key


def test_fsdp_refuses_rows_that_do_not_split_evenly(tmp_path):
    """A sharded forward is collective: 7 queries a step on 2 processes would give them
    different chunks, so the start stops, naming the option."""
    config = _fsdp_config(tmp_path, lora=False)
    config["training"]["batch_size"] = 7
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    done = _two_processes(config_file, tmp_path / "run")
    assert done.returncode != 0
    assert "training.fsdp: source 'train' has 7 rows a step" in done.stderr + done.stdout
    assert str(ROOT / "retriever") not in done.stderr  # no traceback of ours (torchrun's own
    # launcher prints one for any child that fails)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
