"""Decoder embedders on one GPU (docs/decoders.md): a training step of a randomly initialised
Qwen2 of a real size, against sentence-transformers' CachedMultipleNegativesRankingLoss (CMNRL)
with the same model, peft adapter, batch and mini-batch size, in the same run.

No decoder weights can be downloaded here, so the network is Qwen2's architecture at its real
sizes (``0.5b``: 24 layers, hidden 896, 0.49B parameters; ``1.5b``: 28 layers, hidden 1536,
1.54B), initialised at random, with a byte-level BPE tokenizer of 32k tokens trained on the
benchmark's texts (the embedding matrix keeps Qwen2's 151,936 rows). Speed does not depend on
the weights' values. Texts: SciFact titles (queries, <= --query-length tokens) and abstracts
(documents, <= --document-length), cycled to fill the batch (bench_train.py's data); last-token
pooling with the EOS token appended, as the trainer does for decoders.

A case is PEER-WEIGHTS[-ckpt][@CHUNK][:BATCH,BATCH,...] (the chunk and batches default to
--chunk-size and --batches):

  PEER     ``retriever`` (the trainer's cached step, retriever.train.step.cached_step, bf16
           network) or ``cmnrl`` (CMNRL under bf16 autocast, as SentenceTransformerTrainer with
           bf16=True; features padded per column as its collator does)
  WEIGHTS  ``lora``: peft LoRA r=16, alpha 32, on q/k/v/o and the MLP projections, bf16 base
           weights (retriever: bf16 adapters with fp32 master weights, as the trainer; CMNRL:
           peft's default fp32 adapters, run in bf16 by autocast); ``full``: every weight
           trains (retriever: a bf16 network with fp32 master gradients, as model.dtype:
           bfloat16 trains; CMNRL: fp32 weights under autocast, as sentence-transformers does)
  -ckpt    activation checkpointing in the gradient pass (transformers' gradient_checkpointing,
           non-reentrant) for both

Step only (embed, loss, backward; no optimizer, data tokenised beforehand): wall time between
two device synchronisations, peak memory torch.cuda.max_memory_allocated, the same numbers as
bench_train.py. From each case's peaks the script projects the largest batch that fits the
GPU (linear in the batch; labelled as a projection).

    python scripts/bench_decoders.py --size 0.5b --output decoders_05b.json
    python scripts/bench_decoders.py --size 1.5b --cases retriever-lora-ckpt cmnrl-lora-ckpt \\
        retriever-lora@32:4096 cmnrl-lora@32:4096 --batches 4096 16384 --output decoders_15b.json
    python scripts/bench_decoders.py --device cpu --size tiny --batches 16 --chunk-size 4 \\
        --embed-chunk-size 8 --repeats 1 --output /tmp/decoders.json      # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from bench_train import (
    SCALE,
    CMNRLPeer,
    RetrieverPeer,
    load_texts,
    markdown,
    measure,
    project_max_batch,
)
from harness import Results, Stopwatch, free, recording_oom

from retriever.loss import InfoNCELoss
from retriever.model import Encoder
from retriever.model.lora import add_lora

SIZES = {  # Qwen2-0.5B's and Qwen2-1.5B's shapes; ``tiny`` for CPU smoke runs
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
}  # fmt: skip
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}  # fmt: skip
CASES = ("retriever-lora-ckpt", "cmnrl-lora-ckpt", "retriever-lora", "cmnrl-lora",
         "retriever-full-ckpt", "cmnrl-full-ckpt")  # fmt: skip


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (Qwen2's kind) trained on ``texts``; EOS = pad, left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", padding_side="left")  # fmt: skip


def save_random_decoder(size: str, texts: list[str], path: Path, device: str) -> Path:
    """A Qwen2 of ``size`` with random bf16 weights, saved as a sentence-transformers directory
    (last-token pooling, EOS appended) that both peers load."""
    from transformers import Qwen2Config, Qwen2Model

    tokenizer = train_tokenizer(texts, min(32000, SIZES[size]["vocab_size"]))
    config = Qwen2Config(**SIZES[size], max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, at 1.5B
        network = Qwen2Model(config).to(torch.bfloat16).eval()
    raw = path / "hf"
    network.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    del network
    free(device)
    Encoder.from_pretrained(str(raw), append_eos=True).save(path / "st")
    return path / "st"


def _encoder(model_path: str, args: argparse.Namespace, checkpointing: bool) -> Encoder:
    """The benchmark's encoder on the CPU (bf16, SDPA attention)."""
    return Encoder.from_pretrained(
        model_path,
        query_max_length=args.query_length,
        document_max_length=args.document_length,
        torch_dtype=torch.bfloat16,
        attn_implementation="sdpa",
        gradient_checkpointing=checkpointing,
    )


class RetrieverDecoder(RetrieverPeer):
    """bench_train's retriever peer on a bf16 decoder, with LoRA adapters or fp32 master
    gradients of every weight."""

    def __init__(self, model_path: str, args: argparse.Namespace, lora: bool, ckpt: bool):
        from retriever.train.precision import MasterWeights

        self.encoder = _encoder(model_path, args, ckpt).to(args.device)
        if lora:
            self.encoder.model = add_lora(self.encoder.model, LORA)
        self.encoder.train()
        # fp32 master gradients of what trains (the adapters, bf16 like the network, or every
        # weight), as the trainer does with model.dtype: bfloat16
        self.master = MasterWeights(self.encoder.parameters())
        self.embed = self.encoder
        self.loss_fn = InfoNCELoss(scale=SCALE).to(args.device)
        self.device, self.sort, self.embed_chunk = args.device, True, args.embed_chunk_size
        self.set_chunk(args.chunk_size)


class CMNRLDecoder(CMNRLPeer):
    """bench_train's CMNRL peer on the same directory, with the same peft adapter and
    checkpointing."""

    def __init__(self, model_path: str, args: argparse.Namespace, lora: bool, ckpt: bool):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
        )

        dtype = torch.bfloat16 if lora else torch.float32
        self.model = SentenceTransformer(
            model_path, device=args.device,
            model_kwargs={"attn_implementation": "sdpa", "dtype": dtype},
        )  # fmt: skip
        self.model.max_seq_length = args.document_length  # features come pre-tokenised
        network = self.model[0].auto_model
        if ckpt:  # before the adapter, in the same order as retriever's peer
            network.gradient_checkpointing_enable({"use_reentrant": False})
        if lora:  # peft's default: fp32 adapters, run in bf16 by autocast
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                target_modules=LORA["target_modules"], bias="none")  # fmt: skip
            self.model[0].auto_model = get_peft_model(network, config)
        self.model.train()
        self.loss = CachedMultipleNegativesRankingLoss(
            self.model, scale=SCALE, mini_batch_size=args.chunk_size
        )
        self.device, self.autocast = args.device, True
        self.set_chunk(args.chunk_size)


def parse_case(spec: str, args: argparse.Namespace) -> tuple[str, int, list[int]]:
    """(case name, chunk, batches) of PEER-WEIGHTS[-ckpt][@CHUNK][:BATCH,...]."""
    name, _, batches = spec.partition(":")
    name, _, chunk = name.partition("@")
    default_chunk = args.default_chunk_size
    if name not in CASES:
        raise SystemExit(f"--cases {spec}: {name!r} is not one of {', '.join(CASES)}")
    sizes = [int(b) for b in batches.split(",")] if batches else args.batches
    return name, int(chunk) if chunk else default_chunk, sorted(sizes)


def make_peer(case: str, model_path: str, args: argparse.Namespace):
    peer, weights, *rest = case.split("-")
    lora, ckpt = weights == "lora", rest == ["ckpt"]
    cls = RetrieverDecoder if peer == "retriever" else CMNRLDecoder
    return cls(model_path, args, lora, ckpt)


def run_case(spec: str, model_path: str, texts: Any, args, results: Results, clock) -> None:
    """Every batch of one case, smallest first; a batch whose estimated time exceeds what is
    left of --budget is recorded as skipped."""
    case, args.chunk_size, batches = parse_case(spec, args)
    peer = make_peer(case, model_path, args)
    with recording_oom({}, args.device):  # warm-up: kernel compilation, allocator growth
        measure(peer, texts, 2 * args.chunk_size, 0, 1, args.device)
    rate = None
    for batch in batches:
        record: dict[str, Any] = {"peer": case, "batch": batch, "negatives": 0,
                                  "chunk_size": args.chunk_size,
                                  "embed_chunk_size": getattr(peer, "embed_chunk", None)
                                  or args.chunk_size}  # fmt: skip
        left = args.budget - clock.elapsed()
        estimate = None if rate is None else batch / rate * args.repeats
        if estimate is not None and estimate > left:
            record["status"] = f"skipped (estimated {estimate:.0f} s, {left:.0f} s left)"
        else:
            with recording_oom(record, args.device):
                measure(peer, texts, batch, 0, args.repeats, args.device, record=record)
            rate = record.get("queries_per_s", rate)
        results.add(record)
        print(markdown([record]).splitlines()[-1], flush=True)
        if record.get("status") != "ok" and "skipped" not in str(record.get("status")):
            break  # out of memory: a larger batch will not fit either
    del peer
    free(args.device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="0.5b")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="see above")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2]
                                              / "shared/data/scifact"))  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--chunk-size", type=int, default=256,
                        help="CMNRL's mini_batch_size, retriever's gradient chunk")  # fmt: skip
    parser.add_argument("--embed-chunk-size", type=int, default=1024,
                        help="retriever's no-grad chunk")  # fmt: skip
    parser.add_argument("--query-length", type=int, default=64)
    parser.add_argument("--document-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per batch (min kept)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    parser.add_argument("--workdir", type=Path, default=None, help="for the model (default: tmp)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    args.pairs, args.limit_docs, args.dropout = None, None, None  # bench_train's data options
    args.default_chunk_size = args.chunk_size  # args.chunk_size: the current case's
    for spec in args.cases:  # before the model is built
        parse_case(spec, args)
    with tempfile.TemporaryDirectory(prefix="bench_decoders-") as scratch:
        return run(args, args.workdir or Path(scratch))


def run(args: argparse.Namespace, workdir: Path) -> int:
    """Every case on one random model saved in ``workdir``; JSON (and its table) as it goes."""
    clock = Stopwatch().start()

    on_gpu = torch.device(args.device).type == "cuda"

    def projection(data: dict[str, Any]) -> dict[str, Any]:
        if not on_gpu:
            return {}
        return {"projection": project_max_batch(data["results"], data["gpu_memory_gb"])}

    results = Results(args.output, vars(args), args.device, summary=projection)
    corpus = [json.loads(line) for line in open(Path(args.data) / "corpus.jsonl", encoding="utf-8")]
    model_path = str(save_random_decoder(
        args.size, [d.get("title", "") + "\n" + d.get("text", "") for d in corpus], workdir,
        args.device))  # fmt: skip
    texts = load_texts(args, _encoder(model_path, args, False))
    print(f"{args.size} model in {clock.elapsed():.0f} s; {len(texts)} pairs", flush=True)
    for case in args.cases:
        run_case(case, model_path, texts, args, results, clock)
    results.write()
    print(markdown(results.records()))
    if results.data.get("projection"):
        print(json.dumps(results.data["projection"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
