"""An `Objective` as tiled passes: which passes a batch needs, how their statistics make each
query's loss, and how that loss's gradient becomes each pass's softmax coefficients.

The passes (rows against columns; `retriever.loss.tile_pass`):

    qd  queries against candidates: query_to_doc's rows and, from the same tiles, the
        positives' columns: doc_to_query (the symmetric loss in one pass)
    qq  queries against queries (query_to_query), each pair once (a self pass)
    dd  positives against candidates (doc_to_doc), the positives' own pairs once

For prefix k (Matryoshka), each query row i has one statistics set per direction; joint
merges them (logaddexp), per_direction keeps them apart. A block (one softmax) then gives

    plain            V = lse - pos
    label smoothing  V = lse - (1 - eps) pos - eps * lsum / K
    debias           V = lse + log(pi + g) - pos,  pi = e^(pos - lse),  N = K - 1,
                     g = max(((1 - pi) - N tau pi) / (1 - tau), N e^(-s - lse))

and dV/dl = c P - u on every term, minus y at the positive (c, u, y per row: `_Block`). The
row loss is the mean of its blocks' V; the loss the caller reduces is that per row and prefix.

A `Runner` computes a pass over the whole batch: one process's tiles (`LocalRunner`) or the
ring's (`retriever.loss.ring`), which cannot do self passes and so runs qq and dd in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch
from torch import Tensor

from retriever.loss.objective import DOC_TO_DOC, DOC_TO_QUERY, QUERY_TO_QUERY, Objective
from retriever.loss.tile_pass import Coefs, ColSide, PassStats, RowSide, Stats, TilePass

# F.normalize's floor on a norm.
NORM_EPS = 1e-12


@dataclass(frozen=True)
class Prefixes:
    """The embedding prefixes the loss is computed on (Matryoshka): sizes, weights, and whether
    each prefix is re-normalised. One prefix, the whole embedding, unnormalised: plain."""

    dims: tuple[int, ...]
    weights: tuple[float, ...]
    normalize: bool = False


@dataclass
class Layout:
    """What the loss knows of the batch besides the embeddings (this process's share)."""

    labels: Tensor  # [Bq] int64: each query's positive among the local candidates
    default_labels: bool  # labels were not given: positive i is candidate i
    ids: Tensor | None  # [Bd] int64 candidate ids
    owners: Tensor | None  # [Bd] int64: the (global) query each candidate belongs to, -1 none
    query_offset: int = 0  # global index of the first local query
    candidate_offset: int = 0  # global index of the first local candidate
    stat_cols: int = 0  # leading local candidates that are positives (doc_to_query's columns)


class Runner(Protocol):
    """Computes a pass over the whole batch (every process's columns, when there are several)."""

    self_passes: bool

    def forward(self, name: str, tp: TilePass, scale: Tensor) -> PassStats: ...

    def backward(
        self,
        name: str,
        tp: TilePass,
        scale: Tensor,
        rows: Coefs,
        cols: Coefs | None,
        d_rows,
        d_cols,
    ) -> tuple[Tensor, Tensor]: ...


class LocalRunner:
    """This process's batch, with one tile backend (`torch_tiles` or `triton_tiles`)."""

    self_passes = True

    def __init__(self, backend: ModuleType) -> None:
        self.backend = backend

    def forward(self, name: str, tp: TilePass, scale: Tensor) -> PassStats:
        return self.backend.forward_pass(tp, scale)

    def backward(self, name, tp, scale, rows, cols, d_rows, d_cols):
        return self.backend.backward_pass(tp, scale, rows, cols, d_rows, d_cols)


def inverse_norms(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """[NP, n] fp32: 1 / |x[:, :k]| for each prefix k (floored as F.normalize does)."""
    return torch.stack(
        [x[:, :k].float().norm(dim=1).clamp_min(NORM_EPS).reciprocal() for k in dims]
    )


def prefix_dots(a: Tensor, b: Tensor, dims, inv_a: Tensor | None, inv_b) -> Tensor:
    """[NP, n] fp32: <a_i[:k], b_i[:k]> per prefix, normalised when the inverse norms are given."""
    a, b = a.float(), b.float()
    out = torch.stack([(a[:, :k] * b[:, :k]).sum(1) for k in dims])
    return out if inv_a is None else out * inv_a * inv_b


@dataclass
class _Block:
    """One softmax of each row, [NP, Bq] each: the value, and dV/dl = c P - u on every term,
    minus y at the positive; ``ds``: dV/ds beyond the terms' (debias's floor)."""

    value: Tensor
    c: Tensor
    u: Tensor | None
    y: Tensor
    ds: Tensor | None


def block_terms(stats: Stats, pos: Tensor, objective: Objective, scale: Tensor) -> _Block:
    """The value and gradient coefficients of one softmax per row (float64 math)."""
    lse, pos = stats.lse.double(), pos.double()
    one = torch.ones_like(lse)
    if objective.debias > 0:
        tau, n = objective.debias, stats.count.double() - 1
        pi = torch.exp(pos - lse)
        rest = -torch.expm1(pos - lse)  # the negatives' share of e^lse
        raw = (rest - n * tau * pi) / (1 - tau)
        floor = n * torch.exp(-scale.double() - lse)
        clamped = raw < floor
        z = pi + torch.maximum(raw, floor)
        c = torch.where(clamped, 0.0, 1 / (z * (1 - tau)))
        d_pos = torch.where(clamped, pi / z - 1, pi * (1 - n * tau / (1 - tau)) / z - 1)
        return _Block(lse + torch.log(z) - pos, c, None, c * pi - d_pos,
                      torch.where(clamped, -floor / z, 0.0))  # fmt: skip
    if objective.label_smoothing > 0:
        eps, k = objective.label_smoothing, stats.count.double()
        value = lse - (1 - eps) * pos - eps * stats.lsum.double() / k
        return _Block(value, one, eps / k, (1 - eps) * one, None)
    return _Block(lse - pos, one, None, one, None)


class ObjectiveEngine:
    """The passes of one objective over one batch, and the math around them."""

    def __init__(self, objective: Objective, prefixes: Prefixes, layout: Layout, runner: Runner):
        self.objective, self.prefixes, self.layout, self.runner = (
            objective, prefixes, layout, runner
        )  # fmt: skip
        dirs = objective.directions
        self.has_dq, self.has_qq, self.has_dd = (
            DOC_TO_QUERY in dirs, QUERY_TO_QUERY in dirs, DOC_TO_DOC in dirs
        )  # fmt: skip
        # doc_to_doc's positives are the first candidates: one self pass covers their pairs.
        self.dd_self = runner.self_passes and layout.default_labels

    # -- the passes -----------------------------------------------------------------------

    def passes(self, q: Tensor, d: Tensor, scale: Tensor) -> dict[str, TilePass]:
        lay, obj, dims = self.layout, self.objective, self.prefixes.dims
        n_q = q.shape[0]
        device = q.device
        positives = d[:n_q] if lay.default_labels else d[lay.labels]
        norm = self.prefixes.normalize
        inv_q = inverse_norms(q, dims) if norm else None
        inv_d = inverse_norms(d, dims) if norm else None
        inv_p = None if inv_d is None else inv_d[:, lay.labels]
        # The positives' similarities: the margin's thresholds and the columns' reference
        # logits (an O(Bq D) pass over the inputs, skipped when nothing reads it).
        wanted = (
            obj.false_negative_margin is not None or self.has_dq or self.has_qq or (self.has_dd)
        )
        xpos = prefix_dots(q, positives, dims, inv_q, inv_p) if wanted else None
        thresh = None if obj.false_negative_margin is None else xpos + obj.false_negative_margin
        pos_logits = None if xpos is None else scale.float() * xpos
        pos_ids = None if lay.ids is None else lay.ids[lay.labels]
        query_index = torch.arange(n_q, device=device) + lay.query_offset
        owners = lay.owners
        common = dict(dims=dims, counts=obj.needs_counts)

        qd_col = ColSide(d, key=lay.ids, owner=owners, inv_norm=inv_d)
        if self.has_dq:
            n_stats = lay.stat_cols
            qd_col.n_stats = n_stats
            qd_col.pos = _on_columns(pos_logits, lay.labels, n_stats, float("-inf"), "amax")
            if thresh is not None:
                qd_col.thresh = _on_columns(thresh, lay.labels, d.shape[0], float("inf"), "amax")
        out = {
            "qd": TilePass(
                RowSide(
                    q,
                    lay.labels + lay.candidate_offset,
                    pos_ids,
                    query_index if obj.needs_owners else None,
                    thresh,
                    inv_q,
                ),
                qd_col,
                hardness=obj.hardness_code,
                alpha=obj.alpha,
                **common,
            )  # fmt: skip
        }
        self_q = self.runner.self_passes
        no_target = torch.full((n_q,), -1, dtype=torch.long, device=device)
        if self.has_qq:
            out["qq"] = TilePass(
                RowSide(q, no_target, pos_ids, query_index, thresh, inv_q),
                ColSide(q, pos_ids, query_index, thresh, inv_q, n_q if self_q else 0,
                        pos_logits if self_q else None),
                own_mask=True,
                self_cols=n_q if self_q else 0,
                **common,
            )  # fmt: skip
        if self.has_dd:
            col = ColSide(d, lay.ids, owners, None, inv_d)
            if self.dd_self:
                col.n_stats, col.pos = n_q, pos_logits
                if thresh is not None:  # the positives' own thresholds, as rows
                    col.thresh = _on_columns(thresh, lay.labels, d.shape[0], float("inf"), "amax")
            out["dd"] = TilePass(
                RowSide(positives.contiguous(), no_target, pos_ids, query_index, thresh, inv_p),
                col,
                own_mask=True,
                self_cols=n_q if self.dd_self else 0,
                **common,
            )  # fmt: skip
        return out

    # -- forward ----------------------------------------------------------------------------

    def directions(self, stats: dict[str, PassStats]) -> list[Stats]:
        """Each direction's statistics per query row, [NP, Bq], in DIRECTIONS order."""
        lay = self.layout
        out = [stats["qd"].rows]
        if self.has_qq:
            qq = stats["qq"]
            out.append(qq.rows if qq.cols is None else qq.rows.merge(qq.cols))
        if self.has_dq:
            dq = stats["qd"].cols.index_select(1, lay.labels)
            if lay.ids is not None:  # the own query's term: a duplicate id, kept out of columns
                pos = stats["qd"].pos
                dq = dq.merge(Stats(pos, torch.ones_like(pos), pos) if dq.count is not None
                              else Stats(pos))  # fmt: skip
            out.append(dq)
        if self.has_dd:
            dd = stats["dd"]
            out.append(dd.rows if dd.cols is None else dd.rows.merge(dd.cols))
        return out

    def blocks(
        self, stats: dict[str, PassStats], scale: Tensor
    ) -> tuple[list[_Block], list[Stats]]:
        """The softmaxes of each row, one (joint) or one per direction, and their statistics."""
        dirs = self.directions(stats)
        if self.objective.partition_mode == "joint":
            merged = dirs[0]
            for s in dirs[1:]:
                merged = merged.merge(s)
            dirs = [merged]
        pos = stats["qd"].pos
        return [block_terms(s, pos, self.objective, scale) for s in dirs], dirs

    def forward(self, q: Tensor, d: Tensor, scale: Tensor) -> tuple[Tensor, dict]:
        """Per-row losses [NP, Bq] fp32 and what the backward needs."""
        passes = self.passes(q, d, scale)
        stats = {name: self.runner.forward(name, tp, scale) for name, tp in passes.items()}
        blocks, dirs = self.blocks(stats, scale)
        losses = sum(b.value for b in blocks) / len(blocks)
        saved = {"lse": [s.lse for s in dirs], "blocks": blocks, "pos": stats["qd"].pos,
                 "passes": passes}  # fmt: skip
        return losses.float(), saved

    # -- backward ---------------------------------------------------------------------------

    def coefficients(self, saved: dict, weights: Tensor) -> dict[str, tuple[Coefs, Coefs | None]]:
        """Each pass's (row, column) coefficients for upstream per-row weights [NP, Bq]."""
        lay, blocks, lse = self.layout, saved["blocks"], saved["lse"]
        f = weights.double() / len(blocks)
        per = [
            Coefs(lse[b], (f * blk.c).float(), None if blk.u is None else (f * blk.u).float())
            for b, blk in enumerate(blocks)
        ]
        y = sum(f * blk.y for blk in blocks)

        def of(direction: int) -> int:  # the block holding a direction's terms
            return direction if len(blocks) > 1 else 0

        names = ["qd"] + ["qq"] * self.has_qq + ["dq"] * self.has_dq + ["dd"] * self.has_dd
        block_of = {name: of(i) for i, name in enumerate(names)}
        out = {}
        if self.has_dq:
            dq = per[block_of["dq"]]
            if lay.ids is not None:  # the own query's term, out of the columns (`directions`)
                own = dq.p.double() * torch.exp(saved["pos"].double() - dq.lse.double())
                y = y - (own if dq.u is None else own - dq.u.double())
            col = _columns_of(dq, lay.labels, lay.stat_cols, lay.default_labels)
        else:
            col = None
        qd = per[block_of["qd"]]
        out["qd"] = (Coefs(qd.lse, qd.p, qd.u, y.float()), col)
        for name in ("qq", "dd"):
            if name in block_of:
                c = per[block_of[name]]
                out[name] = (c, c if (name == "qq" and self.runner.self_passes)
                             or (name == "dd" and self.dd_self) else None)  # fmt: skip
        return out

    def backward(
        self, q: Tensor, d: Tensor, scale: Tensor, saved: dict, weights: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(d queries, d candidates, d scale) of sum_p,i weights[p, i] * loss[p, i]; the
        embedding gradients fp32."""
        lay = self.layout
        passes = saved["passes"]  # the forward's: norms, thresholds and layout are the same
        coefs = self.coefficients(saved, weights)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dd = torch.zeros(d.shape, dtype=torch.float32, device=d.device)
        dscale = torch.zeros((), dtype=torch.float64, device=q.device)
        for block in saved["blocks"]:  # debias's floor depends on the scale itself
            if block.ds is not None:
                dscale = dscale + (weights.double() / len(saved["blocks"]) * block.ds).sum()
        for name, tp in passes.items():
            rows_c, cols_c = coefs[name]
            d_rows = torch.zeros(tp.row.rows.shape, dtype=torch.float32, device=q.device)
            d_cols = torch.zeros(tp.col.cols.shape, dtype=torch.float32, device=q.device)
            row_dots, col_dots = self.runner.backward(
                name, tp, scale, rows_c, cols_c, d_rows, d_cols
            )
            dscale = dscale + row_dots.double().sum()
            self._normalisation(tp.row.rows, tp.row.inv_norm, row_dots, scale, d_rows)
            self._normalisation(tp.col.cols, tp.col.inv_norm, col_dots, scale, d_cols)
            if name == "qd":
                dq += d_rows
                dd += d_cols
            elif name == "qq":
                dq += d_rows + d_cols
            else:
                dd += d_cols
                if lay.default_labels:
                    dd[: q.shape[0]] += d_rows
                else:
                    dd.index_add_(0, lay.labels, d_rows)
        return dq, dd, dscale.float()

    def _normalisation(self, x: Tensor, inv: Tensor | None, dots: Tensor, scale, grad) -> None:
        """The gradient through each prefix's normalisation: X = a b <x, y> with a = 1 / |x[:k]|
        gives d x[:k] -= s a^2 (sum_j G_ij X_ij) x[:k]."""
        if inv is None:
            return
        for p, k in enumerate(self.prefixes.dims):
            factor = (scale * inv[p] ** 2 * dots[p])[:, None]
            grad[:, :k] -= factor * x[:, :k].float()


def _on_columns(values: Tensor, labels: Tensor, n: int, fill: float, reduce: str) -> Tensor:
    """[NP, n]: each query's value at its positive's column (``reduce`` over shared ones)."""
    out = torch.full((values.shape[0], n), fill, dtype=values.dtype, device=values.device)
    index = labels[None, :].expand_as(values)
    inside = labels < n
    if not bool(inside.all()):
        values, index = values[:, inside], index[:, inside]
    return out.scatter_reduce(1, index, values, reduce, include_self=False)


def _columns_of(rows: Coefs, labels: Tensor, n: int, default_labels: bool) -> Coefs:
    """doc_to_query's coefficients on the positives' columns: query k's row is column
    labels[k]; queries sharing a column add up around the smallest lse (each term's P then
    <= 1); a column that is no query's positive gets lse = +inf (P = 0)."""
    if default_labels:
        return Coefs(rows.lse[:, :n], rows.p[:, :n], None if rows.u is None else rows.u[:, :n])
    lse = _on_columns(rows.lse, labels, n, float("inf"), "amin")
    index = labels[None, :].expand_as(rows.lse)
    ref = lse.gather(1, index)
    p = torch.zeros_like(lse).scatter_add(1, index, rows.p * torch.exp(ref - rows.lse))
    u = None if rows.u is None else torch.zeros_like(lse).scatter_add(1, index, rows.u)
    return Coefs(lse, p, u)  # a column no query's positive: lse = inf, so its P is 0


def make_layout(
    objective: Objective,
    n_queries: int,
    n_candidates: int,
    labels: Tensor | None,
    ids: Tensor | None,
    owners: Tensor | None,
    device: torch.device,
) -> Layout:
    """One process's `Layout` from checked inputs (`inputs.check_inputs`, `check_owners`).

    Without ``owners`` and labels, candidates are laid out as sentence-transformers' columns
    (positives, then each negative column: candidate j belongs to query j mod Bq)."""
    default = labels is None
    labels = torch.arange(n_queries, device=device) if default else labels.long()
    if objective.needs_owners and owners is None:
        if not default or n_candidates % n_queries:
            raise ValueError(
                "doc_to_doc and hardness_mode need to know each candidate's query: pass "
                "candidate_owners (or no labels, with candidates laid out as [positives; "
                f"negatives_1; ...], a multiple of the {n_queries} queries; got {n_candidates})"
            )
        owners = torch.arange(n_candidates, device=device) % n_queries
    dq = DOC_TO_QUERY in objective.directions
    if dq and objective.false_negative_margin is not None and not default:
        if labels.unique().numel() != n_queries:
            raise ValueError(
                "false_negative_margin with doc_to_query needs a distinct positive per query "
                "(labels without repeats)"
            )
    stat_cols = (n_queries if default else int(labels.max()) + 1) if dq else 0
    return Layout(
        labels,
        default,
        None if ids is None else ids.long(),
        None if owners is None else owners.long(),
        stat_cols=stat_cols,
    )
