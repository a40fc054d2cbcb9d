"""How much the embedding cache embeds per forward pass (texts, or real tokens for padding-free
chunks): given, or ``auto``; and whether the chunks are padding-free.

The gradient pass keeps one chunk's activations for its backward, so its size is what the
memory allows; the no-grad pass keeps none, so its chunks can be far larger, and fewer, larger
launches cost the host less. ``auto`` measures, on the GPU at the start of the run, the peak
memory of one probe chunk of full-length documents in each pass, and sizes each pass to the
memory left in the budget once the run's fixed costs are counted: weights, gradients, AdamW's
two moments (and fp32 master weights for a bf16 network), and per text of the global batch its
embedding and embedding gradient. On CPU, ``auto`` is 64.

Different chunkings of the two passes draw different dropout masks, so the cached gradient is
exact only for a network without dropout: with dropout, a given ``embed_chunk_size`` that
differs from ``chunk_size`` is refused and ``auto`` keeps them equal.

Padding-free chunks (``model.padding_free``, `retriever.model.packed`; by default where a varlen
attention kernel runs, a CUDA GPU in half precision): where the model runs packed (a probe
says; otherwise one line says why and the run keeps padded chunks), a chunk is
a budget of real tokens, ``training.chunk_tokens``: given, ``auto`` (measured per token as above),
or ``chunk_size`` texts of the longest max length; the no-grad pass's budget is
``embed_chunk_size`` texts of that length.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from retriever.train.batches import Packing, StreamChunk

logger = logging.getLogger(__name__)

CPU_CHUNK = 64
PROBE_TEXTS = 16
SAFETY = 0.85  # of the memory left, for allocator fragmentation and the loss's tiles
LOSS_WORKSPACE = 1 << 30  # the Triton backward's G slab (16k x 16k bf16) and its GEMM outputs
GRAD_RANGE, EMBED_MAX = (8, 8192), 65536


class ChunkSizeError(ValueError):
    """The chunk sizes asked for cannot keep the cached gradient exact."""


@dataclass(frozen=True)
class ChunkSizes:
    grad: int  # texts (tokens, with packing) per forward + backward of the gradient pass
    embed: int  # texts (tokens, with packing) per forward of the no-grad pass
    measured: dict[str, float] | None = None  # what auto measured (bytes), for the log
    packing: Packing | None = None  # padding-free chunks: the sizes count real tokens

    def record(self) -> list[int]:
        """What a checkpoint keeps: [grad, embed], and a third entry 1 when they count
        tokens (so a resumed run never reads one unit as the other)."""
        return [self.grad, self.embed, 1] if self.packing else [self.grad, self.embed]


def fixed_costs(model: torch.nn.Module, bf16_weights: bool, texts: int, dim: int) -> int:
    """Bytes the run will hold beyond the weights: gradients, AdamW state, master weights, and
    the embedding cache (fp32 embeddings and their gradients, plus reordered copies)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_param = 4 + 8 + (8 if bf16_weights else 0)  # grad, two moments, fp32 master + its grad
    return n * per_param + texts * dim * 4 * 4 + LOSS_WORKSPACE


def probe_bytes_per_text(
    embed: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    model: torch.nn.Module,
    device: torch.device,
    length: int,
    vocab_size: int,
    grad: bool,
) -> float:
    """Peak memory of one forward (and backward, with ``grad``) of a probe chunk of
    ``PROBE_TEXTS`` texts of ``length`` tokens, per text."""
    ids = torch.randint(1000 % vocab_size, vocab_size, (PROBE_TEXTS, length), device=device)
    features = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "no_padding": True}
    return probe_bytes(embed, model, device, features, grad) / PROBE_TEXTS


def probe_bytes_per_token(
    embed: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    model: torch.nn.Module,
    device: torch.device,
    packing: Packing,
    vocab_size: int,
    grad: bool,
) -> float:
    """Peak memory of one pass over a token stream of ``PROBE_TEXTS`` texts of the longest
    max length, per token."""
    tokens = PROBE_TEXTS * packing.max_length
    ids = torch.randint(1000 % vocab_size, vocab_size, (tokens,), dtype=torch.int32)
    lengths = torch.full((PROBE_TEXTS,), packing.max_length, dtype=torch.int32)
    chunk = StreamChunk(ids, lengths, packing.max_length, tokens if packing.static else None)
    return probe_bytes(embed, model, device, chunk.features(device), grad) / tokens


def probe_bytes(
    embed: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    model: torch.nn.Module,
    device: torch.device,
    features: dict,
    grad: bool,
) -> float:
    """Peak memory of one forward (and backward, with ``grad``) of ``features``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    if grad:
        embed(features).float().sum().backward()
    else:
        with torch.no_grad():
            embed(features)
    peak = torch.cuda.max_memory_allocated(device) - base
    for p in model.parameters():
        p.grad = None
    return peak


def plan_chunk_sizes(
    chunk_size: int | str,
    embed_chunk_size: int | str | None,
    *,
    dropout: float,
    device: torch.device,
    measure: Callable[[bool], float] | None = None,
    available: Callable[[], int] | None = None,
    per_text: int = 1,
    grad_option: str = "training.chunk_size",
) -> ChunkSizes:
    """The sizes of both passes. ``measure(grad)`` gives bytes per unit (a text, or a token)
    of a pass and ``available()`` the bytes the budget leaves after fixed costs (both GPU
    only). ``per_text``: units a text counts for in the defaults and bounds (1 for texts, the
    longest max length for tokens)."""
    exact_only = dropout > 0
    if isinstance(embed_chunk_size, int) and embed_chunk_size != chunk_size and exact_only:
        unit = " tokens" if per_text > 1 else ""
        raise ChunkSizeError(
            f"training.embed_chunk_size ({embed_chunk_size}{unit}) differs from {grad_option} "
            f"({chunk_size}{unit}), but the network has dropout (p = {dropout:g}): the no-grad "
            "pass would draw other dropout masks than the gradient pass, and the cached gradient "
            "would no longer be exact. Set model.dropout: 0 (with LoRA also model.lora's "
            "dropout: 0), or leave embed_chunk_size unset"
        )
    wants_auto = "auto" in (chunk_size, embed_chunk_size)
    if not wants_auto:
        return ChunkSizes(int(chunk_size), int(embed_chunk_size or chunk_size))
    if device.type != "cuda" or measure is None or available is None:
        grad = CPU_CHUNK * per_text if chunk_size == "auto" else int(chunk_size)
        embed = grad if embed_chunk_size in (None, "auto") else int(embed_chunk_size)
        return ChunkSizes(grad, embed)
    left = available()
    grad_bytes = measure(True)
    low, high = (n * per_text for n in GRAD_RANGE)
    grad = int(chunk_size) if chunk_size != "auto" else _fit(left, grad_bytes, low, high)
    embed = grad
    measured = {"bytes_left": float(left), "grad_bytes_per_text": grad_bytes * per_text}
    if embed_chunk_size == "auto" and not exact_only:
        embed_bytes = measure(False)
        measured["embed_bytes_per_text"] = embed_bytes * per_text
        embed = max(grad, _fit(left, embed_bytes, grad, EMBED_MAX * per_text))
    elif isinstance(embed_chunk_size, int):
        embed = embed_chunk_size
    return ChunkSizes(grad, embed, measured)


def _fit(bytes_left: float, bytes_per_text: float, low: int, high: int) -> int:
    if bytes_left <= 0:
        raise ChunkSizeError(
            "training.chunk_size: auto: the fixed costs of this run (weights, optimizer state, "
            "the embeddings of the whole batch) already exceed training.memory_gb"
        )
    n = int(SAFETY * bytes_left / max(bytes_per_text, 1.0))
    return max(low, min(high, n // 8 * 8))


def describe(sizes: ChunkSizes, budget_gb: float | None) -> str:
    unit = "real tokens (padding-free)" if sizes.packing else "texts"
    text = f"chunk sizes: {sizes.grad} {unit} per gradient pass, {sizes.embed} per no-grad pass"
    if sizes.measured:
        m = sizes.measured
        text += (
            f" (auto, {m['bytes_left'] / 2**30:.1f} GiB left for activations of "
            f"{budget_gb or 0:.1f} GiB; {m['grad_bytes_per_text'] / 2**20:.1f} MiB per "
            "full-length text with gradients"
        )
        if "embed_bytes_per_text" in m:
            text += f", {m['embed_bytes_per_text'] / 2**20:.2f} MiB without"
        text += ")"
    return text


def budget_bytes(memory_gb: float | None, device: torch.device) -> int:
    """The GPU memory the run may plan for: ``memory_gb``, else 90% of what is free now plus
    what this process already holds."""
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    free, _ = torch.cuda.mem_get_info(device)
    return int(0.9 * free) + torch.cuda.memory_allocated(device)


__all__ = [
    "ChunkSizeError",
    "ChunkSizes",
    "plan_chunk_sizes",
    "probe_bytes_per_text",
    "plan_packing",
]


def plan_for_run(
    config: Any, accelerator: Any, encoder: Any, recorded: list[int] | None = None
) -> ChunkSizes:
    """The sizes a run of ``config`` uses, and whether its chunks are padding-free (which
    readies ``encoder`` for them): ``recorded`` (by the checkpoint it resumes) when it counts
    the same unit, else planned, measuring ``encoder`` on the GPU when a size is ``auto``."""
    from retriever.model.network import dropout_probability

    packing = plan_packing(config, accelerator, encoder)
    if recorded and (len(recorded) > 2) == (packing is not None):
        return ChunkSizes(recorded[0], recorded[1], None, packing)
    t, acc = config.training, accelerator
    grad_size, embed_size, per_text = t.chunk_size, t.embed_chunk_size, 1
    if packing is not None:
        per_text = packing.max_length
        grad_size = t.chunk_tokens or _tokens(t.chunk_size, per_text)
        embed_size = _tokens(t.embed_chunk_size, per_text)
    measure = available = None
    if acc.device.type == "cuda" and "auto" in (grad_size, embed_size):
        device = acc.device
        encoder.to(device)
        length = max(encoder.query_max_length, encoder.document_max_length)

        def embed(features: dict[str, torch.Tensor]) -> torch.Tensor:
            with acc.autocast():  # the precision the run trains in
                return encoder(features)

        def measure(grad: bool) -> float:
            vocab = len(encoder.tokenizer)
            if packing is not None:
                return probe_bytes_per_token(embed, encoder, device, packing, vocab, grad)
            return probe_bytes_per_text(embed, encoder, device, length, vocab, grad)

        texts = t.batch_size // acc.num_processes * (2 + config.data.negatives)
        fixed = fixed_costs(encoder, config.model.dtype == "bfloat16", texts, encoder.embedding_dim)

        def available() -> int:
            return budget_bytes(t.memory_gb, device) - torch.cuda.memory_allocated(device) - fixed

    sizes = plan_chunk_sizes(
        grad_size,
        embed_size,
        dropout=dropout_probability(encoder.model),
        device=acc.device,
        measure=measure,
        available=available,
        per_text=per_text,
        grad_option="training.chunk_size" if packing is None else "the chunk's token budget",
    )
    return dataclasses.replace(sizes, packing=packing)


def _tokens(texts: int | str | None, per_text: int) -> int | str | None:
    """A size in texts as tokens of texts of ``per_text`` tokens (auto and None stay)."""
    return texts * per_text if isinstance(texts, int) else texts


def plan_packing(config: Any, accelerator: Any, encoder: Any) -> Packing | None:
    """Padding-free chunks for this run, or None. ``model.padding_free``: null asks for them
    where a varlen kernel runs (a CUDA GPU in bf16 or fp16), true anywhere; either way the
    encoder must run packed (else one line says why). Readies the encoder: its attention, and
    ``model.compile``."""
    m = config.model
    if m.padding_free is False:
        return None
    kernel = accelerator.device.type == "cuda" and _half_precision(config, accelerator)
    if m.padding_free is None and not kernel:
        logger.info(
            "padded chunks: no varlen attention kernel here (a CUDA GPU computing in bf16 or "
            "fp16 has one); model.padding_free: true packs anyway, attending text by text"
        )
        return None
    problem = encoder.use_padding_free()
    if problem is not None:
        logger.warning("model.padding_free: %s; training on padded chunks", problem)
        return None
    mode = m.compile or "off"
    if mode != "off":
        from retriever.model.compiled import compile_layers

        compile_layers(encoder.model, mode)
    length = max(encoder.query_max_length, encoder.document_max_length)
    return Packing(length, static=mode in ("static", "cudagraphs"))


def _half_precision(config: Any, accelerator: Any) -> bool:
    return config.model.dtype == "bfloat16" or accelerator.mixed_precision in ("bf16", "fp16")


def plan_checked(
    config: Any, accelerator: Any, encoder: Any, recorded: list[int] | None
) -> ChunkSizes:
    """:func:`plan_for_run`, logged; a size that cannot be planned stops the start naming the
    option (an auto size must not change on resume, hence ``recorded``)."""
    from retriever.train.options import ConfigError

    try:
        sizes = plan_for_run(config, accelerator, encoder, recorded)
    except ChunkSizeError as exc:
        raise ConfigError(f"{config.where('training.embed_chunk_size')}: {exc}") from None
    logger.info(describe(sizes, config.training.memory_gb))
    return sizes
