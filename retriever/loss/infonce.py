"""`InfoNCELoss`: the contrastive loss as a module that owns its temperature and its options."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from retriever.loss.functional import contrastive_loss
from retriever.loss.objective import make_objective
from retriever.loss.scaled import ScaledLoss


class InfoNCELoss(ScaledLoss):
    r"""InfoNCE with a fixed or learnable scale (inverse temperature), for training code.

    .. math::
        L = \frac{1}{B_q} \sum_i \Big( \log \sum_j e^{s \langle q_i, d_j \rangle}
            - s \langle q_i, d_{y_i} \rangle \Big)

    with the options of current embedding recipes (docs/objectives.md, "Loss options"): more
    directions in the denominator (GTE), hardness weighting, Qwen3-Embedding's false-negative
    margin, debiasing and label smoothing. The scale is stored as log(s), so a learnable scale
    stays positive, and kept in [min_scale, max_scale] (`retriever.loss.scaled.ScaledLoss`).

    Args:
        scale: initial s = 1 / temperature (20 is temperature 0.05).
        learnable_scale: learn s with the model.
        min_scale, max_scale: the clamp applied to s.
        symmetric: average with the positive-to-query direction.
        impl: see :func:`retriever.loss.contrastive_loss`.
        directions, partition_mode, hardness_mode, hardness_strength, false_negative_margin,
            debias, label_smoothing: see :func:`retriever.loss.contrastive_loss`; checked here.

    Example::

        loss_fn = InfoNCELoss(scale=20.0, learnable_scale=True,
                              directions=("query_to_doc", "query_to_query", "doc_to_query",
                                          "doc_to_doc"), false_negative_margin=0.1)
        loss = loss_fn(query_embeddings, torch.cat([positive_embeddings, negative_embeddings]))
        loss.backward()

    Citation: van den Oord et al., "Representation Learning with Contrastive Predictive Coding"
    (2018); tiling after Cheng et al., "Breaking the Memory Barrier: Near Infinite Batch Size
    Scaling for Contrastive Loss" (arXiv 2410.17243); the options' papers in
    docs/objectives.md.
    """

    supports_prefixes = True  # MatryoshkaLoss computes every prefix in one pass

    def __init__(
        self,
        scale: float = 20.0,
        learnable_scale: bool = False,
        min_scale: float = 1.0,
        max_scale: float = 100.0,
        symmetric: bool = False,
        impl: str = "auto",
        directions: Sequence[str] | None = None,
        partition_mode: str | None = None,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        false_negative_margin: float | None = None,
        debias: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(scale, learnable_scale, min_scale, max_scale)
        self.objective = make_objective(
            symmetric=symmetric,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
            false_negative_margin=false_negative_margin,
            debias=debias,
            label_smoothing=label_smoothing,
        )
        self.symmetric, self.impl = self.objective.symmetric, impl

    def compute(
        self,
        queries: Tensor,
        candidates: Tensor,
        labels: Tensor | None = None,
        candidate_ids: Tensor | None = None,
        group: object | None = None,
        candidate_owners: Tensor | None = None,
        matryoshka: tuple | None = None,
    ) -> Tensor:
        """The loss; ``matryoshka``: (dims, weights, normalize) to sum it over those prefixes
        in one pass (`MatryoshkaLoss` passes it)."""
        dims, weights, normalize = matryoshka or (None, None, True)
        return contrastive_loss(
            queries,
            candidates,
            scale=self.scale,
            labels=labels,
            candidate_ids=candidate_ids,
            candidate_owners=candidate_owners,
            matryoshka_dims=dims,
            matryoshka_weights=weights,
            matryoshka_normalize=normalize,
            group=group,
            impl=self.impl,
            **self.objective.config(),
        )

    def get_config_dict(self) -> dict:
        return {**self.scale_config(), "symmetric": self.symmetric, "impl": self.impl,
                **self.objective.config()}  # fmt: skip
