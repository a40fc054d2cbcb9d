"""InfCLLoss's mini-batches for the embedding cache: one column's features split into chunks of
`mini_batch_size` rows (longest texts first when sorting), each trimmed of the trailing padding
that none of its rows needs, so a mini-batch of short texts costs little.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from retriever.loss.gradcache import split_features


def plan_column(
    features: dict[str, Any], column: int, mini_batch_size: int, sort_by_length: bool
) -> tuple[list[dict], Tensor | None]:
    """Split one column into mini-batches (longest texts first when `sort_by_length`), each
    trimmed of the padding it does not need. Returns the chunks and the row order (None: as is)."""
    batch = _batch_size(features, column)
    # Values not indexed by row (prompt length, router task, modality) go to every chunk.
    rows = {k: v for k, v in features.items() if _is_row_tensor(v, batch)}
    extras = {k: v for k, v in features.items() if k not in rows}
    for key, value in extras.items():
        if isinstance(value, Tensor) and value.numel() > 1:
            # e.g. a VLM's flattened pixel values: no row slicing would be right for them.
            raise ValueError(
                f"column {column}: mini_batch_size cannot split feature {key!r} of shape "
                f"{tuple(value.shape)} (the batch has {batch} rows); use mini_batch_size=None"
            )
    order = None
    mask = rows.get("attention_mask")
    if sort_by_length and mask is not None and mask.dim() == 2:
        order = torch.argsort(mask.sum(dim=1), descending=True, stable=True)
        rows = {k: v[order] for k, v in rows.items()}
    pieces = split_features(rows, mini_batch_size)
    ends = chunk_ends(rows.get("attention_mask"), mini_batch_size, len(pieces))
    chunks = [{**trim_padding(piece, end), **extras} for piece, end in zip(pieces, ends)]
    return chunks, order


def _is_row_tensor(value: Any, batch: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch


def _batch_size(features: Mapping[str, Any], column: int) -> int:
    if "cu_seq_lens_q" in features:
        raise ValueError(
            f"column {column}: mini_batch_size does not support flattened (unpadded) inputs "
            "('cu_seq_lens_q'); use padded batches or mini_batch_size=None"
        )
    for key in ("input_ids", "attention_mask"):
        value = features.get(key)
        if isinstance(value, Tensor) and value.dim() == 2:
            return value.shape[0]
    raise ValueError(
        f"column {column}: mini_batch_size needs padded token features ('input_ids' or "
        f"'attention_mask' of shape [batch, tokens]), got keys {sorted(features)}; use "
        "mini_batch_size=None for this model"
    )


def chunk_ends(mask: Any, chunk_size: int, n_chunks: int) -> list[int | None]:
    """For each chunk of `chunk_size` rows, one past the last token column any of its rows
    attends to (None: nothing to trim).

    One read of the whole column's mask back to the host, instead of one per mini-batch: each
    such read waits for the GPU, so per-chunk reads would keep the CPU from queueing the next
    mini-batch while the GPU runs the current one.
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] == 0:
        return [None] * n_chunks
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = (mask.bool() * positions).amax(dim=1).tolist()  # per row; 0 for an empty row
    return [max(last[start : start + chunk_size]) for start in range(0, len(last), chunk_size)]


def trim_padding(chunk: dict[str, Any], end: int | None) -> dict[str, Any]:
    """Drop the trailing token columns (from `end` on) that are padding in every row of the chunk.

    Only trailing (right) padding is dropped, so positions are unchanged; the model sees the same
    tokens with the same mask, as sentence-transformers' cached losses do for their mini-batches.
    """
    mask = chunk.get("attention_mask")
    if end is None or not end or not isinstance(mask, Tensor) or end >= mask.shape[1]:
        return chunk
    width = mask.shape[1]
    return {
        k: v[:, :end] if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == width else v
        for k, v in chunk.items()
    }
