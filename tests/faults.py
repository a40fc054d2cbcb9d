"""Fault injection for the reliability tests: run ``retriever train`` in this process and kill it
(SIGKILL: no cleanup, no ``finally``) at a chosen point.

    python tests/faults.py KILL_POINT -- train CONFIG.yaml [options]

Kill points (the package is patched from outside; it has no test hooks):

* ``step:N``            inside optimizer step N, after its gradient, before its update
* ``saving:N:FILE``     while checkpoint N is written, just before FILE (e.g. optimizer.bin)
* ``manifest:N``        checkpoint N's files are all written, its manifest is not
* ``publish:NAME``      a complete ``NAME`` directory (final, best, step-N) is about to be renamed
                        into place
* ``model-save:NAME``   ``NAME`` (final or best) is being written: its temporary directory is empty
* ``none``              no kill
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    kind, _, arg = point.partition(":")
    if kind == "none":
        return
    if kind == "step":
        from retriever.train import trainer

        original_step = trainer.Trainer._optimizer_step

        def optimizer_step(self, batch, params):
            if self.state.step + 1 == int(arg):
                self._step(batch)  # the gradient is computed, the update never happens
                _die()
            return original_step(self, batch, params)

        trainer.Trainer._optimizer_step = optimizer_step
    elif kind == "saving":
        import torch

        step, _, name = arg.partition(":")
        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            path = str(f)
            if path.endswith(name) and f".step-{int(step):08d}.partial" in path:
                _die()
            return original_save(obj, f, *args, **kwargs)

        torch.save = save
    elif kind == "manifest":
        from retriever.train import checkpoints, run_directory

        original_manifest = run_directory.write_manifest

        def write_manifest(directory, step):
            if step == int(arg):
                _die()
            return original_manifest(directory, step)

        checkpoints.write_manifest = write_manifest
    elif kind == "publish":
        from retriever import fileio
        from retriever.train import checkpoints

        original_publish = fileio.publish

        def publish(partial, path):
            if path.name == arg:
                _die()
            return original_publish(partial, path)

        fileio.publish = checkpoints.publish = publish
    elif kind == "model-save":
        from retriever.model import encoder as modeling

        original_model_save = modeling.Encoder.save

        def model_save(self, path):
            if os.path.basename(str(path)) == f".{arg}.partial":
                _die()
            return original_model_save(self, path)

        modeling.Encoder.save = model_save
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # the same arithmetic in every process of a test
    point, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: faults.py KILL_POINT -- train CONFIG [options]"
    install(point)
    from retriever.cli import main

    sys.exit(main(argv))
