"""How many texts the embedding cache embeds per forward pass: given, or ``auto``.

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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

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
    grad: int  # texts per forward + backward of the gradient pass
    embed: int  # texts per forward of the no-grad pass
    measured: dict[str, float] | None = None  # what auto measured (bytes), for the log


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
    return peak / PROBE_TEXTS


def plan_chunk_sizes(
    chunk_size: int | str,
    embed_chunk_size: int | str | None,
    *,
    dropout: float,
    device: torch.device,
    measure: Callable[[bool], float] | None = None,
    available: Callable[[], int] | None = None,
) -> ChunkSizes:
    """The sizes of both passes. ``measure(grad)`` gives bytes per text of a pass and
    ``available()`` the bytes the budget leaves after fixed costs (both GPU only)."""
    exact_only = dropout > 0
    if isinstance(embed_chunk_size, int) and embed_chunk_size != chunk_size and exact_only:
        raise ChunkSizeError(
            f"training.embed_chunk_size ({embed_chunk_size}) differs from training.chunk_size "
            f"({chunk_size}), but the network has dropout (p = {dropout:g}): the no-grad pass "
            "would draw other dropout masks than the gradient pass, and the cached gradient "
            "would no longer be exact. Set model.dropout: 0 (with LoRA also model.lora's "
            "dropout: 0), or leave embed_chunk_size unset"
        )
    wants_auto = "auto" in (chunk_size, embed_chunk_size)
    if not wants_auto:
        return ChunkSizes(int(chunk_size), int(embed_chunk_size or chunk_size))
    if device.type != "cuda" or measure is None or available is None:
        grad = CPU_CHUNK if chunk_size == "auto" else int(chunk_size)
        embed = grad if embed_chunk_size in (None, "auto") else int(embed_chunk_size)
        return ChunkSizes(grad, embed)
    left = available()
    grad_bytes = measure(True)
    grad = int(chunk_size) if chunk_size != "auto" else _fit(left, grad_bytes, *GRAD_RANGE)
    embed = grad
    measured = {"bytes_left": float(left), "grad_bytes_per_text": grad_bytes}
    if embed_chunk_size == "auto" and not exact_only:
        embed_bytes = measure(False)
        measured["embed_bytes_per_text"] = embed_bytes
        embed = max(grad, _fit(left, embed_bytes, grad, EMBED_MAX))
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
    text = f"chunk sizes: {sizes.grad} texts per gradient pass, {sizes.embed} per no-grad pass"
    if sizes.measured:
        m = sizes.measured
        text += (
            f" (auto, {m['bytes_left'] / 2**30:.1f} GiB left for activations of "
            f"{budget_gb or 0:.1f} GiB; {m['grad_bytes_per_text'] / 2**20:.1f} MiB per text "
            "with gradients"
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


__all__ = ["ChunkSizeError", "ChunkSizes", "plan_chunk_sizes", "probe_bytes_per_text"]


def plan_for_run(
    config: Any, accelerator: Any, encoder: Any, recorded: list[int] | None = None
) -> ChunkSizes:
    """The sizes a run of ``config`` uses: ``recorded`` (by the checkpoint it resumes), or
    planned, measuring ``encoder`` on the GPU when a size is ``auto``."""
    from retriever.model.network import dropout_probability

    if recorded:
        return ChunkSizes(*recorded)
    t, acc = config.training, accelerator
    measure = available = None
    if acc.device.type == "cuda" and "auto" in (t.chunk_size, t.embed_chunk_size):
        device = acc.device
        encoder.to(device)
        length = max(encoder.query_max_length, encoder.document_max_length)

        def embed(features: dict[str, torch.Tensor]) -> torch.Tensor:
            with acc.autocast():  # the precision the run trains in
                return encoder(features)

        def measure(grad: bool) -> float:
            vocab = len(encoder.tokenizer)
            return probe_bytes_per_text(embed, encoder, device, length, vocab, grad)

        texts = t.batch_size // acc.num_processes * (2 + config.data.negatives)
        fixed = fixed_costs(encoder, config.model.dtype == "bfloat16", texts, encoder.embedding_dim)

        def available() -> int:
            return budget_bytes(t.memory_gb, device) - torch.cuda.memory_allocated(device) - fixed

    return plan_chunk_sizes(
        t.chunk_size,
        t.embed_chunk_size,
        dropout=dropout_probability(encoder.model),
        device=acc.device,
        measure=measure,
        available=available,
    )


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
