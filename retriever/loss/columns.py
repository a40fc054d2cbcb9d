"""InfCLLoss's columns (anchor, positive, negative_1, ...) and their rows: embedding every column
with gradients as MultipleNegativesRankingLoss does, where each column's rows lie in the loss's
(anchors, candidates) pair, and which devices a column's features are on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


def embed_columns_like_mnrl(model: nn.Module, features: list[dict[str, Any]]) -> list[Tensor]:
    """Embed every column with gradients exactly as MultipleNegativesRankingLoss does (recent
    sentence-transformers merge the candidate columns into one forward), so the two losses draw
    the same dropout masks."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:  # sentence-transformers < 6: one forward per column
        return [model(f)["sentence_embedding"] for f in features]
    return embed_columns(model, features)


def column_rows(leaves: list[Tensor], column: int, batch: int) -> Tensor:
    """Column `column`'s rows in the (anchors, candidates) pair: anchors, then candidate columns
    back to back."""
    if column == 0:
        return leaves[0]
    return leaves[1][(column - 1) * batch : column * batch]


def feature_devices(features: Mapping[str, Any]) -> list[torch.device]:
    """The devices of a column's tensors, whose RNG states each mini-batch's replay restores."""
    return sorted({v.device for v in features.values() if isinstance(v, Tensor)}, key=str)
