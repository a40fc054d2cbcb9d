"""Never lose a run: kills at every stage of a checkpoint, resumes that finish bit-identical to an
uninterrupted run, ``--overwrite`` that leaves the old run byte-identical when the new one fails,
and corrupted checkpoints that are named, not loaded.

Training runs in subprocesses (tests/faults.py) so that a kill is a real SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import (
    load_weights,
    make_tiny_model,
    read_log,
    reset_accelerate_state,
    write_beir,
    write_examples,
)

from retriever.train.cli import add_arguments, run

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ROOT / "tests" / "faults.py"
KILLED = -signal.SIGKILL
# Fields of log records that depend on the wall clock, not on the training.
TIMING_FIELDS = (
    "queries_per_s", "tokens_per_s", "step_s", "data_wait_s", "timings", "documents_per_s"
)  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    model = make_tiny_model(root / "model", dropout=0.1)
    data = write_examples(root / "train.jsonl", n=48, negatives=2)
    task = write_beir(root / "task", data, n=12)
    config = {
        "model": {"name_or_path": model, "query_max_length": 16, "document_max_length": 24},
        "data": {"train": data, "negatives": 1, "num_workers": 0},
        "training": {
            "output_dir": str(root / "unused"),
            "batch_size": 8,
            "chunk_size": 5,
            "max_steps": 8,
            "save_steps": 2,
            "save_total_limit": 2,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "logging_steps": 1,
            "report_to": [],
            "cpu": True,
        },
        "eval": {"data": task, "steps": 4, "batch_size": 16},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, "data": Path(data), "task": Path(task)}


def train_process(workspace, output_dir: Path, point: str, *options: str):
    """``retriever train CONFIG --output-dir OUTPUT OPTIONS``, killed at ``point``."""
    argv = [sys.executable, str(FAULTS), point, "--", "train"]
    argv += [str(workspace["config"]), "--output-dir", str(output_dir), *options]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def finished(result) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def killed(result) -> subprocess.CompletedProcess:
    assert result.returncode == KILLED, f"not killed ({result.returncode}): {result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def reference(workspace) -> Path:
    """The uninterrupted run."""
    output = workspace["root"] / "reference"
    finished(train_process(workspace, output, "none"))
    return output


def records(run_dir: Path, name: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_log(run_dir, name)]


def assert_same_run(got: Path, want: Path) -> None:
    for model in ("final", "best"):
        a, b = load_weights(got / model), load_weights(want / model)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{model}/{name} differs"
    # The saved model directory is identical, tokenizer files included (but for the offline
    # flag transformers records from the environment: the subprocesses run offline).
    assert model_files(got / "final") == model_files(want / "final")
    assert records(got, "log.jsonl") == records(want, "log.jsonl")
    assert records(got, "eval.jsonl") == records(want, "eval.jsonl")
    names = sorted(p.name for p in (got / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (want / "checkpoints").iterdir())


def model_files(directory: Path) -> dict[str, object]:
    """A saved model's files: bytes for weights, contents for JSON (without local_files_only)."""
    out: dict[str, object] = {}
    for path in sorted(directory.rglob("*")):
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                data.pop("local_files_only", None)
            out[str(path.relative_to(directory))] = data
        elif path.name == "README.md":  # the model card, titled by the run directory's name
            out["README.md"] = path.read_text().replace(directory.parent.name, "RUN")
        elif path.is_file():
            out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) -> a hash of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_killed_at_every_stage_resumes_to_the_uninterrupted_run(workspace, reference):
    output = workspace["root"] / "chain"
    # Each start is killed somewhere else; each --resume continues from what the last left.
    killed(train_process(workspace, output, "step:3"))  # mid-training, checkpoint 2 on disk
    killed(train_process(workspace, output, "saving:4:optimizer.bin", "--resume"))
    assert not (output / "checkpoints" / "step-00000004").exists()  # never half a checkpoint
    killed(train_process(workspace, output, "manifest:6", "--resume"))
    killed(train_process(workspace, output, "publish:step-00000008", "--resume"))
    killed(train_process(workspace, output, "publish:final", "--resume"))
    finished(train_process(workspace, output, "none", "--resume"))
    assert_same_run(output, reference)  # log.jsonl too: no step repeated by the resumes
    assert [r["step"] for r in read_log(output, "log.jsonl")] == list(range(1, 9))
    assert not [p for p in output.rglob(".*") if p.name.endswith((".partial", ".old"))]


# --- corrupted checkpoints --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_a_truncated_checkpoint_file_is_named_and_skipped(
    workspace, reference, name, tmp_path, cli, capsys, caplog
):
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    for stale in ("final", "best"):  # the run is then resumed from step 6 to the end
        shutil.rmtree(output / stale)
    newest = output / "checkpoints" / "step-00000008"
    with open(newest / name, "r+b") as f:
        f.truncate((newest / name).stat().st_size // 2)
    assert cli("--output-dir", str(output), "--resume", str(newest)) == 2
    err = capsys.readouterr().err
    assert f"{newest / name}:" in err and "Traceback" not in err
    # A plain --resume says which checkpoint it skipped and why, and takes the one before.
    assert cli("--output-dir", str(output), "--resume") == 0  # one thread, as the subprocesses
    assert f"skipped {newest / name}" in caplog.text
    assert_same_run(output, reference)


def test_a_checkpoint_without_manifest_is_incomplete(workspace, reference, tmp_path, cli, capsys):
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    newest = output / "checkpoints" / "step-00000008"
    (newest / "manifest.json").unlink()
    assert cli("--output-dir", str(output), "--resume", str(newest)) == 2
    assert "no manifest.json" in capsys.readouterr().err


# --- --overwrite ------------------------------------------------------------------------------


@pytest.fixture
def cli(workspace):
    """``retriever train`` in this process: (exit code, stderr)."""
    import argparse

    def call(*argv: str):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        try:
            return run(parser.parse_args([str(workspace["config"]), *argv]))
        finally:
            reset_accelerate_state()

    return call


# case: (options, what the message must say)
FAILING_STARTS = {
    "missing eval data": (["--eval-data", "/no/such/dir"], "eval.data"),
    "missing eval split": (["--eval.split", "dev"], "eval.split"),
    "unknown metric": (["--eval.metric", "nosuch"], "eval.metric"),
    "missing model": (["--model", "/no/such/model"], "no such directory"),
    "model dir without a model": (["--model", "EMPTY"], "not a model directory"),
    "unknown attention kernel": (["--model.attn_implementation", "bogus"], "attn_implementation"),
    "max length past the positions": (["--model.document_max_length", "200"], "64 positions"),
    "missing training data": (["--data", "/no/such/file.jsonl"], "no such file"),
    "malformed training data": (["--data", "BAD"], "bad.jsonl:1: missing field 'pos'"),
    "not gzip": (["--data", "NOTGZ"], "notgz.jsonl.gz: cannot be read"),
    "not UTF-8": (["--data", "BINARY"], "binary.jsonl:2: not UTF-8 text"),
    "empty directory as data": (["--data", "EMPTY"], "cannot be read as a saved dataset"),
    "batch larger than the data": (["--batch-size", "4096"], "training.batch_size"),
    "zero-loss batch": (["--batch-size", "1", "--negatives", "0"], "the loss is 0"),
    "bad option value": (["--training.learning_rate", "fast"], "training.learning_rate"),
    "temperature range upside down": (
        ["--loss.min_temperature", "0.5", "--loss.max_temperature", "0.1"],
        "loss.min_temperature (0.5) is above loss.max_temperature",
    ),
    "triton on a CPU": (["--loss.impl", "triton"], "loss.impl"),
    "token cache is a file": (["--data.token_cache", "AFILE"], "afile is a file, not a directory"),
    "eval qrels not UTF-8": (["--eval-data", "BINQ"], "qrels/test.tsv:14: not UTF-8 text"),
    "no teacher scores": (["--loss.distill_weight", "1"], "train.jsonl:1: no teacher scores"),
}


@pytest.mark.parametrize("case", list(FAILING_STARTS))
def test_overwrite_with_a_failing_start_leaves_the_old_run_intact(
    workspace, reference, tmp_path, cli, capsys, monkeypatch, case
):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a plain CPU machine: no kernels to run
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    before = snapshot(output)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"query": "q"}\n')
    (tmp_path / "notgz.jsonl.gz").write_text('{"query": "q", "pos": "p"}\n')
    (tmp_path / "binary.jsonl").write_bytes(b'{"query": "q", "pos": "p"}\n\xff\xfe\n')
    (tmp_path / "afile").write_text("x")
    shutil.copytree(workspace["task"], tmp_path / "binq")
    with open(tmp_path / "binq" / "qrels" / "test.tsv", "ab") as f:
        f.write(b"\xff\n")
    files = {
        "EMPTY": str(tmp_path / "empty"),
        "BAD": str(tmp_path / "bad.jsonl"),
        "NOTGZ": str(tmp_path / "notgz.jsonl.gz"),
        "BINARY": str(tmp_path / "binary.jsonl"),
        "AFILE": str(tmp_path / "afile"),
        "BINQ": str(tmp_path / "binq"),
    }
    options, message = FAILING_STARTS[case]
    assert cli("--output-dir", str(output), "--overwrite", *[files.get(a, a) for a in options]) == 2
    err = capsys.readouterr().err
    assert "retriever train: error:" in err and "Traceback" not in err
    assert message in err, err
    assert snapshot(output) == before


def test_overwrite_that_fails_while_training_puts_the_old_run_back(
    workspace, reference, tmp_path, cli, capsys, monkeypatch
):
    from retriever.train.trainer import Trainer

    output = tmp_path / "run"
    shutil.copytree(reference, output)
    before = snapshot(output)
    steps = []

    def interrupted(self, batch, params):
        steps.append(self.state.step)
        raise KeyboardInterrupt  # Ctrl-C during step 1, before the new run's first checkpoint

    monkeypatch.setattr(Trainer, "_optimizer_step", interrupted)
    assert cli("--output-dir", str(output), "--overwrite") == 130
    assert steps == [0] and snapshot(output) == before
    assert "interrupted" in capsys.readouterr().err


def test_overwrite_killed_before_its_first_checkpoint_is_undone_by_the_next_start(
    workspace, reference, tmp_path, cli, caplog
):
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    before = snapshot(output)
    killed(train_process(workspace, output, "step:2", "--overwrite"))
    assert (output / ".replaced-run").is_dir()  # the old run waited aside
    assert cli("--output-dir", str(output)) == 2  # any start repairs it, then refuses as usual
    assert "put back the run" in caplog.text
    assert snapshot(output) == before


def test_overwrite_replaces_the_old_run_once_the_new_one_has_a_checkpoint(
    workspace, reference, tmp_path
):
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    (output / "notes.txt").write_text("mine")  # not a run artifact: never touched
    killed(train_process(workspace, output, "step:3", "--overwrite", "--max-steps", "6"))
    assert not (output / ".replaced-run").exists() and not (output / "final").exists()
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["step-00000002"]
    assert (output / "notes.txt").read_text() == "mine"


# --- smaller items ----------------------------------------------------------------------------


def test_resume_into_another_directory_checks_the_options(
    workspace, reference, tmp_path, cli, capsys
):
    checkpoint = reference / "checkpoints" / "step-00000006"
    assert cli("--output-dir", str(tmp_path / "other"), "--resume", str(checkpoint),
               "--batch-size", "16") == 2  # fmt: skip
    assert "training.batch_size differ" in capsys.readouterr().err


def test_eval_steps_without_eval_data_trains_to_the_end(workspace, tmp_path, cli):
    output = tmp_path / "run"
    assert cli("--output-dir", str(output), "--eval-data", "null", "--max-steps", "2") == 0
    assert (output / "final" / "modules.json").is_file()


def test_a_nan_loss_stops_the_run_naming_the_step(workspace, tmp_path, cli, capsys, monkeypatch):
    from retriever.train import trainer

    real_step = trainer.Trainer._step

    def poisoned(self, batch):
        loss = real_step(self, batch)
        return loss * float("nan") if self.state.step == 2 else loss

    monkeypatch.setattr(trainer.Trainer, "_step", poisoned)
    output = tmp_path / "run"
    assert cli("--output-dir", str(output), "--eval-data", "null") == 2
    err = capsys.readouterr().err
    assert "step 3: the loss is nan" in err and "--resume from the newest checkpoint" in err
    assert (output / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    assert not (output / "final").exists()


def test_the_package_declares_an_spdx_license():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    # A TOML table here is deprecated by setuptools (unsupported after 2027-02-18).
    assert project["license"] == "Apache-2.0"


def test_learnable_temperature_comes_back_from_the_clamp():
    from retriever.loss import InfoNCELoss

    loss_fn = InfoNCELoss(scale=20.0, learnable_scale=True, min_scale=1.0, max_scale=50.0)
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.5)
    q = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    with torch.no_grad():
        loss_fn.log_scale.fill_(449.0)  # where an unclamped parameter once ended up
    loss_fn(q, q).backward()  # identical pairs: a larger scale always lowers the loss
    assert loss_fn.log_scale.item() == pytest.approx(torch.tensor(50.0).log().item())
    assert loss_fn.log_scale.grad.item() < 0  # a live gradient at the boundary
    d = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    for _ in range(20):  # unrelated pairs: a smaller scale lowers the loss; it must move back
        optimizer.zero_grad()
        loss_fn(q, d).backward()
        optimizer.step()
    assert loss_fn.scale.item() < 49.0


def test_a_zero_or_negative_scale_is_refused():
    from retriever.loss import contrastive_loss

    q = torch.randn(4, 8)
    for scale in (0.0, -20.0, torch.tensor(-1.0)):
        with pytest.raises(ValueError, match="scale must be > 0"):
            contrastive_loss(q, q, scale=scale)


def test_bad_eval_data_in_train_is_reported_like_retriever_eval(workspace, tmp_path, cli, capsys):
    # A training file is no BEIR task: the message names the option, as `retriever eval` would.
    assert cli("--output-dir", str(tmp_path / "r"), "--eval-data", str(workspace["data"])) == 2
    err = capsys.readouterr().err
    assert "eval.data" in err and "Traceback" not in err


def test_a_second_start_on_a_live_run_stops_at_once(workspace, reference, tmp_path, cli, capsys):
    from retriever.train.run_directory import RunDirectory

    output = tmp_path / "run"
    shutil.copytree(reference, output)
    before = snapshot(output)
    live = RunDirectory(output)
    live.lock()  # as a run in progress holds it
    try:
        for options in ([], ["--resume"], ["--overwrite"]):
            assert cli("--output-dir", str(output), *options) == 2
            assert "is in use by a running `retriever train`" in capsys.readouterr().err
    finally:
        live.unlock()
    assert snapshot(output) == before


def test_a_start_that_saved_nothing_does_not_block_the_next(
    workspace, tmp_path, cli, capsys, monkeypatch
):
    from retriever.train import trainer

    output = tmp_path / "run"
    real_step = trainer.Trainer._step
    monkeypatch.setattr(trainer.Trainer, "_step", lambda self, b: real_step(self, b) * float("nan"))
    assert cli("--output-dir", str(output), "--eval.at_start", "false") == 2
    err = capsys.readouterr().err
    assert "step 1: the loss is nan" in err and "start again (nothing was saved)" in err
    monkeypatch.setattr(trainer.Trainer, "_step", real_step)
    assert cli("--output-dir", str(output), "--resume") == 2
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert cli("--output-dir", str(output), "--max-steps", "2") == 0  # a plain start replaces it


def test_resume_refuses_changed_data_and_steps_already_past(
    workspace, reference, tmp_path, cli, capsys
):
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    assert cli("--output-dir", str(output), "--resume", "--max-steps", "4") == 2
    assert "is at step 8, past the 4 steps" in capsys.readouterr().err
    data = workspace["data"]
    original = data.read_text()
    lines = original.splitlines()
    try:  # the same file name, its examples reordered
        data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
        assert cli("--output-dir", str(output), "--resume") == 2
    finally:
        data.write_text(original)
    assert "is not the training data" in capsys.readouterr().err
    assert cli("--output-dir", str(output), "--resume", str(output)) == 2
    assert "that is a run directory, not a checkpoint" in capsys.readouterr().err


def test_paths_that_cannot_be_used_are_named_before_any_work(workspace, tmp_path, cli, capsys):
    import argparse

    (tmp_path / "afile").write_text("x")
    assert cli("--output-dir", str(tmp_path / "afile" / "run")) == 2
    err = capsys.readouterr().err
    assert "training.output_dir: " in err and "afile is a file, not a directory" in err
    config = tmp_path / "latin1.yaml"
    config.write_bytes(b"model:\n  name_or_path: caf\xe9\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(config)])) == 2
    assert "latin1.yaml:2: not UTF-8 text" in capsys.readouterr().err
