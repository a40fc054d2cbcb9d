"""The run directory: what a run writes, checkpoints that are whole or absent, and an
``--overwrite`` that cannot destroy a run.

Layout (``training.output_dir``)::

    config.yaml               the effective configuration
    checkpoints/step-000100/  resumable state, with manifest.json (sizes and hashes) written last
    best/  final/             sentence-transformers models
    log.jsonl eval.jsonl mining.jsonl logs/

Every directory the run publishes (a checkpoint, ``best/``, ``final/``) is written under a hidden
``.NAME.partial`` name and renamed into place once complete, so a run killed at any moment
leaves either the old version or the new one, never half of one. A checkpoint counts only with
its manifest; loading one first checks every file against it, so a truncated or corrupted file
is named instead of being loaded (or, for RNG states, silently skipped).

``--overwrite`` moves the old run aside into ``.replaced-run/`` and deletes it only once the new
run has published its first checkpoint; a new run that fails or is interrupted before then puts
the old one back, also when it was killed (the next start in that directory repairs it):

* ``.replaced-run.partial/``: the move aside was interrupted; its contents go back.
* ``.replaced-run/``: the old run, whole. With a complete checkpoint beside it the new run
  succeeded and it is deleted; otherwise the new run's files are removed and it goes back.
* ``.restoring-run/``: putting it back was interrupted (the new run's files are already gone).

Only what a start of ours wrote is ever moved or replaced: every start writes ``.retriever-run``
before anything else, and the names of `RUN_ARTIFACTS` in a directory without it (a user's own
``logs/`` or ``config.yaml``) stop the start, named, unless they are provably ours (a
``config.yaml`` that is exactly a config we dump, a ``checkpoints/`` of step directories: runs of
versions before the marker).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from retriever.fileio import (
    directory_problem,
    file_hash,
    fsync_directory,
    write_text_atomically,
)
from retriever.train.options import SECTIONS

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Files and directories a run writes; --overwrite replaces exactly these.
RUN_ARTIFACTS = (
    "config.yaml",
    CHECKPOINTS,
    "best",
    "final",
    "final-adapter",
    "logs",
    "log.jsonl",
    "eval.jsonl",
    "mining.jsonl",
)
LOGS_BY_STEP = ("log.jsonl", "eval.jsonl", "mining.jsonl")
SETTING_ASIDE, REPLACED, RESTORING = ".replaced-run.partial", ".replaced-run", ".restoring-run"
LOCK = ".lock"
MARKER = ".retriever-run"


class RunError(RuntimeError):
    """The run directory cannot be used as asked (exists, nothing to resume, corrupted, ...)."""


# --- checkpoints and their manifests --------------------------------------------------------


def write_manifest(directory: Path, step: int) -> None:
    """Record every file's size and hash, fsync them, and write the manifest last."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "xxh3_128": file_hash(path)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    write_text_atomically(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def verify_checkpoint(directory: Path) -> None:
    """Raise ``RunError`` naming the first file of ``directory`` that is missing or differs from
    what its manifest recorded."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise RunError(
            f"{directory}: no {MANIFEST}, so the checkpoint is incomplete (the run stopped "
            "while writing it) or was not written by this version of retriever"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise RunError(f"{manifest_path}: corrupted (not a manifest retriever wrote)") from None
    for rel, expected in files.items():
        path = directory / rel
        if not path.is_file():
            raise RunError(f"{path}: missing from the checkpoint (listed in its {MANIFEST})")
        size = path.stat().st_size
        if size != expected["size"]:
            raise RunError(
                f"{path}: {size} bytes where the checkpoint recorded {expected['size']} "
                "(truncated or replaced); this checkpoint cannot be resumed"
            )
        if file_hash(path) != expected["xxh3_128"]:
            raise RunError(
                f"{path}: its contents differ from what the checkpoint recorded (corrupted); "
                "this checkpoint cannot be resumed"
            )


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def step_directories(output_dir: Path) -> list[Path]:
    """``checkpoints/step-N`` directories, oldest first (complete or not)."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first."""
    return [p for p in step_directories(output_dir) if (p / MANIFEST).is_file()]


def newest_valid_checkpoint(output_dir: Path) -> tuple[Path, list[str]]:
    """The newest checkpoint that verifies, and why each newer one was skipped."""
    skipped = []
    for candidate in reversed(step_directories(output_dir)):
        try:
            verify_checkpoint(candidate)
        except RunError as exc:
            skipped.append(str(exc))
            continue
        return candidate, skipped
    reasons = "; ".join(skipped)
    raise RunError(
        f"--resume: {output_dir} holds no checkpoint to resume from"
        + (f" (none is complete: {reasons})" if skipped else "")
    )


def remove_stale_partials(output_dir: Path) -> None:
    """Tidy what a killed write left: half-written ``.NAME.partial`` directories go (they were
    never published); a ``.NAME.old`` whose ``NAME`` is missing (killed between the two renames
    of :func:`publish`) goes back to ``NAME``."""
    for parent in (Path(output_dir), Path(output_dir) / CHECKPOINTS):
        for old in parent.glob(".*.old"):
            target = parent / old.name[1 : -len(".old")]
            if target.exists():
                shutil.rmtree(old)
            else:
                logger.warning("restoring %s, which an interrupted save had moved aside", target)
                os.replace(old, target)
        for partial in [*parent.glob(".*.partial"), *parent.glob(".*.deleting")]:
            if partial.name != SETTING_ASIDE:
                logger.info("removing %s, left by an interrupted write", partial)
                shutil.rmtree(partial)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that a kill half-way leaves no half of it under its name."""
    doomed = path.parent / f".{path.name}.deleting"
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def truncate_logs(output_dir: Path, step: int) -> None:
    """Drop records after ``step`` from the step logs: a resumed run writes them again."""
    for name in LOGS_BY_STEP:
        path = Path(output_dir) / name
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) != len(lines):
            write_text_atomically(path, "".join(kept))


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0  # a line that is not a record of ours is kept


# --- replacing a run --------------------------------------------------------------------------


_HELD: set[Path] = set()  # the run directories this process has locked


class RunDirectory:
    """One run directory and the ``--overwrite`` protocol of the module docstring."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir)
        self.replacing = False  # this process set an old run aside and has not discarded it
        self._lock: Any = None
        self._created = False

    def artifacts(self) -> list[str]:
        return [name for name in RUN_ARTIFACTS if (self.path / name).exists()]

    def foreign_artifacts(self) -> list[Path]:
        """Files and folders here under the names a run writes that no start of ours can be
        shown to have written (a user's own ``logs/`` or ``config.yaml``): a start must neither
        remove nor replace them."""
        present = self.artifacts()
        if (self.path / MARKER).is_file():
            return []
        # A run of a version before the marker proves itself by what only we write.
        older_run = any(self._provably_ours(name) for name in present)
        return [
            self.path / name
            for name in present
            if not self._provably_ours(name) and (name == "config.yaml" or not older_run)
        ]

    def _provably_ours(self, name: str) -> bool:
        path = self.path / name
        if name == "config.yaml":
            return _is_dumped_config(path)
        if name == CHECKPOINTS:
            return path.is_dir() and all(_STEP_ENTRY.fullmatch(p.name) for p in path.iterdir())
        return False

    def mark(self) -> None:
        """Record that the run files here are ours (before the start writes any)."""
        if not (self.path / MARKER).is_file():
            text = json.dumps({"written_by": "retriever train", "run_files": RUN_ARTIFACTS})
            write_text_atomically(self.path / MARKER, text + "\n")

    def holds_results(self) -> bool:
        """Whether the run here saved anything worth keeping: a checkpoint, ``final/``, or a
        ``best/`` from after training began (not the start's own evaluation at step 0)."""
        if list_checkpoints(self.path) or (self.path / "final").exists():
            return True
        best = self.path / "best" / "eval.json"
        try:
            return best.is_file() and json.loads(best.read_text("utf-8")).get("step", 1) > 0
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return True  # unreadable: keep it

    def lock(self) -> None:
        """Hold the directory for this process: a second ``retriever train`` on it (a refused
        start too) stops at once instead of touching a live run. Released by :meth:`unlock`,
        or by the system the moment this process dies: a POSIX record lock belongs to the
        process alone, where a ``flock`` would live on in forked DataLoader workers."""
        problem = directory_problem(self.path)
        if problem:
            raise RunError(f"training.output_dir: {problem}")
        if self.path.resolve() in _HELD:  # a record lock would grant this process it again
            raise RunError(
                f"{self.path} is in use by a running `retriever train` (pid {os.getpid()}, this "
                "process); wait for it to finish or stop it first"
            )
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK, "a+", encoding="utf-8")
        try:
            import fcntl

            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no protection against a second process
            pass
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise RunError(
                f"{self.path} is in use by a running `retriever train` ({owner}); wait for it "
                "to finish or stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock = handle
        _HELD.add(self.path.resolve())

    def unlock(self) -> None:
        """Release the directory; remove the lock file, and the directory if this start made
        it and left nothing in it."""
        if self._lock is None:
            return
        (self.path / LOCK).unlink(missing_ok=True)
        self._lock.close()
        self._lock = None
        _HELD.discard(self.path.resolve())
        if self._created and not any(self.path.iterdir()):
            self.path.rmdir()

    def _move_artifacts(self, source: Path, target: Path) -> None:
        for name in RUN_ARTIFACTS:
            if (source / name).exists():
                os.replace(source / name, target / name)

    def _remove_artifacts(self) -> None:
        for name in self.artifacts():
            path = self.path / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def recover(self) -> str | None:
        """Repair what a killed run left: half-written directories, and an interrupted
        ``--overwrite`` (finished as the module docstring says). Returns what was put back."""
        remove_stale_partials(self.path)
        aside, replaced, restoring = (self.path / n for n in (SETTING_ASIDE, REPLACED, RESTORING))
        if aside.is_dir():
            self._move_artifacts(aside, self.path)
            aside.rmdir()
            return f"{self.path}: put back the run that an interrupted --overwrite was moving aside"
        if replaced.is_dir():
            if list_checkpoints(self.path) or (self.path / "final").is_dir():
                shutil.rmtree(replaced)
                return None  # the replacing run had published a checkpoint or final/: it stands
            self._remove_artifacts()
            os.replace(replaced, restoring)
        if restoring.is_dir():
            self._move_artifacts(restoring, self.path)
            restoring.rmdir()
            return (
                f"{self.path}: put back the run that an interrupted --overwrite was replacing "
                "(the replacing run had saved no checkpoint)"
            )
        return None

    def set_aside(self) -> None:
        """Move the current run into ``.replaced-run/`` (as one step: see the docstring)."""
        if not self.artifacts():
            return
        aside = self.path / SETTING_ASIDE
        aside.mkdir()
        self._move_artifacts(self.path, aside)
        os.replace(aside, self.path / REPLACED)
        fsync_directory(self.path)
        self.replacing = True

    def discard_replaced(self) -> None:
        """The new run has published a checkpoint: the old one is no longer needed."""
        if self.replacing:
            shutil.rmtree(self.path / REPLACED, ignore_errors=True)
            self.replacing = False

    def restore_replaced(self) -> None:
        """The new run failed before its first checkpoint: put the old run back."""
        if not self.replacing:
            return
        self._remove_artifacts()
        os.replace(self.path / REPLACED, self.path / RESTORING)
        self.recover()
        self.replacing = False
        logger.warning("the new run failed before its first checkpoint: %s is as before", self.path)

    def write_config(self, text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.path / "config.yaml", text)


_STEP_ENTRY = re.compile(r"step-\d+|\.step-\d+\.(partial|deleting|old)")


def _is_dumped_config(path: Path) -> bool:
    """Whether ``path`` is exactly what `TrainConfig.to_yaml` writes (no comment, no other
    layout): a config.yaml of a run, not one a person wrote."""
    try:
        text = path.read_text(encoding="utf-8")
        values = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(values, dict) or list(values) != list(SECTIONS):
        return False
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True) == text
