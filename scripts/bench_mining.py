"""Benchmark static mining on a synthetic corpus: queries/s with an exact and approximate index.

Document embeddings are the clustered unit vectors of ``workloads.synthetic_vectors`` (so the
numbers are comparable with the search benchmark, bench_eval.py); query i is a noisy copy of
document ``p_i``, which is its positive. Each index is built once, then every query is mined as
``retriever mine`` does it (search deeper than range_max, drop positives and repeats, take the
rank band) through :class:`retriever.mining.miner.HardNegativeMiner`, in chunks of
``--chunk-size`` queries. Reported per index: build time, mining time and queries/s, and how
many of the exact index's negatives (and top-``range_max`` lists) the approximate ones find.

Text encoding is not part of it (the corpus is vectors); `bench_eval.py` measures encoding
throughput, and `scifact_mining.py mine` times the whole pipeline with a real model.

    python scripts/bench_mining.py --device cuda --output bench_mining.json
    python scripts/bench_mining.py --device cpu --num-docs 100000 --num-queries 2000 \\
        --indexes flat,hnsw,ivf --output bench_mining_cpu.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from harness import Results, Stopwatch
from workloads import search_fields, synthetic_vectors

from retriever.eval.search import IndexConfig
from retriever.mining.miner import (
    Corpus,
    HardNegativeMiner,
    MiningConfig,
    MiningQuery,
)


def make_world(args: argparse.Namespace):
    watch = Stopwatch().start()
    docs, _ = synthetic_vectors(args.num_docs, 0, args.dim, args.noise)
    rng = np.random.default_rng(1)
    positives = rng.choice(args.num_docs, size=args.num_queries, replace=False)
    noise = rng.standard_normal((args.num_queries, args.dim), dtype=np.float32)
    queries = docs[positives] + noise * (args.query_noise / math.sqrt(args.dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    corpus = Corpus([str(i) for i in range(args.num_docs)], [f"d{i}" for i in range(args.num_docs)])
    mining_queries = [
        MiningQuery(f"q{i}", (f"d{p}",), (str(p),), f"q{i}") for i, p in enumerate(positives)
    ]
    print(f"synthetic corpus {docs.shape} in {watch.stop():.1f}s", flush=True)
    return docs, queries, corpus, mining_queries


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def mine_all(miner: HardNegativeMiner, queries, vectors, chunk_size: int):
    results = []
    for start in range(0, len(queries), chunk_size):
        results += miner.mine_chunk(
            queries[start : start + chunk_size], vectors[start : start + chunk_size],
            first_index=start,
        )  # fmt: skip
    return results


def bench(args: argparse.Namespace, results: Results) -> None:
    docs, vectors, corpus, queries = make_world(args)
    config = MiningConfig(
        num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max
    )
    settings = {
        "flat": IndexConfig(kind="flat"),
        "torch": IndexConfig(kind="torch", use_gpu=args.device.startswith("cuda")),
        "hnsw": IndexConfig(
            kind="hnsw",
            hnsw_m=args.hnsw_m,
            ef_construction=args.ef_construction,
            ef_search=args.ef_search[0],
        ),
        "ivf": IndexConfig(
            kind="ivf",
            nlist=args.nlist or int(4 * math.sqrt(args.num_docs)),
            nprobe=args.nprobe[0],
            train_size=args.ivf_train_per_list * (args.nlist or int(4 * math.sqrt(args.num_docs))),
        ),
    }
    knobs = {"hnsw": ("ef_search", args.ef_search), "ivf": ("nprobe", args.nprobe)}
    exact = None
    for name in args.indexes.split(","):
        with Stopwatch(args.device) as build:
            miner = HardNegativeMiner(corpus, docs, config, settings[name])
        param, values = knobs.get(name, ("", [None]))
        for value in values:
            if param:  # search-time knobs: no rebuild
                miner.index.set_search_params(**{param: value})
            mine_all(miner, queries[:64], vectors[:64], args.chunk_size)  # warm-up
            with Stopwatch(miner.index.device) as mining:
                mined = mine_all(miner, queries, vectors, args.chunk_size)
            mine_s = mining.seconds
            if exact is None and name in ("flat", "torch"):
                exact = mined
            row = {
                "index": name,
                "exact": name in ("flat", "torch"),
                "setting": f"{param}={value}" if param else "exact",
                "device": miner.index.device,
                "build_s": build.seconds,
                "mine_s": mine_s,
                "queries_per_s": len(queries) / mine_s,
                "complete_fraction": float(np.mean([r.complete for r in mined])),
            }
            if exact is not None:
                row["negatives_same_as_exact"] = _overlap(mined, exact, "negatives")
                row[f"recall_at_{args.range_max}_vs_exact"] = _overlap(mined, exact, "candidates")
            results.add(row)  # printed as a JSON line, and the file rewritten
        del miner


def _overlap(results, exact, field: str) -> float:
    """Mean fraction of the exact index's ``field`` that ``results`` has too."""
    shares = []
    for a, b in zip(results, exact):
        want = set(getattr(b, field))
        shares.append(len(set(getattr(a, field)) & want) / max(len(want), 1))
    return float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, required=True, help="JSON results")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--num-docs", type=int, default=1_000_000)
    parser.add_argument("--num-queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--noise", type=float, default=2.0, help="synthetic cluster spread")
    parser.add_argument("--query-noise", type=float, default=1.0, help="query vs its positive")
    parser.add_argument(
        "--indexes", default="flat,torch,ivf,hnsw", help="first exact one is the reference"
    )
    parser.add_argument("--num-negatives", type=int, default=7)
    parser.add_argument("--range-min", type=int, default=10)
    parser.add_argument("--range-max", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=4096, help="queries per search call")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=_ints, default=[128, 256], help="HNSW settings")
    parser.add_argument("--nlist", type=int, help="IVF cells, default 4 * sqrt(N)")
    parser.add_argument("--nprobe", type=_ints, default=[32, 128], help="IVF settings")
    parser.add_argument("--ivf-train-per-list", type=int, default=64)
    args = parser.parse_args()
    if args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")
    unknown = set(args.indexes.split(",")) - {"flat", "torch", "hnsw", "ivf"}
    if unknown:
        parser.error(f"unknown --indexes {sorted(unknown)}")

    results = Results(args.output, vars(args), args.device, fields=search_fields(args))
    bench(args, results)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
