"""``retriever mine``: mine hard negatives for a training set with FAISS.

    retriever mine --model PATH --data ../shared/data/scifact --split train \\
        --output mined.jsonl --num-negatives 7 --range-min 10 --range-max 100

``--data`` is a BEIR directory (the queries judged in ``--split``) or a training JSONL file
(``query``, ``pos``). The corpus defaults to the BEIR directory's, or to every positive and
negative text of the JSONL file; ``--corpus`` names another (a BEIR directory, a
``corpus.jsonl`` or a training JSONL file). The output is training JSONL, with the ranked
candidate lists that dynamic mining uses; see :mod:`retriever.mining.files`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever import __version__
from retriever.eval.cli import (
    _DTYPES,
    add_index_arguments,
    add_model_arguments,
    check_cache_dir,
    check_device,
    check_output_file,
    index_config,
    int_at_least,
    load_encoder,
    positive_int,
)
from retriever.mining.miner import SAMPLING, Corpus, MinedExample, MiningConfig, MiningQuery

if TYPE_CHECKING:
    from retriever.eval.search import IndexConfig
    from retriever.mining.files import MinedWriter

# Queries named in the summary of those that got fewer negatives than asked.
_SHOW_INCOMPLETE = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)

    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="BEIR directory or training JSONL file")
    data.add_argument("--split", default="train", help="qrels split of a BEIR --data")
    data.add_argument(
        "--corpus",
        help="documents to mine from: a BEIR directory, a corpus.jsonl or a training JSONL "
        "(default: --data's corpus, or its positives and negatives)",
    )
    data.add_argument("--output", type=Path, required=True, help="mined training JSONL")
    data.add_argument("--overwrite", action="store_true", help="replace an existing --output")

    mining = parser.add_argument_group("mining")
    mining.add_argument("--num-negatives", type=positive_int, default=7, help="negatives per query")
    mining.add_argument(
        "--range-min", type=int, default=10, help="skip the first ranks (default 10)"
    )
    mining.add_argument(
        "--range-max",
        type=int,
        default=100,
        help="negatives come from ranks below this; also the length of the stored ranked list",
    )
    mining.add_argument(
        "--relative-margin",
        type=float,
        help="drop candidates scoring above positive_score * (1 - MARGIN)",
    )
    mining.add_argument(
        "--absolute-margin",
        type=float,
        help="drop candidates scoring above positive_score - MARGIN",
    )
    mining.add_argument("--max-score", type=float, help="drop candidates scoring above this")
    mining.add_argument("--sampling", choices=SAMPLING, default="top", help="within the ranks")
    mining.add_argument("--seed", type=int_at_least(0), default=0, help="for --sampling random")
    mining.add_argument(
        "--drop-incomplete",
        action="store_true",
        help="leave out queries that get fewer than --num-negatives (they are kept by default)",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    run.add_argument("--dtype", choices=list(_DTYPES), default="auto", help="autocast on GPU")
    run.add_argument("--batch-size", type=positive_int, default=64, help="texts per forward pass")
    run.add_argument(
        "--chunk-size", type=positive_int, default=4096, help="queries mined per search"
    )
    run.add_argument("--cache-dir", type=Path, help="cache corpus embeddings here")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_index_arguments(parser)


def _error(message: str) -> int:
    print(f"retriever mine: error: {message}", file=sys.stderr)
    return 2


@dataclass
class _Job:
    """What a run mines with: the checked settings and the loaded inputs."""

    device: str
    config: MiningConfig
    index: IndexConfig
    queries: list[MiningQuery]
    corpus: Corpus
    encoder: Any


@dataclass
class _Tally:
    """The queries that got fewer negatives than asked: their descriptions for the summary, how
    many were left out and how many got no negative at all."""

    incomplete: list[str] = field(default_factory=list)
    dropped: int = 0
    none: int = 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("retriever").setLevel(logging.INFO)
    from retriever.mining.files import MinedWriter, MiningDataError

    # Refuse early: before minutes of encoding, not after.
    problem = _output_problem(args.output, args.overwrite)
    if problem:
        return _error(problem)
    try:
        job = _prepare(args)
    except (MiningDataError, ValueError, FileNotFoundError, NotImplementedError, OSError) as exc:
        return _error(str(exc))
    job.encoder.to(job.device)
    print(
        f"mining {len(job.queries)} queries against {len(job.corpus)} documents "
        f"({args.index} index, {job.device})",
        file=sys.stderr,
    )
    start = time.perf_counter()
    with MinedWriter(args.output, job.corpus, overwrite=args.overwrite) as writer:
        tally = _write_examples(writer, _mined_examples(args, job), args.drop_incomplete)
        seconds = time.perf_counter() - start
        meta = _meta(args, job, writer.count, tally, seconds)
        if writer.count == 0:  # an empty training file would only fail later, in train
            return _error(
                f"no query kept any negative ({len(tally.incomplete)} of {len(job.queries)} had "
                "too few candidates after filtering); nothing was written. Loosen --max-score, "
                "the margins or --range-min/--range-max, or leave out --drop-incomplete"
            )
        writer.finish(meta)
    print(
        f"wrote {writer.count} queries to {args.output} in {seconds:.1f}s "
        f"({meta['queries_per_s']:.1f} queries/s, corpus encoding included)"
    )
    _warn_incomplete(args, job, tally)
    return 0


def _output_problem(output: Path, overwrite: bool) -> str | None:
    """Why ``--output`` (or one of its sidecars) cannot be written, or None."""
    from retriever.mining.files import output_paths

    if str(output).endswith(".gz"):
        return f"--output {output}: write a plain .jsonl file (gzip it afterwards)"
    for path in output_paths(output):
        problem = check_output_file(path, overwrite)
        if problem:
            return problem.replace(f"--output {path}", f"--output {output}")
    return None


def _prepare(args: argparse.Namespace) -> _Job:
    """Check the settings and load the inputs, cheapest first."""
    from retriever.mining.files import default_corpus, load_corpus, load_queries

    device = check_device(args.device)
    check_cache_dir(args.cache_dir)
    config = MiningConfig(
        num_negatives=args.num_negatives,
        range_min=args.range_min,
        range_max=args.range_max,
        relative_margin=args.relative_margin,
        absolute_margin=args.absolute_margin,
        max_score=args.max_score,
        sampling=args.sampling,
        seed=args.seed,
    )
    index = index_config(args)
    queries = load_queries(args.data, args.split)
    corpus = load_corpus(args.corpus) if args.corpus else default_corpus(args.data)
    index.check_corpus_size(len(corpus))
    encoder = load_encoder(args)
    return _Job(device, config, index, queries, corpus, encoder)


def _mined_examples(args: argparse.Namespace, job: _Job) -> Iterator[MinedExample]:
    from retriever.mining.miner import mine

    return mine(
        job.encoder,
        job.queries,
        job.corpus,
        job.config,
        index=job.index,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        cache_dir=args.cache_dir,
        dtype=_DTYPES[args.dtype],
        show_progress=not args.no_progress,
    )


def _write_examples(
    writer: MinedWriter, examples: Iterable[MinedExample], drop_incomplete: bool
) -> _Tally:
    """Write ``examples`` (the incomplete ones too, unless ``drop_incomplete``)."""
    tally = _Tally()
    for example in examples:
        if not example.complete:
            tally.none += not example.negatives
            tally.incomplete.append(
                f"{example.query.source} ({len(example.negatives)} negatives, "
                f"{len(example.candidates)} candidates)"
            )
            if drop_incomplete:
                tally.dropped += 1
                continue
        writer.write(example)
    return tally


def _meta(
    args: argparse.Namespace, job: _Job, written: int, tally: _Tally, seconds: float
) -> dict[str, Any]:
    """The run's record for the ``.meta.json``."""
    return {
        "retriever_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(sys.argv),
        "model": args.model,
        "encoder": asdict(job.encoder.settings),  # as mined: prefixes, truncate_dim
        "data": str(args.data),
        "split": args.split,
        "corpus": str(args.corpus) if args.corpus else f"default of {args.data}",
        "corpus_size": len(job.corpus),
        "mining": vars(job.config),
        "index": vars(job.index),
        "device": job.device,
        "queries": len(job.queries),
        "written": written,
        "incomplete": len(tally.incomplete),
        "dropped": tally.dropped,
        "seconds": seconds,
        "queries_per_s": len(job.queries) / max(seconds, 1e-9),
    }


def _warn_incomplete(args: argparse.Namespace, job: _Job, tally: _Tally) -> None:
    if not tally.incomplete:
        return
    config = job.config
    action = "left out" if args.drop_incomplete else "kept with fewer negatives"
    print(
        f"warning: {len(tally.incomplete)} of {len(job.queries)} queries had fewer than "
        f"{config.num_negatives} candidates in ranks {config.range_min}..{config.range_max} "
        f"after filtering ({action}): " + "; ".join(tally.incomplete[:_SHOW_INCOMPLETE]),
        file=sys.stderr,
    )
    if tally.none and not args.drop_incomplete:
        print(
            f"warning: {tally.none} queries got no negative at all; `retriever train` with "
            "data.negatives > 0 refuses such examples: pass --drop-incomplete, or loosen "
            "the margins or the rank range",
            file=sys.stderr,
        )
