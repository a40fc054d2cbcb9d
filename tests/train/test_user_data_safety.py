"""What the 2026-12-06 audit found (issue 27): a start never removes what a person put in the
run directory, nothing wrong passes in silence, and failures end in a message, not a traceback.
Each test reproduces one case of the audit through ``retriever train`` on a tiny BERT."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from train_helpers import make_tiny_model, write_beir, write_examples

from retriever.train.cli import add_arguments, run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit")
    data = write_examples(root / "x.jsonl", n=32, negatives=2)
    return {
        "root": root,
        "model": Path(make_tiny_model(root / "tinybert", dropout=0.0)),
        "data": Path(data),
        "task": Path(write_beir(root / "v1" / "beir", data, n=8)),
        "other_task": Path(write_beir(root / "v2" / "beir", data, n=12)),
    }


def base_args(files: dict[str, Path], output: Path) -> list[str]:
    return [
        "--model", str(files["model"]), "--data", str(files["data"]), "--batch-size", "8",
        "--chunk-size", "8", "--max-steps", "2", "--training.cpu", "true",
        "--training.report_to", "[]", "--data.num_workers", "0", "--output-dir", str(output),
        "--model.query_max_length", "16", "--model.document_max_length", "24",
    ]  # fmt: skip


def train(*argv: str) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))


# -- nothing a user left is touched --------------------------------------------------------


def test_a_users_own_logs_folder_is_kept_and_named(files, tmp_path, capsys):
    output = tmp_path / "exp"
    (output / "logs").mkdir(parents=True)
    (output / "logs" / "notes.txt").write_text("my notes")
    for flags in ([], ["--overwrite"]):
        assert train(*base_args(files, output), *flags) == 2
        err = capsys.readouterr().err
        assert f"{output / 'logs'}: not written by retriever" in err and "Traceback" not in err
    assert (output / "logs" / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in output.iterdir()) == ["logs"]


def test_a_users_commented_config_in_the_output_dir_is_never_replaced(files, tmp_path, capsys):
    output = tmp_path / "exp2"
    output.mkdir()
    text = f"# my experiment\nmodel:\n  name_or_path: {files['model']}  # tiny\n"
    (output / "config.yaml").write_text(text)
    assert train(str(output / "config.yaml"), *base_args(files, output)) == 2
    assert f"{output / 'config.yaml'}: not written by retriever" in capsys.readouterr().err
    assert (output / "config.yaml").read_text() == text


def test_what_a_run_of_ours_left_is_ours_to_replace(files, tmp_path):
    from retriever.train.run_directory import MARKER, RunDirectory

    output = tmp_path / "run"
    assert train(*base_args(files, output)) == 0
    assert (output / MARKER).is_file() and RunDirectory(output).foreign_artifacts() == []
    (output / MARKER).unlink()  # as a run of a version before the marker left it
    assert RunDirectory(output).foreign_artifacts() == []  # its config and checkpoints prove it
    assert train(*base_args(files, output), "--overwrite") == 0


# -- nothing wrong is silent -----------------------------------------------------------------


def test_eval_sets_in_folders_of_one_name_keep_their_own_scores(files, tmp_path):
    from retriever.eval.data import load_beir
    from retriever.eval.evaluator import evaluate_task
    from retriever.model import Encoder

    output = tmp_path / "run"
    tasks = f"[{files['task']}, {files['other_task']}]"
    args = ["--eval-data", tasks, "--eval.metric", "mean_main_score", "--max-steps", "1"]
    assert train(*base_args(files, output), *args, "--eval.at_start", "false") == 0
    (record,) = [json.loads(line) for line in (output / "eval.jsonl").read_text().splitlines()]
    encoder = Encoder.from_pretrained(str(output / "final"))
    want = [
        evaluate_task(encoder, load_beir(str(path), "test"), show_progress=False)["main_score"]
        for path in (files["task"], files["other_task"])
    ]
    assert record["v1/beir/main_score"] == pytest.approx(want[0], abs=1e-6)
    assert record["v2/beir/main_score"] == pytest.approx(want[1], abs=1e-6)
    assert record["mean_main_score"] == pytest.approx(sum(want) / 2, abs=1e-6)


def test_the_same_eval_set_twice_is_refused(files, tmp_path, capsys):
    tasks = f"[{files['task']}, {files['task']}]"
    assert train(*base_args(files, tmp_path / "run"), "--eval-data", tasks) == 2
    assert "eval.data[1]: the same task as eval.data[0]" in capsys.readouterr().err


def write_sts(path: Path, scores: list[object]) -> Path:
    lines = [
        json.dumps({"sentence1": f"cell {i} grows", "sentence2": f"cell {i} lives", "score": s})
        for i, s in enumerate(scores)
    ]
    path.write_text("\n".join(lines) + "\n")  # json writes NaN for nan, and reads it back
    return path


def test_a_nan_sts_score_is_refused_naming_its_line(files, tmp_path, capsys):
    sts = write_sts(tmp_path / "sts.jsonl", [1.0, 2.5, float("nan"), 4.0])
    source = f"[{{path: {files['data']}}}, {{path: {sts}, task: sts}}]"
    assert train(*base_args(files, tmp_path / "a"), "--data", source) == 2
    assert f"{sts}:3: 'score' must be a finite number" in capsys.readouterr().err
    assert train(*base_args(files, tmp_path / "b"), "--eval-data", str(sts)) == 2
    assert f"{sts}:3: 'score' must be a finite number" in capsys.readouterr().err


def test_constant_sts_scores_are_warned_once_without_scipys_warning(files, tmp_path, caplog):
    import warnings

    from retriever.eval.sts import evaluate_sts, load_sts
    from retriever.model import Encoder

    sts = write_sts(tmp_path / "flat.jsonl", [3.0, 3.0, 3.0])
    with caplog.at_level(logging.WARNING, logger="retriever"):
        task = load_sts(sts)
    assert "all 3 scores are 3" in caplog.text
    encoder = Encoder.from_pretrained(str(files["model"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning would raise here
        result = evaluate_sts(encoder, task)
    assert result["main_score"] != result["main_score"]  # nan: undefined, as said


def test_only_zero_loss_weights_are_refused(files, tmp_path, capsys):
    source = f"[{{path: {files['data']}, loss_weight: 0}}]"
    assert train(*base_args(files, tmp_path / "run"), "--data", source) == 2
    assert "every source has loss_weight 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_options_that_do_nothing_are_named(files, tmp_path, caplog):
    from retriever.train.config import config_from_dict

    values = {
        "model": {"name_or_path": "m"},
        "data": {"train": "x.jsonl"},
        "training": {"output_dir": str(tmp_path)},
        "loss": {"gcl_gamma_min": 0.5, "temperature": 0.05},
        "mining": {"remine_every": 50},
        "eval": {"batch_size": 32},
    }
    with caplog.at_level(logging.WARNING, logger="retriever"):
        config_from_dict(values)
    said = caplog.text
    assert "loss.gcl_gamma_min does nothing here: it is used with loss.objective: gcl" in said
    assert "mining.remine_every does nothing here: it is used with mining.dynamic: true" in said
    assert "eval.batch_size does nothing here: it is used with eval.data" in said
    assert "loss.temperature" not in said
    caplog.clear()
    values["loss"]["objective"] = "gcl"
    with caplog.at_level(logging.WARNING, logger="retriever"):
        config_from_dict(values)
    assert "gcl_gamma_min" not in caplog.text


def test_remining_under_other_settings_than_mined_is_refused(files, tmp_path, capsys):
    from retriever.cli import main

    mined = tmp_path / "mined.jsonl"
    args = ["--model", str(files["model"]), "--data", str(files["data"]), "--output", str(mined)]
    args += ["--query-max-length", "16", "--document-max-length", "32", "--no-progress"]
    assert main(["mine", *args, "--num-negatives", "2", "--range-max", "20"]) == 0
    common = [*base_args(files, tmp_path / "run"), "--data", str(mined), "--negatives", "2"]
    common += ["--mining.dynamic", "true"]
    assert train(*common, "--model.document_max_length", "24") == 2
    err = capsys.readouterr().err
    assert "was mined with document_max_length = 32 (its .meta.json)" in err
    assert "this run trains with document_max_length = 24" in err
    assert "Set model.document_max_length: 32" in err
    assert train(*common, "--model.document_max_length", "32") == 0


# -- failures end in a message ---------------------------------------------------------------


def test_a_full_disk_while_checkpointing_is_a_message_and_leaves_no_partial(
    files, tmp_path, capsys, monkeypatch
):
    import safetensors.torch

    output = tmp_path / "run"
    real_serialize = safetensors.torch.serialize_file  # what every caller's save_file reaches

    def full_disk(tensors, filename, *args, **kwargs):
        if ".step-00000002.partial" in str(filename):
            raise safetensors.SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real_serialize(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "serialize_file", full_disk)
    args = [*base_args(files, output), "--training.save_steps", "1", "--max-steps", "3"]
    for flags in ([], ["--resume"]):
        assert train(*args, *flags) == 2
        err = capsys.readouterr().err
        assert "step-00000002: could not write the checkpoint (no space left on device)" in err
        assert "the newest complete one is" in err and "Traceback" not in err
        names = sorted(p.name for p in (output / "checkpoints").iterdir())
        assert names == ["step-00000001"]  # the partial one is gone


def test_a_restart_right_after_kill_9_is_not_refused(files, tmp_path):
    """DataLoader workers outlive a killed trainer for a moment; they must not hold its lock."""
    output = tmp_path / "run"
    args = base_args(files, output)
    args[args.index("--data.num_workers") + 1] = "2"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    faults = [sys.executable, str(ROOT / "tests" / "faults.py"), "step:2", "--", "train"]
    killed = subprocess.run([*faults, *args, "--max-steps", "4", "--training.save_steps", "1"],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    started = time.monotonic()
    assert train(*args, "--max-steps", "4", "--resume") == 0
    assert time.monotonic() - started < 120


# -- unclear messages ------------------------------------------------------------------------


def test_a_retrieval_source_on_sts_pairs_suggests_task_sts(files, tmp_path, capsys):
    sts = write_sts(tmp_path / "sts.jsonl", [1.0, 2.0, 3.0])
    assert train(*base_args(files, tmp_path / "a"), "--data", str(sts)) == 2
    assert "task: sts" in capsys.readouterr().err
    source = f"[{{path: {files['data']}, task: sts}}]"
    assert train(*base_args(files, tmp_path / "b"), "--data", source) == 2
    assert "looks like a retrieval example: give its source task: retrieval" in (
        capsys.readouterr().err
    )


def test_source_format_typos_and_empty_source_lists_are_named(files, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(f"data:\n  train:\n    - path: {files['data']}\n      format: jsnol\n")
    without_data = base_args(files, tmp_path / "a")
    del without_data[2:4]  # --data PATH: the config's sources stand
    assert train(str(config), *without_data) == 2
    err = capsys.readouterr().err
    assert f"{config}:3: data.train[0]: format: 'jsnol' is not one of" in err
    assert "did you mean 'jsonl'?" in err
    config.write_text("data:\n  train: []\n")
    assert train(str(config), *without_data) == 2
    err = capsys.readouterr().err
    assert "the list of sources is empty" in err and "required" not in err


def test_an_sts_only_evaluation_picks_its_main_score_by_default(files, tmp_path):
    sts = write_sts(tmp_path / "sts.jsonl", [1.0, 2.0, 3.5, 0.5])
    output = tmp_path / "run"
    assert train(*base_args(files, output), "--eval-data", str(sts)) == 0
    record = json.loads((output / "eval.jsonl").read_text().splitlines()[-1])
    assert record["main_score"] == record["spearman"]
    assert json.loads((output / "best" / "eval.json").read_text())["task"] == "sts"


# -- the newcomer's path ---------------------------------------------------------------------


def test_every_install_line_names_the_distribution_on_the_package_index():
    import re

    name = re.search(r'^name = "(.+?)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert name != "retriever"  # "Data Retriever" 3.1.0 on the package index
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "retriever").rglob("*.py")]
    for path in texts:
        for line in path.read_text(encoding="utf-8").splitlines():
            for spec in re.findall(r"pip install ['\"]?(retriever[^ '\"`]*)", line):
                assert spec.startswith(name), f"{path}: {line.strip()}"


def test_the_quickstart_keeps_no_optimizer_state(tmp_path):
    values = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    assert values["training"]["save_checkpoints"] is False


def test_a_run_without_checkpoints_saves_final_and_replaces_cleanly(files, tmp_path, capsys):
    output = tmp_path / "run"
    args = [*base_args(files, output), "--training.save_checkpoints", "false"]
    assert train(*args) == 0
    assert (output / "final").is_dir() and not (output / "checkpoints").exists()
    assert train(*args) == 2  # final/ is a result: kept
    assert "already holds a run" in capsys.readouterr().err
    assert train(*args, "--overwrite") == 0
    assert not any(p.name.startswith(".replaced") for p in output.iterdir())


def test_evaluation_inside_training_shows_progress(files, tmp_path, capsys):
    assert train(*base_args(files, tmp_path / "run"), "--eval-data", str(files["task"])) == 0
    assert "encode documents" in capsys.readouterr().err
