"""`InfoNCELoss`: the contrastive loss as a module that owns its temperature."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from retriever.loss.functional import contrastive_loss


class InfoNCELoss(nn.Module):
    r"""InfoNCE with a fixed or learnable scale (inverse temperature), for training code.

    .. math::
        L = \frac{1}{B_q} \sum_i \Big( \log \sum_j e^{s \langle q_i, d_j \rangle}
            - s \langle q_i, d_{y_i} \rangle \Big)

    The scale is stored as log(s), so a learnable scale stays positive, and kept in
    [min_scale, max_scale] (CLIP clamps at 100 for the same reason: a runaway temperature makes
    the loss degenerate). The parameter itself is clamped, in place, each time the loss is
    computed, not only the value it yields: a clamp of the value alone has zero gradient outside
    the range, so a parameter that an optimizer step pushed out could never come back.

    Args:
        scale: initial s = 1 / temperature (20 is temperature 0.05).
        learnable_scale: learn s with the model.
        min_scale, max_scale: the clamp applied to s.
        symmetric: average with the positive-to-query direction.
        impl: see :func:`retriever.loss.contrastive_loss`.

    Example::

        loss_fn = InfoNCELoss(scale=20.0, learnable_scale=True)
        loss = loss_fn(query_embeddings, torch.cat([positive_embeddings, negative_embeddings]))
        loss.backward()

    Citation: van den Oord et al., "Representation Learning with Contrastive Predictive Coding"
    (2018); tiling after Cheng et al., "Breaking the Memory Barrier: Near Infinite Batch Size
    Scaling for Contrastive Loss" (arXiv 2410.17243).
    """

    def __init__(
        self,
        scale: float = 20.0,
        learnable_scale: bool = False,
        min_scale: float = 1.0,
        max_scale: float = 100.0,
        symmetric: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if not 0 < min_scale <= scale <= max_scale:
            raise ValueError(
                f"need 0 < min_scale <= scale <= max_scale, got {min_scale}, {scale}, {max_scale}"
            )
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(scale), dtype=torch.float32), requires_grad=learnable_scale
        )
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.symmetric, self.impl = symmetric, impl

    @property
    def scale(self) -> Tensor:
        return self.log_scale.clamp(math.log(self.min_scale), math.log(self.max_scale)).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Put log(s) back into [log min_scale, log max_scale] (after an optimizer step)."""
        self.log_scale.clamp_(math.log(self.min_scale), math.log(self.max_scale))

    def forward(
        self,
        queries: Tensor,
        candidates: Tensor,
        labels: Tensor | None = None,
        candidate_ids: Tensor | None = None,
        group: object | None = None,
    ) -> Tensor:
        self.clamp_()  # the gradient below is then that of s itself, also at the range's ends
        return contrastive_loss(
            queries,
            candidates,
            scale=self.scale,
            labels=labels,
            candidate_ids=candidate_ids,
            symmetric=self.symmetric,
            group=group,
            impl=self.impl,
        )

    def get_config_dict(self) -> dict:
        return {
            "scale": float(self.scale.detach()),
            "learnable_scale": self.log_scale.requires_grad,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "symmetric": self.symmetric,
            "impl": self.impl,
        }
