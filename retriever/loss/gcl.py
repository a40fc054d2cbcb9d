"""`GlobalContrastiveLoss`: FastCLIP's global contrastive loss, optimised with compositional
stochastic estimates (FCCO), on the tiled InfoNCE rows and the ring."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from retriever.loss.functional import contrastive_row_losses
from retriever.loss.gather import gather_rows
from retriever.loss.scaled import ScaledLoss


class GlobalContrastiveLoss(ScaledLoss):
    r"""The global contrastive loss with a moving average per example, for small batches.

    InfoNCE over a batch estimates log of a sum over the whole dataset from the batch alone,
    which is biased for small batches. FCCO keeps, for every example i, a moving average u_i
    of the batch estimate g_i and follows the gradient of the surrogate

    .. math::
        g_i = \sum_{j \in B} e^{S_{ij} - S_{ii}} = e^{\ell_i}, \qquad
        u_i \leftarrow (1 - \gamma) u_i + \gamma g_i, \qquad
        \nabla L = \frac{1}{|B|} \sum_i \frac{g_i}{u_i} \nabla \ell_i

    with S = s <q, d> and l_i = lse_i - S_ii the row loss of the tiled kernels: g comes from
    their logsumexp, with no new kernel (FastCLIP's mean over j differs by the factor |B|,
    which cancels in g / u). gamma follows a cosine from 1 to ``gamma_min`` over
    ``decay_steps`` steps (FastCLIP's schedule), so the first step is plain InfoNCE, and an
    example seen for the first time starts at u = g. Symmetric: the same for each positive
    against the queries, with its own u. The value returned is the batch's InfoNCE (comparable
    with it); only the gradient is the surrogate's, also for a learnable scale.

    The state (u of both directions, the step count) has one entry per training example and is
    part of ``state_dict``, so a resumed run continues it exactly. Across processes every rank
    gathers the batch's (example, g) pairs, so all ranks hold the same u.

    Args:
        num_examples: examples in the training data (``example_indices`` lie in [0, N)).
        scale, learnable_scale, min_scale, max_scale: the logit scale, as `InfoNCELoss`.
        gamma_min: the moving average's final rate (FastCLIP: 0.2 for small data sets).
        decay_steps: steps over which gamma decays from 1 to ``gamma_min``.
        symmetric: also the positive-to-query direction.
        eps: added to u (u >= 1 here, since g_i counts its own positive's e^0).
        impl: see :func:`retriever.loss.contrastive_loss`.

    Example::

        loss_fn = GlobalContrastiveLoss(len(train_set), scale=20.0, decay_steps=1000)
        loss = loss_fn(q, torch.cat([positives, negatives]), example_indices=indices)

    Citation: Wei et al., "FastCLIP: A Suite of Optimization Techniques to Accelerate CLIP
    Training with Limited Resources" (arXiv 2407.01445); Yuan et al., "Provable Stochastic
    Optimization for Global Contrastive Learning" (ICML 2022).
    """

    needs_example_indices = True

    def __init__(
        self,
        num_examples: int,
        scale: float = 20.0,
        learnable_scale: bool = False,
        min_scale: float = 1.0,
        max_scale: float = 100.0,
        gamma_min: float = 0.2,
        decay_steps: int = 1000,
        symmetric: bool = False,
        eps: float = 1e-8,
        impl: str = "auto",
    ) -> None:
        super().__init__(scale, learnable_scale, min_scale, max_scale)
        if num_examples < 1 or decay_steps < 1 or not 0 < gamma_min <= 1:
            raise ValueError(
                f"need num_examples >= 1, decay_steps >= 1 and 0 < gamma_min <= 1, got "
                f"{num_examples}, {decay_steps}, {gamma_min}"
            )
        self.gamma_min, self.decay_steps = float(gamma_min), int(decay_steps)
        self.symmetric, self.eps, self.impl = symmetric, float(eps), impl
        self.register_buffer("u_query", torch.zeros(num_examples, dtype=torch.float32))
        self.register_buffer("u_document", torch.zeros(num_examples, dtype=torch.float32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def gamma(self) -> float:
        """This step's rate: 1 at the first step, ``gamma_min`` from ``decay_steps`` on."""
        progress = min(int(self.steps), self.decay_steps) / self.decay_steps
        return self.gamma_min + (1 - self.gamma_min) * (1 + math.cos(math.pi * progress)) / 2

    def compute(
        self,
        queries: Tensor,
        candidates: Tensor,
        example_indices: Tensor,
        labels: Tensor | None = None,
        candidate_ids: Tensor | None = None,
        group: object | None = None,
    ) -> Tensor:
        if example_indices.shape != (queries.shape[0],):
            raise ValueError(
                f"example_indices must have shape ({queries.shape[0]},), got "
                f"{tuple(example_indices.shape)}"
            )
        common = dict(scale=self.scale, group=group, impl=self.impl)
        rows = [
            contrastive_row_losses(
                queries, candidates, labels=labels, candidate_ids=candidate_ids, **common
            )
        ]
        if self.symmetric:  # each positive against every query; its own query is the target
            own = torch.arange(queries.shape[0], device=queries.device)
            targets = own if labels is None else labels.long()
            pos_ids = None if candidate_ids is None else candidate_ids[targets]
            rows.append(
                contrastive_row_losses(
                    candidates[targets], queries, labels=own, candidate_ids=pos_ids, **common
                )
            )
        indices = example_indices.to(queries.device).long()
        weights, total = self._update([r.detach() for r in rows], indices, group)
        value = sum(r.mean() for r in rows) / len(rows)  # the batch's InfoNCE, for the log
        surrogate = sum((w * r).sum() for w, r in zip(weights, rows)) / (total * len(rows))
        return value.detach() + surrogate - surrogate.detach()

    @torch.no_grad()
    def _update(
        self, rows: list[Tensor], indices: Tensor, group: object | None
    ) -> tuple[list[Tensor], int]:
        """Move every direction's u towards this batch's g (all ranks' rows); return each
        local row's weight g / (u + eps) and the number of rows in the global batch. In eval
        mode the state is left alone and every weight is 1 (plain InfoNCE)."""
        every_index = indices if group is None else gather_rows(indices, group)
        if not self.training:
            return [torch.ones_like(loss) for loss in rows], every_index.shape[0]
        gamma, weights = self.gamma(), []
        for u, loss in zip((self.u_query, self.u_document), rows):
            g = loss.double().exp()  # e^l >= 1: the positive's own term
            every_g = g if group is None else gather_rows(g, group)
            old = u[every_index].double()
            fresh = torch.where(old > 0, (1 - gamma) * old + gamma * every_g, every_g)
            u[every_index] = fresh.float()
            weights.append((g / (u[indices].double() + self.eps)).float())
        self.steps += 1
        return weights, every_index.shape[0]

    def get_config_dict(self) -> dict:
        return {
            **self.scale_config(),
            "num_examples": int(self.u_query.shape[0]),
            "gamma_min": self.gamma_min,
            "decay_steps": self.decay_steps,
            "symmetric": self.symmetric,
            "impl": self.impl,
        }
