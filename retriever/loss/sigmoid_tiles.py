"""Tiled sigmoid loss (SigLIP) in pure PyTorch: the reference tiled backend of `sigmoid_loss`,
for CPU and any GPU.

The same block contract as `torch_tiles`, with the logit scale replaced by the pair
``params = [t, b]`` and no softmax: for one block of rows q [Bq, D] against candidates
c [Bc, D], with x_ij = t <q_i, c_j> + b and z_ij = +1 for the row's positive, -1 otherwise,

    forward_block:  row_i = sum_j softplus(-z_ij x_ij)     (= -log sigmoid(z_ij x_ij))
    backward_block: G_ij = w_i (sigmoid(x_ij) - Y_ij)      (= w_i dL/dx_ij)
                    dq_i += t sum_j G_ij c_j,   dc_j += t sum_i G_ij q_i
                    returns [dt, db] = [sum_ij G_ij <q_i, c_j>, sum_ij G_ij]

A candidate that duplicates the row's positive (``col_ids[j] == row_pos_ids[i]``, j not the
label) is neither positive nor negative: it adds nothing. Every pair is its own binary problem,
so the row sums of two blocks simply add (``merge_rows``): no logsumexp, no running max, and
the backward needs nothing from the forward but the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retriever.loss import torch_tiles


def _tile_mask(
    labels: Tensor, row_pos_ids: Tensor | None, col_ids: Tensor | None, c0: int, c1: int
) -> Tensor | None:
    """[rows, c1 - c0] bool: True where a candidate duplicates the row's positive."""
    if row_pos_ids is None or col_ids is None:
        return None
    cols = torch.arange(c0, c1, device=labels.device)
    return (col_ids[c0:c1][None, :] == row_pos_ids[:, None]) & (cols[None, :] != labels[:, None])


def _positive_in_tile(labels: Tensor, c0: int, c1: int) -> tuple[Tensor, Tensor]:
    """Rows whose positive lies in columns [c0, c1), and its column inside the tile."""
    inside = (labels >= c0) & (labels < c1)
    return inside, (labels - c0).clamp(0, c1 - c0 - 1)


EMPTY_ROW = 0.0  # a row's sum before any block


def merge_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row sums of two column blocks: they add."""
    return a + b


def _targets(labels: Tensor, c0: int, c1: int, rows: int, device: torch.device) -> Tensor:
    """[rows, c1 - c0] fp32: 1 at the row's positive (if it is in the tile), else 0."""
    inside, col = _positive_in_tile(labels, c0, c1)
    y = torch.zeros(rows, c1 - c0, device=device)
    return y.scatter_(1, col[:, None], inside.float()[:, None])


def forward_block(
    q: Tensor,
    c: Tensor,
    params: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None = None,
    col_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(row sums of -log sigmoid(z x) over this block, zeros); both fp32 [Bq]. The zeros stand
    where InfoNCE's backends return the positive logit, so both fit one autograd Function."""
    t, b = params[0], params[1]
    out = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    for r0 in range(0, q.shape[0], torch_tiles.ROW_CHUNK):
        r1 = min(r0 + torch_tiles.ROW_CHUNK, q.shape[0])
        q_rows, lab = q[r0:r1].float(), labels[r0:r1]
        ids = None if row_pos_ids is None else row_pos_ids[r0:r1]
        for c0 in range(0, c.shape[0], torch_tiles.COL_CHUNK):
            c1 = min(c0 + torch_tiles.COL_CHUNK, c.shape[0])
            x = (q_rows @ c[c0:c1].float().T).mul_(t).add_(b)
            y = _targets(lab, c0, c1, r1 - r0, q.device)
            loss = F.softplus(x * (1 - 2 * y))  # softplus(-z x) with z = 2y - 1
            dup = _tile_mask(lab, ids, col_ids, c0, c1)
            if dup is not None:
                loss.masked_fill_(dup, 0.0)
            out[r0:r1] += loss.sum(dim=1)
    return out, torch.zeros_like(out)


def backward_block(
    q: Tensor,
    c: Tensor,
    params: Tensor,
    row_sums: Tensor,
    row_weight: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None,
    col_ids: Tensor | None,
    dq: Tensor,
    dc: Tensor,
) -> Tensor:
    """Add this block's gradients into dq [Bq, D] and dc [Bc, D]; return [dL/dt, dL/db]
    (``row_sums``, the forward's output, is not needed: each pair's gradient is local)."""
    t, b = params[0], params[1]
    dparams = torch.zeros(2, dtype=torch.float32, device=q.device)
    for r0 in range(0, q.shape[0], torch_tiles.ROW_CHUNK):
        r1 = min(r0 + torch_tiles.ROW_CHUNK, q.shape[0])
        q_rows, lab = q[r0:r1].float(), labels[r0:r1]
        ids = None if row_pos_ids is None else row_pos_ids[r0:r1]
        dq_rows = torch.zeros_like(q_rows)
        for c0 in range(0, c.shape[0], torch_tiles.COL_CHUNK):
            c1 = min(c0 + torch_tiles.COL_CHUNK, c.shape[0])
            c_cols = c[c0:c1].float()
            dot = q_rows @ c_cols.T
            # d/dx softplus(-z x) = -z sigmoid(-z x) = sigmoid(x) - y for z = 2y - 1.
            g = torch.sigmoid(dot * t + b) - _targets(lab, c0, c1, r1 - r0, q.device)
            dup = _tile_mask(lab, ids, col_ids, c0, c1)
            if dup is not None:
                g.masked_fill_(dup, 0.0)
            g.mul_(row_weight[r0:r1, None])
            dparams[0] += (g * dot).sum()  # x = t dot + b
            dparams[1] += g.sum()
            dq_rows.addmm_(g, c_cols)
            dc[c0:c1] += (g.T @ q_rows).mul_(t).to(dc.dtype)
        dq[r0:r1] += dq_rows.mul_(t).to(dq.dtype)
    return dparams
