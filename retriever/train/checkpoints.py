"""Writing a checkpoint (and the final model) so that a kill at any moment leaves it whole or
absent: Accelerate's state (model, optimizer, scheduler, RNG of every process, registered
objects) and the trainer's own files go into a hidden ``.step-N.partial`` directory, the
manifest (sizes and hashes) is written last, and one rename publishes it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from retriever.fileio import atomic_directory, partial_path, publish, write_failure_reason
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
    except Exception as exc:  # the serialisers word a full disk in their own exceptions
        reason = write_failure_reason(exc, path)  # before the space is freed again
        shutil.rmtree(partial, ignore_errors=True)
        newest = list_checkpoints(path.parent.parent)
        raise RunError(
            f"{path}: could not write the checkpoint ({reason}); it was "
            "removed, and "
            + (f"the newest complete one is {newest[-1]}" if newest else "none is complete")
        ) from exc
    return path


def save_final(
    encoder: Any, master: Any, folder: Path, card: str, adapter: Path | None = None
) -> None:
    """The sentence-transformers model in ``folder`` (whole or absent) with its model card;
    from the fp32 master weights when the network trained in bf16 (``master``). ``adapter``:
    also the LoRA adapters alone there (peft's format)."""
    if master is not None:  # save the fp32 master weights, not their bf16 copy
        encoder.float()
        master.copy_to_model()
    with atomic_directory(folder) as final:
        encoder.save(final)
        (final / "README.md").write_text(card, encoding="utf-8")
    if adapter is not None:
        from retriever.model.lora import save_adapter

        with atomic_directory(adapter) as directory:
            save_adapter(encoder.model, directory)
