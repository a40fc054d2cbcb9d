"""The run directory's protocol, state by state: atomic publishing, checkpoint manifests, and the
repair of every state an interrupted ``--overwrite`` can leave (retriever/run_directory.py)."""

from __future__ import annotations

import pytest

from retriever.fileio import atomic_directory
from retriever.train.run_directory import (
    REPLACED,
    RESTORING,
    SETTING_ASIDE,
    RunDirectory,
    RunError,
    checkpoint_dir,
    newest_valid_checkpoint,
    remove_checkpoint,
    truncate_logs,
    verify_checkpoint,
    write_manifest,
)


def _tree(root):
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _old_run(root):
    (root / "checkpoints" / "step-00000002").mkdir(parents=True)
    (root / "checkpoints" / "step-00000002" / "model.bin").write_text("old weights")
    write_manifest(root / "checkpoints" / "step-00000002", 2)
    (root / "final").mkdir()
    (root / "final" / "model.bin").write_text("old final")
    (root / "config.yaml").write_text("old: config")
    (root / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    return _tree(root)


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("killed mid-write")
    assert _tree(tmp_path) == {"final/a": "old"}
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("new")
    assert _tree(tmp_path) == {"final/b": "new"}


def test_a_publish_killed_between_its_renames_is_undone(tmp_path):
    # publish() moved final/ to .final.old, then died before renaming the new one into place.
    (tmp_path / ".final.old").mkdir()
    (tmp_path / ".final.old" / "a").write_text("old")
    (tmp_path / ".final.partial").mkdir()
    (tmp_path / ".final.partial" / "a").write_text("new, maybe whole, never published")
    RunDirectory(tmp_path).recover()
    assert _tree(tmp_path) == {"final/a": "old"}


def test_manifest_names_missing_truncated_and_altered_files(tmp_path):
    step = checkpoint_dir(tmp_path, 4)
    step.mkdir(parents=True)
    (step / "optimizer.bin").write_bytes(b"\x00" * 64)
    (step / "model.safetensors").write_bytes(b"\x01" * 64)
    write_manifest(step, 4)
    verify_checkpoint(step)
    (step / "optimizer.bin").write_bytes(b"\x00" * 63 + b"\x02")  # same size, one byte off
    with pytest.raises(RunError, match=r"optimizer\.bin: its contents differ"):
        verify_checkpoint(step)
    (step / "optimizer.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(
        RunError, match=r"optimizer\.bin: 10 bytes where the checkpoint recorded 64"
    ):
        verify_checkpoint(step)
    (step / "model.safetensors").unlink()
    with pytest.raises(RunError, match=r"model\.safetensors: missing"):
        verify_checkpoint(step)


def test_resume_takes_the_newest_checkpoint_that_verifies(tmp_path):
    for n in (2, 4, 6):
        step = checkpoint_dir(tmp_path, n)
        step.mkdir(parents=True)
        (step / "state").write_text(str(n))
        if n != 6:  # step 6 was being written when the run was killed: no manifest
            write_manifest(step, n)
    (checkpoint_dir(tmp_path, 4) / "state").write_text("x")  # and step 4 got damaged
    found, skipped = newest_valid_checkpoint(tmp_path)
    assert found == checkpoint_dir(tmp_path, 2)
    assert "step-00000006: no manifest.json" in skipped[0] and "step-00000004/state" in skipped[1]


@pytest.mark.parametrize("moved", [0, 2, 5])
def test_a_move_aside_killed_half_way_is_put_back(tmp_path, moved):
    before = _old_run(tmp_path)
    aside = tmp_path / SETTING_ASIDE
    aside.mkdir()
    for name in ["checkpoints", "final", "config.yaml", "log.jsonl"][:moved]:
        (tmp_path / name).rename(aside / name)
    RunDirectory(tmp_path).recover()
    assert _tree(tmp_path) == before


def test_a_replacing_run_without_checkpoint_is_rolled_back(tmp_path):
    before = _old_run(tmp_path)
    run = RunDirectory(tmp_path)
    run.set_aside()
    assert run.artifacts() == [] and (tmp_path / REPLACED).is_dir()
    run.write_config("new: config")
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    assert "put back" in RunDirectory(tmp_path).recover()  # as the next start after a kill does
    assert _tree(tmp_path) == before


def test_a_restore_killed_half_way_is_finished(tmp_path):
    before = _old_run(tmp_path)
    restoring = tmp_path / RESTORING
    restoring.mkdir()
    for name in ["final", "log.jsonl"]:  # these had not been moved back yet
        (tmp_path / name).rename(restoring / name)
    RunDirectory(tmp_path).recover()
    assert _tree(tmp_path) == before


def test_a_replacing_run_with_a_checkpoint_stands(tmp_path):
    _old_run(tmp_path)
    run = RunDirectory(tmp_path)
    run.set_aside()
    step = checkpoint_dir(tmp_path, 1)
    step.mkdir(parents=True)
    (step / "model.bin").write_text("new weights")
    write_manifest(step, 1)
    # Killed after publishing its first checkpoint, before deleting the old run.
    assert RunDirectory(tmp_path).recover() is None
    assert not (tmp_path / REPLACED).exists()
    assert (step / "model.bin").read_text() == "new weights"


def test_truncate_logs_keeps_records_up_to_the_step(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\nnot json\n')
    truncate_logs(tmp_path, 2)
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1}\n{"step": 2}\nnot json\n'


def test_a_pruned_checkpoint_is_gone_whole_even_if_the_delete_was_cut_short(tmp_path):
    step = checkpoint_dir(tmp_path, 2)
    step.mkdir(parents=True)
    (step / "model.bin").write_text("weights")
    write_manifest(step, 2)
    remove_checkpoint(step)
    assert not step.exists() and not list((tmp_path / "checkpoints").iterdir())
    # Killed inside the delete: what is left has another name, and the next start removes it.
    half = tmp_path / "checkpoints" / ".step-00000004.deleting"
    half.mkdir()
    (half / "optimizer.bin").write_text("half")
    RunDirectory(tmp_path).recover()
    assert not half.exists()
