"""One tiled pass of rows against columns, as the tile backends (`torch_tiles`, `triton_tiles`)
compute it: what a pass reads (`TilePass`), what its forward returns (`PassStats`) and what its
backward is given (`Coefs`). Plain data: every objective (`retriever.loss.passes`) and the ring
describe their work in these terms, and both backends implement the same contract.

For row i and column j of a pass, per prefix k of the embeddings (Matryoshka; one prefix, the
whole embedding, otherwise):

    X_ij = <r_i[:k], c_j[:k]> * a_i * b_j        a, b = 1 / prefix norms (or 1)
    row term  l_ij = (s + alpha * pen_ij) * X_ij     pen: the hardness class of (i, j)
    col term  l'_ij = s * X_ij

A row term is kept unless masked: a duplicate (``key``; never the row's target), the row's own
group (``own_mask``: same ``owner``), above the row's threshold (``thresh``; never the target),
or, in a self pass (columns [0, self_cols) are the rows themselves), j <= i. A column term
(columns [0, n_stats) only) is kept under the same rules seen from the column: the key mask
without the target exception, the column's threshold, the same triangle.

forward:  rows: lse_i = log sum_j exp(l_ij), the target's logit pos_i = s X_i,target, and with
          ``counts`` the number K_i of kept terms and their logit sum; cols: the same over i.
backward: G_ij = p_i exp(l_ij - lse_i) - u_i  (kept row terms)  - y_i [j = target_i]
               + p'_j exp(l'_ij - lse'_j) - u'_j (kept column terms)
          d_rows[:, :k] += s * (G a b) @ cols[:, :k], d_cols likewise, and per row / column
          sum_j G_ij X_ij (for the scale's gradient and the prefix normalisation's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class RowSide:
    rows: Tensor  # [nr, D], contiguous
    target: Tensor  # [nr] int64: the column of each row's positive in this pass (-1: none)
    key: Tensor | None = None  # [nr] int64: columns with this key are duplicates
    owner: Tensor | None = None  # [nr] int64: the row's query (own group, hardness classes)
    thresh: Tensor | None = None  # [NP, nr] fp32: similarity above which a term is dropped
    inv_norm: Tensor | None = None  # [NP, nr] fp32: 1 / |row[:k]| per prefix


@dataclass
class ColSide:
    cols: Tensor  # [nc, D], contiguous
    key: Tensor | None = None
    owner: Tensor | None = None
    thresh: Tensor | None = None  # [NP, nc]
    inv_norm: Tensor | None = None  # [NP, nc]
    n_stats: int = 0  # columns [0, n_stats) get column statistics
    pos: Tensor | None = None  # [NP, n_stats]: the logit of the positive each column stands for
    index: Tensor | None = None  # [nc] int64: each column's index in the full pass (a subset)

    def travelling(self) -> list[Tensor]:
        """What the ring passes on with these columns (the fields that are set)."""
        fields = (self.cols, self.key, self.owner, self.thresh, self.inv_norm, self.pos)
        return [t for t in fields if t is not None]

    def specs(self, n: int, n_stats: int) -> list[tuple[tuple, torch.dtype]]:
        """Shapes and dtypes of :meth:`travelling` for a block of n columns laid out as this."""
        shapes = [
            (self.cols, (n, self.cols.shape[1])),
            (self.key, (n,)),
            (self.owner, (n,)),
            (self.thresh, (n_prefixes := _rows(self.thresh, self.inv_norm, self.pos), n)),
            (self.inv_norm, (n_prefixes, n)),
            (self.pos, (n_prefixes, n_stats)),
        ]
        return [(shape, t.dtype) for t, shape in shapes if t is not None]

    def arriving(self, tensors: list[Tensor], n_stats: int) -> ColSide:
        """Another rank's block from its :meth:`travelling` tensors (laid out as this one)."""
        rest = iter(tensors)

        def take(field: Tensor | None) -> Tensor | None:
            return None if field is None else next(rest)

        cols = next(rest)
        return ColSide(cols, take(self.key), take(self.owner), take(self.thresh),
                       take(self.inv_norm), n_stats, take(self.pos))  # fmt: skip

    def subset(self, index: Tensor) -> ColSide:
        """The columns ``index`` (all < n_stats) alone, knowing their place in the full pass."""

        def pick(t: Tensor | None, dim: int = 0) -> Tensor | None:
            return None if t is None else t.index_select(dim, index)

        return ColSide(
            cols=self.cols[index].contiguous(),
            key=pick(self.key),
            owner=pick(self.owner),
            thresh=pick(self.thresh, 1),
            inv_norm=pick(self.inv_norm, 1),
            n_stats=index.numel(),
            pos=pick(self.pos, 1),
            index=index if self.index is None else self.index[index],
        )


def _rows(*tables: Tensor | None) -> int:
    """The prefix count of [NP, n] tables (1 when none is set)."""
    return next((t.shape[0] for t in tables if t is not None), 1)


@dataclass
class TilePass:
    row: RowSide
    col: ColSide
    dims: tuple[int, ...]  # prefix sizes, increasing; the last <= D (plain: (D,))
    own_mask: bool = False
    hardness: int = 0  # 0 none, 1 in-batch, 2 own hard negatives, 3 all negatives
    alpha: float = 0.0
    self_cols: int = 0
    counts: bool = False

    @property
    def n_prefixes(self) -> int:
        return len(self.dims)

    def with_cols(self, col: ColSide) -> TilePass:
        return replace(self, col=col)

    def column_reference(self, scale: Tensor) -> Tensor:
        """[NP, n_stats] fp32: the logit each column's terms are summed against: the positive
        it stands for (the softmax it feeds holds e^pos itself, so terms that underflow against
        it do not count); a column that stands for none (its sum is never used) gets the
        largest logit it can hold, s |c_j| max_i |r_i|."""
        n = self.col.n_stats
        cols, rows = self.col.cols[:n], self.row.rows
        bounds = []
        for k in self.dims:
            if self.col.inv_norm is not None:  # normalised prefixes: |X| <= 1 (and rounding)
                bounds.append(torch.full((n,), 1.0 + 1e-3, device=cols.device))
                continue
            c_norm = cols[:, :k].float().norm(dim=1)
            r_max = rows[:, :k].float().norm(dim=1).amax() if rows.shape[0] else 0.0
            bounds.append(c_norm * r_max * (1.0 + 1e-3))
        upper = scale.float() * torch.stack(bounds)
        if self.col.pos is None:
            return upper
        pos = self.col.pos.float()
        return torch.where(torch.isfinite(pos), pos, upper)


@dataclass
class Stats:
    """One side's statistics, each [NP, n] fp32 (count and lsum only with ``counts``)."""

    lse: Tensor
    count: Tensor | None = None
    lsum: Tensor | None = None

    def merge(self, other: Stats) -> Stats:
        """The statistics over the union of two disjoint sets of terms."""
        return Stats(
            torch.logaddexp(self.lse, other.lse),
            None if self.count is None else self.count + other.count,
            None if self.lsum is None else self.lsum + other.lsum,
        )

    def index_select(self, dim: int, index: Tensor) -> Stats:
        return Stats(
            *(None if t is None else t.index_select(dim, index) for t in vars(self).values())
        )

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.lse, self.count, self.lsum) if t is not None]


def empty_stats(n_prefixes: int, n: int, counts: bool, device: torch.device) -> Stats:
    """The statistics of no term: lse = -inf, zero counts and sums."""

    def zeros() -> Tensor:
        return torch.zeros(n_prefixes, n, device=device)

    return Stats(
        torch.full((n_prefixes, n), float("-inf"), device=device),
        zeros() if counts else None,
        zeros() if counts else None,
    )


@dataclass
class PassStats:
    rows: Stats
    pos: Tensor  # [NP, nr]: s X at each row's target (0 when the target is not in the pass)
    cols: Stats | None = None  # [NP, n_stats]


@dataclass
class Coefs:
    """The backward's coefficients of one side, each [NP, n] fp32: ``lse`` the softmax's
    reference, ``p`` the factor of exp(l - lse) on kept terms, ``u`` subtracted on every kept
    term, ``y`` subtracted at the row's target (rows only). None: zero."""

    lse: Tensor
    p: Tensor
    u: Tensor | None = None
    y: Tensor | None = None


def plain_pass(
    q: Tensor,
    c: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None,
    col_ids: Tensor | None,
) -> TilePass:
    """Queries against one block of candidates, duplicates of the positive (``col_ids[j] ==
    row_pos_ids[i]``, j not the positive) left out."""
    keys = row_pos_ids is not None and col_ids is not None
    return TilePass(
        RowSide(q, labels, row_pos_ids if keys else None),
        ColSide(c, col_ids if keys else None),
        dims=(q.shape[1],),
    )
