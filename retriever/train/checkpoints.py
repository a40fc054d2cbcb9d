"""Writing a checkpoint so that a kill at any moment leaves it whole or absent: Accelerate's
state (model, optimizer, scheduler, RNG of every process, registered objects) and the trainer's
own files go into a hidden ``.step-N.partial`` directory, the manifest (sizes and hashes) is
written last, and one rename publishes it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from retriever.fileio import partial_path, publish
from retriever.train.run_directory import RunError, list_checkpoints, write_manifest


def save_checkpoint(accelerator: Any, path: Path, files: dict[str, str]) -> Path:
    """Save to ``path`` (``checkpoints/step-N``) with ``files`` (name -> text) beside
    Accelerate's; a failure (a full disk, a quota) removes the partial directory and names the
    newest complete checkpoint."""
    acc = accelerator
    partial = partial_path(path)
    if acc.is_main_process and partial.exists():
        shutil.rmtree(partial)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(partial))
        acc.wait_for_everyone()  # every process's files (RNG states) are on disk
        if acc.is_main_process:
            for name, text in files.items():
                (partial / name).write_text(text, encoding="utf-8")
            write_manifest(partial, int(path.name[5:]))
            publish(partial, path)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        newest = list_checkpoints(path.parent.parent)
        raise RunError(
            f"{path}: could not write the checkpoint ({exc}); "
            + (f"the newest complete one is {newest[-1]}" if newest else "none is complete")
        ) from None
    return path
