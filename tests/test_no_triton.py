"""Without triton (macOS, Windows: no wheel), every command still imports and runs on CPU: triton
is imported only where a kernel runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from train_helpers import make_tiny_model, write_beir, write_examples

TESTS = Path(__file__).resolve().parent

BLOCKED = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, NoTriton())
    sys.argv = ["retriever", *sys.argv[1:]]
    from retriever.cli import main

    code = main(sys.argv[1:])
    assert "triton" not in sys.modules, "triton was imported"
    sys.exit(code)
    """
)


def _retriever(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", BLOCKED, *argv], capture_output=True, text=True, env=env, timeout=600
    )


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
