"""``retriever eval``: evaluate a model on one or more retrieval or STS tasks.

    retriever eval --model PATH --data ../shared/data/scifact ../shared/data/stsb \
        --split test --output results.json

Prints a table per kind of task and writes JSON: the model, split, device and command, and one
result per task (every metric, counts, timings; see :mod:`retriever.eval.evaluator` and
:mod:`retriever.eval.sts`). An existing output file is never replaced without ``--overwrite``,
and is replaced whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retriever import __version__
from retriever.eval.metrics import DEFAULT_K_VALUES
from retriever.eval.search import INDEX_KINDS, IndexConfig
from retriever.fileio import directory_problem, write_text_atomically

if TYPE_CHECKING:
    from retriever.model import Encoder

_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Columns of the printed table: (result key, header).
_COLUMNS = [
    ("ndcg_at_10", "nDCG@10"),
    ("mrr_at_10", "MRR@10"),
    ("map_at_10", "MAP@10"),
    ("recall_at_10", "R@10"),
    ("recall_at_100", "R@100"),
    ("precision_at_1", "P@1"),
]


def _k_values(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,10,100, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"k values must be positive, got {text!r}")
    return ks


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)


def check_device(name: str | None) -> str:
    """The device to run on (``--device``), checked: default cuda when there is one."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return name


def check_cache_dir(path: Path | None) -> None:
    problem = None if path is None else directory_problem(path)
    if problem:
        raise ValueError(f"--cache-dir {problem}")


def check_output_file(path: Path | None, overwrite: bool) -> str | None:
    """Why ``path`` cannot take the results, checked before any work; None if it can."""
    if path is None:
        return None
    if path.is_dir():
        return f"--output {path} is a directory; name a file"
    if path.exists() and not overwrite:
        return f"{path} exists; pass --overwrite to replace it"
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if parent is not None and not (parent.is_dir() and os.access(parent, os.W_OK)):
        return f"--output {path}: cannot create it under {parent}"
    return None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and the encoder settings (shared with ``retriever mine``)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="sentence-transformers or HF model dir/id")
    model.add_argument("--pooling", choices=["cls", "mean", "last"], help="default: from the model")
    model.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    model.add_argument("--query-prefix", help="default: the model's 'query' prompt, else none")
    model.add_argument("--document-prefix", help="default: the model's 'document' prompt")
    model.add_argument(
        "--query-max-length", type=positive_int, help="default: from the model, else 128"
    )
    model.add_argument(
        "--document-max-length", type=positive_int, help="default: from the model, else 256"
    )
    model.add_argument(
        "--truncate-dim",
        type=positive_int,
        help="keep the first K dimensions of each embedding, re-normalised (a Matryoshka "
        "model's prefix); default: the model's truncate_dim, else all",
    )


def load_encoder(args: argparse.Namespace) -> Encoder:
    """The Encoder that :func:`add_model_arguments`' options describe."""
    from retriever.model import Encoder, ModelNotFoundError, locate_model
    from retriever.model.network import max_length_problems

    try:
        model = locate_model(args.model)
    except ModelNotFoundError as exc:
        raise ValueError(f"--model {exc}") from None
    encoder = Encoder.from_pretrained(
        model,
        pooling=args.pooling,
        normalize=False if args.no_normalize else None,
        query_prefix=args.query_prefix,
        document_prefix=args.document_prefix,
        query_max_length=args.query_max_length,
        document_max_length=args.document_max_length,
    )
    if args.truncate_dim is not None:
        size = int(encoder.model.config.hidden_size)
        if args.truncate_dim > size:
            raise ValueError(f"--truncate-dim {args.truncate_dim}: the model has {size} dimensions")
        encoder.settings = dataclasses.replace(encoder.settings, truncate_dim=args.truncate_dim)
    for side, length, limit in max_length_problems(encoder):
        raise ValueError(
            f"--{side}-max-length: {length} tokens, more than the model's {limit} positions "
            f"(max_position_embeddings); pass --{side}-max-length {limit} or less"
        )
    return encoder


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """``--index`` and its knobs (shared with ``retriever mine``)."""
    index = parser.add_argument_group("index")
    index.add_argument("--index", choices=INDEX_KINDS, default="flat", help="default: exact")
    index.add_argument("--hnsw-m", type=int_at_least(2), help="HNSW links (default 32)")
    index.add_argument("--ef-search", type=positive_int, help="HNSW search width (default 256)")
    index.add_argument("--nlist", type=positive_int, help="IVF cells (default 4*sqrt(N))")
    index.add_argument("--nprobe", type=positive_int, help="IVF cells searched (default 32)")


# Which --index each knob belongs to: a knob given for another index is an error, not ignored.
_INDEX_KNOBS = {"hnsw_m": "hnsw", "ef_search": "hnsw", "nlist": "ivf", "nprobe": "ivf"}


def index_config(args: argparse.Namespace) -> IndexConfig:
    """The IndexConfig that :func:`add_index_arguments`' options describe."""
    given = {name: getattr(args, name) for name in _INDEX_KNOBS if getattr(args, name) is not None}
    for name in given:
        if _INDEX_KNOBS[name] != args.index:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} applies to --index {_INDEX_KNOBS[name]} only (this run uses --index "
                f"{args.index})"
            )
    return IndexConfig(kind=args.index, **given)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="DIR_OR_HUB_ID",
        help="BEIR dirs or Hub ids (retrieval), STS JSONL files or dirs (sentence1, sentence2, "
        "score)",
    )
    data.add_argument(
        "--split", default="test", help="qrels split, or STS dir's SPLIT.jsonl (default: test)"
    )
    data.add_argument(
        "--ignore-identical-ids",
        action="store_true",
        help="drop each query's own id from its results (ArguAna, Quora, ...)",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--output", type=Path, help="write the results as JSON here")
    run.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    run.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    run.add_argument("--dtype", choices=list(_DTYPES), default="auto", help="autocast on GPU")
    run.add_argument("--batch-size", type=positive_int, default=64)
    run.add_argument("--cache-dir", type=Path, help="cache corpus embeddings here")
    run.add_argument("--k-values", type=_k_values, default=list(DEFAULT_K_VALUES))
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    add_index_arguments(parser)


def format_table(results: list[dict[str, Any]]) -> str:
    """Plain-text tables of the main metrics, one row per task: retrieval tasks, then STS."""
    retrieval = [r for r in results if r.get("task_type") != "sts"]
    sts = [r for r in results if r.get("task_type") == "sts"]
    header = ["task", "split", *(h for _, h in _COLUMNS), "queries", "docs", "time"]
    rows = [
        [
            r["task"],
            r["split"],
            *(f"{r[k]:.4f}" if k in r else "-" for k, _ in _COLUMNS),
            str(r["num_queries"]),
            str(r["num_documents"]),
            f"{r['timings']['total_s']:.1f}s",
        ]
        for r in retrieval
    ]
    sts_rows = [
        [
            r["task"],
            r["split"],
            f"{r['spearman']:.4f}",
            f"{r['pearson']:.4f}",
            str(r["num_pairs"]),
            f"{r['seconds']:.1f}s",
        ]
        for r in sts
    ]
    tables = [_table(header, rows)] if retrieval else []
    if sts:
        tables.append(_table(["task", "split", "Spearman", "Pearson", "pairs", "time"], sts_rows))
    return "\n\n".join(tables)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    # Our own messages (dropped qrels, cache hits) at INFO; other libraries' only when serious.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("retriever").setLevel(logging.INFO)
    problem = check_output_file(args.output, args.overwrite)
    if problem:
        print(f"retriever eval: error: {problem}", file=sys.stderr)
        return 2
    from retriever.eval.data import RetrievalTask
    from retriever.eval.tasks import load_any_task, run_task

    # Load every task first: a bad path fails in seconds, not after the first task's encoding.
    try:
        device = check_device(args.device)
        check_cache_dir(args.cache_dir)
        index = index_config(args)
        tasks = [load_any_task(spec, args.split) for spec in args.data]
        for task in tasks:
            if isinstance(task, RetrievalTask):
                index.check_corpus_size(len(task.corpus))
        encoder = load_encoder(args)
    except (FileNotFoundError, ValueError, NotImplementedError, OSError) as exc:
        print(f"retriever eval: error: {exc}", file=sys.stderr)
        return 2
    encoder.to(device)
    results = []
    for task in tasks:
        result = run_task(
            encoder,
            task,
            k_values=args.k_values,
            index=index,
            batch_size=args.batch_size,
            cache_dir=args.cache_dir,
            dtype=_DTYPES[args.dtype],
            ignore_identical_ids=args.ignore_identical_ids,
            show_progress=not args.no_progress,
            model_name=args.model,
        )
        results.append(result)
    print(format_table(results))
    if args.output is not None:
        report = {
            "model": args.model,
            "split": args.split,
            "device": device,
            "dtype": args.dtype,
            "retriever_version": __version__,
            "arguments": {
                k: v if isinstance(v, (int, float, list, type(None))) else str(v)
                for k, v in vars(args).items()
                if not k.startswith("_")
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "results": results,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.output, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0
