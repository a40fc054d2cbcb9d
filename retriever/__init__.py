"""retriever: train dense retrieval embedding models with a near-infinite-batch contrastive loss.

The public API (docs/api.md)::

    from retriever import Trainer, TrainConfig, Encoder
    from retriever import InfoNCELoss, InfCLLoss, contrastive_loss
    from retriever import evaluate_task, load_task

Layers, each importing only those below it:

* `fileio` (atomic writes, hashes) and `data` (the training-data format, JSONL texts and ids);
* `loss`: InfoNCE tile by tile, the ring across processes, the objectives, the embedding cache;
* `model`: `Encoder` and its `EncoderSettings`, sentence-transformers directories;
* `eval`: retrieval and STS tasks, encode-and-search (shared with mining), metrics;
* `mining`: hard negatives, static and dynamic;
* `train`: options and config, data, token cache, loader, the cached step, the run directory,
  the trainer;
* `cli`: the ``retriever`` command (``train``, ``eval``, ``mine``).

The names below are imported when first used, so ``import retriever`` stays cheap. The
``train`` function is not among them: ``retriever.train`` is the subpackage (import the
function from ``retriever.train.trainer``, or call ``Trainer(config).train()``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Trainer": "retriever.train.trainer",
    "TrainConfig": "retriever.train.config",
    "ConfigError": "retriever.train.options",
    "Encoder": "retriever.model.encoder",
    "EncoderSettings": "retriever.model.settings",
    "contrastive_loss": "retriever.loss.functional",
    "InfoNCELoss": "retriever.loss.infonce",
    "InfCLLoss": "retriever.loss.infcl_loss",
    "evaluate_task": "retriever.eval.evaluator",
    "load_task": "retriever.eval.data",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retriever' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
