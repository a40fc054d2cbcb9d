"""Tiled InfoNCE in pure PyTorch: the reference tiled backend, for CPU and any GPU.

A backend computes one `TilePass` (rows against columns, `retriever.loss.tile_pass`, whose
docstring has the math): ``forward_pass`` returns each row's (and, for the first n_stats
columns, each column's) logsumexp over its kept terms, the target's logit and, when asked, the
number of kept terms and their sum; ``backward_pass`` adds the gradients of given softmax
coefficients into the rows and columns. ``forward_block`` / ``backward_block`` are the plain
InfoNCE of one candidate block (design notes section 2) in those terms.

Only [ROW_CHUNK, COL_CHUNK] tiles of S ever exist, so the extra memory is O(rows + columns) for
a fixed D. All arithmetic is fp32 whatever the input dtype; statistics are exact logsumexps
(each tile's, merged with logaddexp), rows and columns alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from retriever.loss.tile_pass import (
    Coefs,
    PassStats,
    Stats,
    TilePass,
    empty_stats,
    plain_pass,
)

ROW_CHUNK = 2048
COL_CHUNK = 4096
EMPTY_ROW = float("-inf")  # a row's logsumexp before any block


def merge_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row logsumexps of two column blocks: their logaddexp (the ring merges blocks so)."""
    return torch.logaddexp(a, b)


@dataclass
class _Tile:
    """One tile's masks (the same for every prefix) and where it lies."""

    rows: slice
    cols: slice
    is_target: Tensor  # [r, c] the row's positive
    dropped: Tensor  # [r, c] out both ways: own group, the self pass's lower triangle
    duplicate: Tensor | None  # [r, c] key equal (rows keep their target)
    penalised: Tensor | None  # [r, c] hardness class
    stat_cols: int  # columns of this tile with column statistics (a prefix of the tile)


def _tile(tp: TilePass, r0: int, r1: int, c0: int, c1: int) -> _Tile:
    row, col = tp.row, tp.col
    device = row.rows.device
    ii = torch.arange(r0, r1, device=device)
    jj = col.index[c0:c1] if col.index is not None else torch.arange(c0, c1, device=device)
    is_target = jj[None, :] == row.target[r0:r1, None]
    dropped = torch.zeros(r1 - r0, c1 - c0, dtype=torch.bool, device=device)
    same_owner = None
    if row.owner is not None and col.owner is not None:
        same_owner = col.owner[None, c0:c1] == row.owner[r0:r1, None]
        if tp.own_mask:
            dropped |= same_owner
    if tp.self_cols:  # each unordered pair once: (i, j) with j > i, seen from both ends
        dropped |= (jj[None, :] < tp.self_cols) & (jj[None, :] <= ii[:, None])
    duplicate = None
    if row.key is not None and col.key is not None:
        duplicate = col.key[None, c0:c1] == row.key[r0:r1, None]
    penalised = None
    if tp.hardness == 1:  # in-batch: candidates of other queries
        penalised = ~same_owner
    elif tp.hardness == 2:  # the row's own hard negatives
        penalised = same_owner & ~is_target
    elif tp.hardness == 3:  # every negative
        penalised = ~is_target
    stat_cols = max(0, min(c1, col.n_stats) - c0)
    return _Tile(slice(r0, r1), slice(c0, c1), is_target, dropped, duplicate, penalised, stat_cols)


def _chunks(tp: TilePass) -> Iterator[_Tile]:
    n_rows, n_cols = tp.row.rows.shape[0], tp.col.cols.shape[0]
    for r0 in range(0, n_rows, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, n_rows)
        for c0 in range(0, n_cols, COL_CHUNK):
            c1 = min(c0 + COL_CHUNK, n_cols)
            if tp.self_cols and c1 <= tp.self_cols and c1 - 1 <= r0 and tp.col.index is None:
                continue  # wholly on or below the diagonal of a self pass: nothing kept
            yield _tile(tp, r0, r1, c0, c1)


def _similarities(tp: TilePass, t: _Tile) -> Iterator[tuple[int, Tensor]]:
    """(prefix, X [r, c] fp32) for each prefix: the prefix dot products accumulate as the
    dimension advances, each then normalised."""
    rows = tp.row.rows[t.rows].float()
    cols = tp.col.cols[t.cols].float()
    dot = torch.zeros(rows.shape[0], cols.shape[0], device=rows.device)
    start = 0
    for p, k in enumerate(tp.dims):
        dot = dot.addmm(rows[:, start:k], cols[:, start:k].T)
        start = k
        x = dot
        if tp.row.inv_norm is not None:
            x = dot * tp.row.inv_norm[p, t.rows, None] * tp.col.inv_norm[p, None, t.cols]
        yield p, x


def _kept(tp: TilePass, t: _Tile, p: int, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(kept row terms, kept column terms or None) of prefix p's similarities x."""
    keep = ~t.dropped
    keep_col = keep.clone() if t.stat_cols else None
    if t.duplicate is not None:
        keep &= ~t.duplicate | t.is_target
        if keep_col is not None:
            keep_col &= ~t.duplicate
    if tp.row.thresh is not None:
        keep &= ~(x > tp.row.thresh[p, t.rows, None]) | t.is_target
    if keep_col is not None:
        if tp.col.thresh is not None:
            keep_col &= ~(x > tp.col.thresh[p, None, t.cols]) | t.is_target
        keep_col[:, t.stat_cols :] = False
    return keep, keep_col


def _row_logits(tp: TilePass, t: _Tile, x: Tensor, scale: Tensor) -> Tensor:
    if t.penalised is None:
        return x * scale
    return x * (scale + tp.alpha * t.penalised.float())


def _side_stats(logits: Tensor, keep: Tensor, dim: int, counts: bool) -> Stats:
    masked = logits.masked_fill(~keep, float("-inf"))
    return Stats(
        torch.logsumexp(masked, dim=dim),
        keep.sum(dim).float() if counts else None,
        torch.where(keep, logits, 0.0).sum(dim) if counts else None,
    )


def _add(total: Stats, p: int, span: slice, part: Stats) -> None:
    total.lse[p, span] = torch.logaddexp(total.lse[p, span], part.lse)
    if total.count is not None:
        total.count[p, span] += part.count
        total.lsum[p, span] += part.lsum


def forward_pass(tp: TilePass, scale: Tensor) -> PassStats:
    """Row (and the first n_stats columns') statistics of the pass; every [NP, n] fp32."""
    n_p, n_rows, device = tp.n_prefixes, tp.row.rows.shape[0], tp.row.rows.device
    rows = empty_stats(n_p, n_rows, tp.counts, device)
    cols = empty_stats(n_p, tp.col.n_stats, tp.counts, device) if tp.col.n_stats else None
    pos = torch.zeros(n_p, n_rows, device=device)
    for t in _chunks(tp):
        for p, x in _similarities(tp, t):
            keep, keep_col = _kept(tp, t, p, x)
            logits = _row_logits(tp, t, x, scale)
            pos[p, t.rows] += torch.where(t.is_target, x * scale, 0.0).sum(1)
            _add(rows, p, t.rows, _side_stats(logits, keep, 1, tp.counts))
            if keep_col is not None:
                span = slice(t.cols.start, t.cols.start + t.stat_cols)
                part = _side_stats((x * scale)[:, : t.stat_cols], keep_col[:, : t.stat_cols], 0,
                                   tp.counts)  # fmt: skip
                _add(cols, p, span, part)
    return PassStats(rows, pos, cols)


def _softmax_grad(tp: TilePass, t: _Tile, p: int, x: Tensor, scale: Tensor, rc: Coefs,
                  cc: Coefs | None) -> Tensor:  # fmt: skip
    """G = dL/dl of the tile for prefix p (design of `tile_pass`)."""
    keep, keep_col = _kept(tp, t, p, x)
    logits = _row_logits(tp, t, x, scale)
    r = t.rows
    g = torch.where(keep, rc.p[p, r, None] * torch.exp(logits - rc.lse[p, r, None]), 0.0)
    if rc.u is not None:
        g -= torch.where(keep, rc.u[p, r, None], 0.0)
    if rc.y is not None:
        g -= torch.where(t.is_target, rc.y[p, r, None], 0.0)
    if keep_col is not None and cc is not None:
        n = t.stat_cols
        cs = slice(t.cols.start, t.cols.start + n)
        col_g = cc.p[p, None, cs] * torch.exp(x[:, :n] * scale - cc.lse[p, None, cs])
        if cc.u is not None:
            col_g = col_g - cc.u[p, None, cs]
        g[:, :n] += torch.where(keep_col[:, :n], col_g, 0.0)
    return g


def backward_pass(
    tp: TilePass,
    scale: Tensor,
    row_coefs: Coefs,
    col_coefs: Coefs | None,
    d_rows: Tensor,
    d_cols: Tensor,
) -> tuple[Tensor, Tensor]:
    """Add s (G a b) @ cols[:, :k] into ``d_rows`` and its transpose's product into ``d_cols``
    (fp32 [n, D]) for every prefix; return sum_j G_ij X_ij per row and sum_i per column
    ([NP, nr], [NP, nc]): the scale's gradient and the prefix normalisation's need them."""
    n_p = tp.n_prefixes
    device = tp.row.rows.device
    row_dots = torch.zeros(n_p, tp.row.rows.shape[0], device=device)
    col_dots = torch.zeros(n_p, tp.col.cols.shape[0], device=device)
    for t in _chunks(tp):
        rows = tp.row.rows[t.rows].float()
        cols = tp.col.cols[t.cols].float()
        for p, x in _similarities(tp, t):
            g = _softmax_grad(tp, t, p, x, scale, row_coefs, col_coefs)
            gx = g * x
            row_dots[p, t.rows] += gx.sum(1)
            col_dots[p, t.cols] += gx.sum(0)
            if tp.row.inv_norm is not None:
                g = g * tp.row.inv_norm[p, t.rows, None] * tp.col.inv_norm[p, None, t.cols]
            k = tp.dims[p]
            d_rows[t.rows, :k] += (g @ cols[:, :k]).mul_(scale)
            d_cols[t.cols, :k] += (g.T @ rows[:, :k]).mul_(scale)
    return row_dots, col_dots


# -- the plain InfoNCE of one candidate block ---------------------------------------------------


def forward_block(
    q: Tensor,
    c: Tensor,
    scale: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None = None,
    col_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Row logsumexp over this candidate block and the positive logit; both fp32 [Bq]."""
    stats = forward_pass(plain_pass(q, c, labels, row_pos_ids, col_ids), scale)
    return stats.rows.lse[0], stats.pos[0]


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
    """Add this block's gradients of sum_i w_i (lse_i - S_i,labels[i]) into dq [Bq, D] and dc
    [Bc, D]; return d(loss)/d(scale)."""
    tp = plain_pass(q, c, labels, row_pos_ids, col_ids)
    coefs = Coefs(lse[None], row_weight[None], y=row_weight[None])
    d_rows = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    row_dots, _ = backward_pass(tp, scale, coefs, None, d_rows, dc)
    dq += d_rows.to(dq.dtype)
    return row_dots.sum()
