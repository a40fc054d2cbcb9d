"""`InfoNCELoss`: the contrastive loss as a module that owns its temperature."""

from __future__ import annotations

from torch import Tensor

from retriever.loss.functional import contrastive_loss
from retriever.loss.scaled import ScaledLoss


class InfoNCELoss(ScaledLoss):
    r"""InfoNCE with a fixed or learnable scale (inverse temperature), for training code.

    .. math::
        L = \frac{1}{B_q} \sum_i \Big( \log \sum_j e^{s \langle q_i, d_j \rangle}
            - s \langle q_i, d_{y_i} \rangle \Big)

    The scale is stored as log(s), so a learnable scale stays positive, and kept in
    [min_scale, max_scale] (`retriever.loss.scaled.ScaledLoss`).

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
        super().__init__(scale, learnable_scale, min_scale, max_scale)
        self.symmetric, self.impl = symmetric, impl

    def compute(
        self,
        queries: Tensor,
        candidates: Tensor,
        labels: Tensor | None = None,
        candidate_ids: Tensor | None = None,
        group: object | None = None,
    ) -> Tensor:
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
        return {**self.scale_config(), "symmetric": self.symmetric, "impl": self.impl}
