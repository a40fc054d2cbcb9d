"""Tiled InfoNCE in pure PyTorch: the reference tiled backend, for CPU and any GPU.

A backend computes, for one block of queries q [Bq, D] against one block of candidates c [Bc, D],
the two things the loss needs (design notes section 2):

    forward_block:  lse_i = log sum_j exp(S_ij)       over the unmasked j of the block
                    pos_i = S_i,labels[i]             (0 when labels[i] is not in the block)
    backward_block: dq_i += s * w_i * sum_j (P_ij - Y_ij) c_j
                    dc_j += s * sum_i w_i (P_ij - Y_ij) q_i
                    returns ds = sum_ij w_i (P_ij - Y_ij) <q_i, c_j>

with S_ij = s <q_i, c_j>, P_ij = exp(S_ij - lse_i) for the *final* lse (over every block),
Y the one-hot of labels and w_i = dL/dloss_i.  A candidate j is masked out of row i when
col_ids[j] == row_pos_ids[i] and j != labels[i] (a duplicate of the positive).

Only [ROW_CHUNK, COL_CHUNK] tiles of S ever exist, so the extra memory is O(Bq + Bc) for a
fixed D.  All arithmetic is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROW_CHUNK = 2048
COL_CHUNK = 4096
EMPTY_ROW = float("-inf")  # a row's logsumexp before any block


def merge_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row logsumexps of two column blocks: their logaddexp (the ring merges blocks so)."""
    return torch.logaddexp(a, b)


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


def forward_block(
    q: Tensor,
    c: Tensor,
    scale: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None = None,
    col_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Row logsumexp over this candidate block and the positive logit; both fp32 [Bq]."""
    n_rows, n_cols = q.shape[0], c.shape[0]
    lse = torch.empty(n_rows, dtype=torch.float32, device=q.device)
    pos = torch.zeros(n_rows, dtype=torch.float32, device=q.device)
    for r0 in range(0, n_rows, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, n_rows)
        q_rows = q[r0:r1].float()
        lab = labels[r0:r1]
        ids = None if row_pos_ids is None else row_pos_ids[r0:r1]
        # Online logsumexp: running max m and running sum l = sum exp(S - m).
        m = torch.full((r1 - r0,), float("-inf"), device=q.device)
        l = torch.zeros(r1 - r0, device=q.device)
        for c0 in range(0, n_cols, COL_CHUNK):
            c1 = min(c0 + COL_CHUNK, n_cols)
            s = (q_rows @ c[c0:c1].float().T).mul_(scale)
            inside, col = _positive_in_tile(lab, c0, c1)
            pos[r0:r1] += torch.where(inside, s.gather(1, col[:, None]).squeeze(1), 0.0)
            dup = _tile_mask(lab, ids, col_ids, c0, c1)
            if dup is not None:
                s.masked_fill_(dup, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=1))
            # A row with every column masked so far has m = -inf; shift by 0 instead so that
            # exp(-inf - -inf) never produces NaN.
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
            l = l * torch.exp(m - m_safe) + torch.exp(s - m_safe[:, None]).sum(dim=1)
            m = m_new
        lse[r0:r1] = m + torch.log(l)
    return lse, pos


def backward_block(
    q: Tensor,
    c: Tensor,
    scale: Tensor,
    lse: Tensor,
    row_weight: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None,
    col_ids: Tensor | None,
    dq: Tensor,
    dc: Tensor,
) -> Tensor:
    """Add this block's gradients into dq [Bq, D] and dc [Bc, D]; return d(loss)/d(scale)."""
    n_rows, n_cols = q.shape[0], c.shape[0]
    dscale = torch.zeros((), dtype=torch.float32, device=q.device)
    for r0 in range(0, n_rows, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, n_rows)
        q_rows = q[r0:r1].float()
        lab = labels[r0:r1]
        ids = None if row_pos_ids is None else row_pos_ids[r0:r1]
        w = row_weight[r0:r1, None]
        lse_rows = lse[r0:r1, None]
        dq_rows = torch.zeros_like(q_rows)
        for c0 in range(0, n_cols, COL_CHUNK):
            c1 = min(c0 + COL_CHUNK, n_cols)
            c_cols = c[c0:c1].float()
            dot = q_rows @ c_cols.T
            # G = w * (P - Y) = dL/dS for this tile.
            g = torch.exp(dot * scale - lse_rows)
            dup = _tile_mask(lab, ids, col_ids, c0, c1)
            if dup is not None:
                g.masked_fill_(dup, 0.0)
            inside, col = _positive_in_tile(lab, c0, c1)
            g.scatter_add_(1, col[:, None], -inside.to(g.dtype)[:, None])
            g.mul_(w)
            # S = s * dot, so dL/ds = sum G * dot and dL/dq = s * G @ c, dL/dc = s * G^T @ q.
            dscale += (g * dot).sum()
            dq_rows.addmm_(g, c_cols)
            dc[c0:c1] += (g.T @ q_rows).mul_(scale).to(dc.dtype)
        dq[r0:r1] += dq_rows.mul_(scale).to(dq.dtype)
    return dscale
