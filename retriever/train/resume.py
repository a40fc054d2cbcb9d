"""Planning a run's start: where the run directory stands, what may be resumed, and what must
not change when it is (read-only: the trainer writes only once everything has loaded)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from retriever.train.config import TrainConfig, apply_mapping, differing_options
from retriever.train.run_directory import (
    CHECKPOINTS,
    MARKER,
    RunDirectory,
    RunError,
    newest_valid_checkpoint,
    verify_checkpoint,
)

logger = logging.getLogger(__name__)

# Options that must not change when a run is resumed: they change the model, the data order or
# the random stream, so the continuation would not be the run that was started.
FIXED_ON_RESUME = (
    "model.",
    "data.train",
    "data.format",
    "data.split",
    "data.negatives",
    "data.max_examples",
    "loss.",
    "training.batch_size",
    "training.chunk_size",
    "training.chunk_tokens",
    "training.embed_chunk_size",
    "training.seed",
    "training.sort_by_length",
    "training.mixed_precision",
    "mining.dynamic",
)


def read_run_config(path: Path) -> TrainConfig:
    """The config saved in a run directory or checkpoint (``path`` holds config.yaml)."""
    path = Path(path) / "config.yaml"
    config = TrainConfig()
    apply_mapping(config, yaml.compose(path.read_text(encoding="utf-8")), str(path))
    return config


def _check_unchanged(config: TrainConfig, checkpoint: Path, output_dir: Path) -> None:
    """A resumed run must keep what shapes the model, the data order and the random stream."""
    saved_in = checkpoint if (checkpoint / "config.yaml").is_file() else output_dir
    if not (saved_in / "config.yaml").is_file():
        return
    changed = [
        key
        for key in differing_options(read_run_config(saved_in), config)
        if key.startswith(FIXED_ON_RESUME)
    ]
    if changed:
        raise RunError(
            f"--resume: {', '.join(changed)} differ from {saved_in / 'config.yaml'}; "
            "a resumed run must keep the model, data, loss, batch and seed"
        )


def plan_run_directory(
    config: TrainConfig, resume: bool | str | None, overwrite: bool
) -> Path | None:
    """Check the run directory (read-only); return the verified checkpoint to resume from.

    A directory that holds no results (its run stopped before saving a checkpoint, a final or a
    trained best model) is not protected: a plain start replaces what is there, as with
    ``--overwrite`` (put back if this start fails first)."""
    output_dir = Path(config.training.output_dir)
    run = RunDirectory(output_dir)
    _refuse_foreign(run)
    if resume:
        if overwrite:
            raise RunError("--resume and --overwrite contradict each other; pick one")
        if resume is True:
            if run.artifacts() and not run.holds_results():
                raise RunError(
                    f"--resume: the run in {output_dir} stopped before its first checkpoint, so "
                    "there is nothing to resume; start it again without --resume"
                )
            checkpoint, skipped = newest_valid_checkpoint(output_dir)
            for reason in skipped:
                logger.warning("--resume: skipped %s", reason)
        else:
            checkpoint = Path(resume)
            if not checkpoint.is_dir():
                raise RunError(f"--resume: {checkpoint}: no such checkpoint directory")
            if (checkpoint / CHECKPOINTS).is_dir() or (checkpoint / "final").is_dir():
                raise RunError(
                    f"--resume {checkpoint}: that is a run directory, not a checkpoint; pass "
                    f"--resume alone (with --output-dir {checkpoint}), or one of its "
                    f"{CHECKPOINTS}/step-N directories"
                )
            verify_checkpoint(checkpoint)
        _check_unchanged(config, checkpoint, output_dir)
        return checkpoint
    existing = run.artifacts()
    if existing and not overwrite and run.holds_results():
        raise RunError(
            f"{output_dir} already holds a run ({', '.join(existing)}); pass --resume to "
            "continue it or --overwrite to replace it"
        )
    return None


def _refuse_foreign(run: RunDirectory) -> None:
    """A start writes (and ``--overwrite`` replaces) the files of `RUN_ARTIFACTS`: one of those
    names that a person put there stops it, whatever the flags."""
    foreign = run.foreign_artifacts()
    if foreign:
        names = ", ".join(str(p) for p in foreign)
        hint = (
            " (keep a config beside the run, e.g. as train.yaml)"
            if any(p.name == "config.yaml" for p in foreign)
            else ""
        )
        raise RunError(
            f"{names}: not written by retriever ({run.path} has no {MARKER}), and a run writes "
            f"its own files under {'these names' if len(foreign) > 1 else 'that name'} there: "
            f"move {'them' if len(foreign) > 1 else 'it'} elsewhere{hint} or choose another "
            "training.output_dir"
        )


def saved_state(checkpoint: Path) -> dict:
    """The trainer state (``trainer_state.json``) that ``checkpoint`` holds."""
    return json.loads((checkpoint / "trainer_state.json").read_text("utf-8"))


def check_same_data(config: TrainConfig, checkpoint: Path, fingerprint: str) -> None:
    """The examples must be those the checkpoint trained on (the same file may have changed)."""
    saved = saved_state(checkpoint)
    if saved.get("data_fingerprint") not in (None, fingerprint):
        data = config.data.train if config.data.train is not None else "Trainer(train_dataset=...)"
        raise RunError(
            f"resume: {data} is not the training data {checkpoint} was trained on (its "
            "examples changed); a resumed run must see the same data"
        )


def check_same_sharding(checkpoint: Path, sharded: bool) -> None:
    """A sharded run's checkpoints hold FSDP's whole state in place of the model and optimizer
    files, so a run resumes only the way it was saved (sharded or not; any number of
    processes when sharded)."""
    saved = saved_state(checkpoint)
    if bool(saved.get("sharded")) != sharded:
        how = "a sharded (training.fsdp) run" if saved.get("sharded") else "an unsharded run"
        now = "sharded" if sharded else "not sharded (training.fsdp off, or one process)"
        raise RunError(
            f"--resume: {checkpoint} was saved by {how} and this run is {now}; resume it the "
            "way it was saved (training.fsdp and several processes go together)"
        )


def check_steps_left(config: TrainConfig, checkpoint: Path, step: int, total: int) -> None:
    if step > total:
        where = config.where("training.max_steps")
        raise RunError(
            f"--resume: {checkpoint} is at step {step}, past the {total} steps this run is to "
            f"train ({where}); raise training.max_steps or resume an earlier checkpoint"
        )


def saved_chunk_sizes(checkpoint: Path | None) -> list[int] | None:
    """The chunk sizes ``checkpoint`` trained with (an auto size must not change on resume)."""
    if checkpoint is None:
        return None
    saved = saved_state(checkpoint)
    return saved.get("chunk_sizes")


def load_checkpoint(
    accelerator: Any,
    config: TrainConfig,
    checkpoint: Path,
    fingerprint: str,
    state: Any,
    total: int,
    sharded: bool = False,
) -> None:
    """Load ``checkpoint`` into the run (its registered objects, ``state`` among them) once its
    data is known to be this run's, and check that steps are left to train."""
    check_same_data(config, checkpoint, fingerprint)
    check_same_sharding(checkpoint, sharded)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as exc:  # verified files that still do not fit this model or run
        raise RunError(f"--resume: {checkpoint} could not be loaded: {exc}") from None
    check_steps_left(config, checkpoint, state.step, total)
    logger.info("resumed from %s at step %d", checkpoint, state.step)
