"""Inputs and header fields that more than one benchmark script uses (scripts/harness.py holds
the measuring itself).

* :func:`synthetic_vectors`: the clustered unit vectors of the search (bench_eval.py) and
  mining (bench_mining.py) benchmarks, so their numbers are comparable;
* :func:`search_fields`: the header fields of a search or mining benchmark (faiss, threads);
* :func:`run_config` and :func:`train`: a training config from one in configs/ with a run's
  changes, and one `retriever train` run of it (bench_objectives.py, bench_multitask.py).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import harness
import numpy as np
import torch


def synthetic_vectors(n: int, n_queries: int, dim: int, noise: float = 2.0, seed: int = 0):
    """Unit vectors around 4 * sqrt(n) random centres, each a centre plus Gaussian noise of
    norm ~``noise``. At 2.0 a query's exact top-10 scores ~0.25 against ~0 for random pairs,
    and IVF at nprobe=8 finds ~90% of it: hard enough for the settings to matter (at 1.0 every
    index is exact; at 3.0 the clusters vanish). Real embeddings are clustered; uniform random
    vectors would be a worst case no index is built for. Queries come from the same
    distribution. Generated in float32 chunks."""
    rng = np.random.default_rng(seed)
    n_centres = max(1, int(4 * math.sqrt(n)))
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for start in range(0, count, 65536):
            m = min(65536, count - start)
            x = centres[rng.integers(0, n_centres, m)]
            x = x + rng.standard_normal((m, dim), dtype=np.float32) * (noise / math.sqrt(dim))
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(n_queries)


def search_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The header fields of a search or mining benchmark: the device asked for (``device``; the
    harness header's device name is ``device_name`` here), threads, faiss and the arguments."""
    import faiss

    from retriever.eval.search import faiss_has_gpu

    return {
        "device": args.device,
        "device_name": harness.device_name(args.device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_version": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss_gpu": faiss_has_gpu(),
        "torch_version": torch.__version__,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def run_config(base: Path, output_dir: Path, where: str, changes: dict[str, dict]) -> Any:
    """The config ``base`` (a YAML file) with each section's ``changes``, writing to
    ``output_dir``; no checkpoints, TensorBoard or evaluation during training (the scripts
    evaluate the final model themselves), a log line every step."""
    import yaml

    from retriever.train.config import config_from_dict

    values = yaml.safe_load(Path(base).read_text(encoding="utf-8"))
    values["training"].update(output_dir=str(output_dir), save_steps=None, report_to=[],
                              logging_steps=1)  # fmt: skip
    values["eval"] = {"data": None}
    for section, options in changes.items():
        values.setdefault(section, {}).update(options)
    return config_from_dict(values, where=where)


def train(config: Any) -> dict[str, Any]:
    """One `retriever train` run of ``config`` (overwriting its output directory); its
    summary. Accelerate's process state is reset after it, so the next run starts afresh."""
    from accelerate.state import AcceleratorState

    from retriever.train.trainer import Trainer

    try:
        return Trainer(config, overwrite=True).train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
