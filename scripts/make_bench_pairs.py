"""Write a large training-pair file from the shared texts, for throughput benchmarks whose batches
need more distinct positives than the shared pairs hold (24,056).

Passages are windows of ``--window`` words, every ``--stride`` words, cut from SciFact's
abstracts and from the distinct positives of the shared 52k pairs; a passage's query is its
title followed by the window's first ``--query-words`` words (the inverse-cloze recipe). Every
passage is a different text (repeats across overlapping sources are skipped), so no batch ever
holds a positive twice. ``--negatives N`` adds N other passages, drawn at random, as each
example's hard negatives; with ``--distinct-negatives`` they are passages that appear nowhere
else in the file (as no positive and no other example's negative), so every text of the file is
distinct and a no-duplicates batch sampler (sentence-transformers') can fill any batch.
Deterministic for a seed.

    python scripts/make_bench_pairs.py --output runs/bench/pairs.jsonl --count 1100000
    python scripts/make_bench_pairs.py --output runs/bench/pairs-neg7.jsonl --count 140000 \\
        --negatives 7
    python scripts/make_bench_pairs.py --output runs/bench/pairs-neg7-distinct.jsonl \\
        --count 131072 --negatives 7 --distinct-negatives
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def sources(shared: Path) -> list[tuple[str, list[str]]]:
    """(title, words) of every SciFact abstract and every distinct shared positive."""
    out = []
    with open(shared / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            out.append((doc.get("title") or "", (doc.get("text") or "").split()))
    seen = set()
    with gzip.open(shared / "train_pairs" / "qa_pairs_mixed.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            pair = json.loads(line)
            if pair["positive"] not in seen:
                seen.add(pair["positive"])
                out.append((pair.get("title") or "", pair["positive"].split()))
    return out


def passages(shared: Path, window: int, stride: int, query_words: int, count: int):
    """Up to ``count`` (query, passage) pairs, interleaving sources so any prefix mixes them."""
    docs = sources(shared)
    starts = [range(0, max(0, len(words) - window) + 1, stride) for _, words in docs]
    produced, offset, seen = 0, 0, set()
    while produced < count:
        emitted = False
        for (title, words), positions in zip(docs, starts):
            if offset < len(positions) and len(words) >= window:
                start = positions[offset]
                piece = words[start : start + window]
                passage = " ".join(piece)
                emitted = True
                if hash(passage) in seen:  # sources overlap: keep every passage distinct
                    continue
                seen.add(hash(passage))
                query = f"{title.replace('_', ' ')} {' '.join(piece[:query_words])}".strip()
                yield query, passage
                produced += 1
                if produced == count:
                    return
        if not emitted:
            raise SystemExit(f"only {produced} passages with these settings; lower --stride")
        offset += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--count", type=int, default=1_100_000)
    parser.add_argument("--window", type=int, default=120, help="words per passage")
    parser.add_argument("--stride", type=int, default=2, help="words between window starts")
    parser.add_argument("--query-words", type=int, default=8)
    parser.add_argument("--negatives", type=int, default=0)
    parser.add_argument("--distinct-negatives", action="store_true",
                        help="negatives used nowhere else in the file")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if args.output.exists() and not args.overwrite:
        print(f"{args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    extra = args.count * args.negatives if args.distinct_negatives else 0
    made = list(passages(args.shared, args.window, args.stride, args.query_words,
                         args.count + extra))  # fmt: skip
    pairs, pool = made[: args.count], [passage for _, passage in made[args.count :]]
    rng = np.random.default_rng(args.seed)
    rng.shuffle(pool)  # the tail of the stream is one source's windows; mix them
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, (query, passage) in enumerate(pairs):
            record = {"query": query, "pos": passage}
            if pool:
                record["neg"] = pool[i * args.negatives : (i + 1) * args.negatives]
            elif args.negatives:
                picks = (i + rng.integers(1, len(pairs), size=args.negatives)) % len(pairs)
                record["neg"] = [pairs[j][1] for j in picks]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(args.output)
    print(f"wrote {len(pairs):,} pairs to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
