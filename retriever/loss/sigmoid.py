"""The sigmoid loss (SigLIP): every query-candidate pair is its own binary problem, tiled like
InfoNCE and around the same ring across processes, where its blocks need no logsumexp merge.

`sigmoid_loss` is the function, `SigmoidLoss` the module that owns t and b.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retriever.loss.inputs import check_inputs, resolve_impl, scale_tensor, sigmoid_backend
from retriever.loss.scaled import ScaledLoss
from retriever.loss.tiled import tiled_row_losses


def sigmoid_loss(
    queries: Tensor,
    candidates: Tensor,
    *,
    scale: float | Tensor = 10.0,
    bias: float | Tensor = -10.0,
    labels: Tensor | None = None,
    candidate_ids: Tensor | None = None,
    group: object | None = None,
    impl: str = "auto",
) -> Tensor:
    r"""The sigmoid loss of queries against candidates, computed tile by tile.

    .. math::
        x_{ij} = t \langle q_i, d_j \rangle + b, \qquad
        L = -\frac{1}{B_q} \sum_i \sum_j \log \sigma(z_{ij} x_{ij}),

    with z_ij = +1 when d_j is query i's positive and -1 otherwise (in-batch and hard
    negatives alike). A candidate whose id equals that of the row's positive (not the positive
    itself) is neither: it is left out. No [Bq, Bd] tensor is built.

    Args:
        queries, candidates, labels, candidate_ids, group, impl: as
            :func:`retriever.loss.contrastive_loss` (candidates [Bd, D], positives first by
            default; ``group`` runs the ring over the global batch, with the same gradient
            convention).
        scale: t > 0, a float or a 0-dim tensor (learnable when it requires grad).
        bias: b, a float or a 0-dim tensor (learnable when it requires grad). SigLIP starts at
            t = 10, b = -10, so that the many negatives begin with a small loss.

    Returns:
        The mean over queries of each query's sum over candidates (0-dim fp32); gradients reach
        the embeddings in their dtype and t, b in fp32.

    Citation: Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (ICCV 2023).
    """
    device = queries.device if isinstance(queries, Tensor) else torch.device("cpu")
    params = torch.stack([scale_tensor(scale, device), _bias_tensor(bias, device)])
    if group is not None:
        from retriever.loss.ring import ring_loss

        return ring_loss(
            queries,
            candidates,
            scale=params,
            labels=labels,
            candidate_ids=candidate_ids,
            group=group,
            impl=impl,
            kind="sigmoid",
        )
    check_inputs(queries, candidates, labels, candidate_ids)
    impl = resolve_impl(impl, queries.shape[0], candidates.shape[0], device)
    if labels is None:
        labels = torch.arange(queries.shape[0], device=device)
    labels = labels.long()
    ids = None if candidate_ids is None else candidate_ids.long()
    pos_ids = None if ids is None else ids[labels]
    if impl == "naive":
        rows = naive_sigmoid_rows(queries, candidates, params, labels, pos_ids, ids)
    else:
        backend = sigmoid_backend(impl)
        rows = tiled_row_losses(queries, candidates, params, labels, pos_ids, ids, backend)
    return rows.mean()


def _bias_tensor(bias: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(bias, Tensor):
        if bias.dim() != 0:
            raise ValueError(
                f"bias must be a float or a 0-dim tensor, got shape {tuple(bias.shape)}"
            )
        return bias.to(device=device, dtype=torch.float32)
    if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
        raise ValueError(f"bias must be a finite float or a 0-dim tensor, got {bias!r}")
    return torch.tensor(float(bias), dtype=torch.float32, device=device)


def naive_sigmoid_rows(
    queries: Tensor,
    candidates: Tensor,
    params: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None,
    col_ids: Tensor | None,
) -> Tensor:
    """Each query's sum of -log sigmoid(z x) [Bq] (fp32) from the full logits (autograd)."""
    x = (queries.float() @ candidates.float().T) * params[0] + params[1]
    y = torch.zeros_like(x).scatter_(1, labels[:, None], 1.0)
    loss = F.softplus(x * (1 - 2 * y))
    if row_pos_ids is not None and col_ids is not None:
        duplicate = (col_ids[None, :] == row_pos_ids[:, None]) & (y == 0)
        loss = loss.masked_fill(duplicate, 0.0)
    return loss.sum(dim=1)


class SigmoidLoss(ScaledLoss):
    r"""The sigmoid loss with a scale t (kept in [min_scale, max_scale], stored as log t) and a
    bias b, both learnable or fixed, for training code.

    .. math::
        L = -\frac{1}{B_q} \sum_i \sum_j \log \sigma\big(z_{ij} (t \langle q_i, d_j \rangle
            + b)\big)

    Args:
        scale: initial t (SigLIP: 10).
        bias: initial b (SigLIP: -10).
        learnable_scale: learn t and b with the model.
        min_scale, max_scale: the clamp applied to t.
        impl: see :func:`retriever.loss.contrastive_loss`.

    Example::

        loss_fn = SigmoidLoss(scale=10.0, bias=-10.0, learnable_scale=True)
        loss = loss_fn(query_embeddings, torch.cat([positive_embeddings, negative_embeddings]))
        loss.backward()

    Citation: Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (ICCV 2023).
    """

    def __init__(
        self,
        scale: float = 10.0,
        bias: float = -10.0,
        learnable_scale: bool = True,
        min_scale: float = 1.0,
        max_scale: float = 100.0,
        impl: str = "auto",
    ) -> None:
        super().__init__(scale, learnable_scale, min_scale, max_scale)
        self.bias = nn.Parameter(
            torch.tensor(float(bias), dtype=torch.float32), requires_grad=learnable_scale
        )
        self.impl = impl

    def compute(
        self,
        queries: Tensor,
        candidates: Tensor,
        labels: Tensor | None = None,
        candidate_ids: Tensor | None = None,
        group: object | None = None,
    ) -> Tensor:
        return sigmoid_loss(
            queries,
            candidates,
            scale=self.scale,
            bias=self.bias,
            labels=labels,
            candidate_ids=candidate_ids,
            group=group,
            impl=self.impl,
        )

    def get_config_dict(self) -> dict:
        return {**self.scale_config(), "bias": float(self.bias.detach()), "impl": self.impl}
