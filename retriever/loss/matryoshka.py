"""`MatryoshkaLoss`: a contrastive loss on nested prefixes of the embeddings, so that a model
can be truncated to any of them (e.g. 768 -> 256 dims) and still retrieve well."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MatryoshkaLoss(nn.Module):
    r"""The weighted sum of ``loss`` on the first k dimensions, re-normalised, for each k.

    .. math::
        L = \sum_k w_k \, L_{inner}\big(\hat q_{:k}, \hat d_{:k}\big), \qquad
        \hat x_{:k} = x_{:k} / \lVert x_{:k} \rVert

    With `InfoNCELoss` (and its options), every prefix comes from one pass over each tile: the
    prefix dot products accumulate as the kernels' K-loop advances, each prefix with its own
    norms and logsumexp (`retriever.loss.contrastive_loss`'s ``matryoshka_dims``). Another loss
    is computed once per prefix, each term one tiled loss (nothing of size Bq x Bd). Either way
    the gradient reaches the full embedding exactly, also under the embedding cache.

    Args:
        loss: the loss on each prefix, a `ScaledLoss` (`InfoNCELoss` or `SigmoidLoss`; it
            owns the scale, clamped once per call).
        dims: the prefix sizes, e.g. [768, 512, 256, 128, 64]; each in [1, D].
        weights: one per dim (default 1 each).
        normalize: re-normalise each prefix (as a model with a Normalize module does at that
            size); False for a model trained with dot products.

    Example::

        loss_fn = MatryoshkaLoss(InfoNCELoss(scale=20.0), dims=[384, 256, 128, 64])
        loss = loss_fn(query_embeddings, candidate_embeddings)

    Citation: Kusupati et al., "Matryoshka Representation Learning" (NeurIPS 2022); as
    sentence-transformers' ``MatryoshkaLoss``.
    """

    def __init__(
        self,
        loss: nn.Module,
        dims: Sequence[int],
        weights: Sequence[float] | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        dims = [int(k) for k in dims]
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        if not dims or len(weights) != len(dims) or min(dims) < 1 or len(set(dims)) != len(dims):
            raise ValueError(
                f"dims must be distinct positive sizes with one weight each, got dims {dims} "
                f"and weights {weights}"
            )
        if not hasattr(loss, "compute") or not hasattr(loss, "clamp_"):
            raise ValueError("MatryoshkaLoss wraps a ScaledLoss (InfoNCELoss, SigmoidLoss)")
        if getattr(loss, "needs_example_indices", False):
            raise ValueError(
                "MatryoshkaLoss cannot wrap a loss that keeps per-example state (the global "
                "contrastive loss would update it once per dimension)"
            )
        self.loss, self.dims, self.weights, self.normalize = loss, dims, weights, normalize

    @property
    def scale(self) -> Tensor:
        return self.loss.scale

    def clamp_(self) -> None:
        self.loss.clamp_()

    def forward(self, queries: Tensor, candidates: Tensor, **kwargs: Any) -> Tensor:
        """``loss`` on each prefix; ``kwargs`` go to it (labels, candidate_ids, group)."""
        if max(self.dims) > queries.shape[1]:
            raise ValueError(
                f"matryoshka dims {self.dims} exceed the embedding size {queries.shape[1]}"
            )
        self.loss.clamp_()  # once: each term then reads the same scale (`ScaledLoss.forward`)
        if getattr(self.loss, "supports_prefixes", False):  # every prefix from one pass
            prefixes = (self.dims, self.weights, self.normalize)
            return self.loss.compute(queries, candidates, matryoshka=prefixes, **kwargs)
        total = queries.new_zeros((), dtype=torch.float32)
        for k, weight in zip(self.dims, self.weights):
            q, c = queries[:, :k], candidates[:, :k]
            if self.normalize:
                q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
            total = total + weight * self.loss.compute(q.contiguous(), c.contiguous(), **kwargs)
        return total

    def get_config_dict(self) -> dict:
        config = getattr(self.loss, "get_config_dict", dict)()
        return {**config, "matryoshka_dims": self.dims, "matryoshka_weights": self.weights}
