"""Float64 references for the objectives beside InfoNCE (sigmoid, distillation, FastCLIP's
global contrastive loss, Matryoshka), written from their papers' formulas, and the rounding
error model that sets the tolerance of the sigmoid loss's comparisons.

Like tests/reference.py, nothing here imports the package, and it uses that module's notation
(u, u_in, u_g, u_out, g(n) = LAMBDA sqrt(n) u).

The sigmoid loss's error model
------------------------------
x_ij = t <q_i, d_j> + b is off by dx_ij = t (g(D) + 2 u_in) |q_i| |d_j| + 3u (|t <q_i, d_j>| +
|b|) (the dot product, then one product and one sum). Each term softplus(v), v = -z x, moves by
at most sigmoid(v) dx and is rounded by C_EXP u (softplus + 1) (the exponential, the log and the
max); a row sums Bd terms (g(Bd) times their sum) and the loss averages Bq rows (g(Bq) times the
mean). The gradient G = sigmoid(x) - Y moves by sigmoid(x)(1 - sigmoid(x)) dx + C_EXP u
sigmoid(x), and with E that per-entry bound,

* dq = t/Bq G D: ||d dq||_F <= t/Bq (||E||_F ||D||_2 + g(Bd) ||r||_2 + u_g ||G||_F ||D||_2)
  + (u_out + u_g) ||dq||_F, r_i = sum_j |G_ij| |d_j|;
* dd the same with rows and columns swapped;
* dt = 1/Bq sum G_ij <q_i, d_j>: 1/Bq (sum E |<q, d>| + (g(D) + 2 u_in) sum |G| |q| |d| +
  g(Bq Bd) sum |G <q, d>|) + u_g |dt|;
* db = 1/Bq sum G_ij: 1/Bq (sum E + (g(Bq Bd) + u_g) sum |G|).

Every bound is first order; SLACK = 2 covers the rest, as for InfoNCE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from reference import C_EXP, SLACK, TF32, U32, UNIT_ROUNDOFF, Bounds, duplicate_mask, gamma
from torch import Tensor


def _targets(labels: Tensor, n_candidates: int) -> Tensor:
    y = torch.zeros(len(labels), n_candidates, dtype=torch.float64)
    y[torch.arange(len(labels)), labels] = 1.0
    return y


def reference_sigmoid(q: Tensor, d: Tensor, t: Tensor, b: Tensor, labels: Tensor, ids=None):
    """-1/Bq sum_ij log sigmoid(z_ij (t <q_i, d_j> + b)) in float64; pairs that duplicate the
    row's positive (not the positive itself) are left out."""
    x = t.double() * (q.double() @ d.double().T) + b.double()
    z = 2 * _targets(labels, d.shape[0]) - 1
    terms = -F.logsigmoid(z * x)
    dup = duplicate_mask(labels, ids, d.shape[0])
    if dup is not None:
        terms = terms.masked_fill(dup, 0.0)
    return terms.sum(1).mean()


def sigmoid_bounds(q, d, t: float, b: float, labels, ids=None, *, u_in=0.0, u_g=0.0, u_out=U32):
    """The error model above on these (rounded) inputs, in float64, times SLACK."""
    q, d = q.detach().double(), d.detach().double()
    n_q, dim = q.shape
    n_d = d.shape[0]
    dots = q @ d.T
    x = t * dots + b
    y = _targets(labels, n_d)
    keep = torch.ones_like(x)
    dup = duplicate_mask(labels, ids, n_d)
    if dup is not None:
        keep = keep.masked_fill(dup, 0.0)
    q_norm, d_norm = q.norm(dim=1), d.norm(dim=1)
    dx = t * (gamma(dim) + 2 * u_in) * q_norm[:, None] * d_norm[None, :]
    dx = dx + 3 * U32 * ((t * dots).abs() + abs(b))
    v = x * (1 - 2 * y)
    terms = F.softplus(v) * keep
    loss = terms.sum(1).mean()
    loss_bound = float(
        ((torch.sigmoid(v) * dx + C_EXP * U32 * (terms + 1)) * keep).sum() / n_q
        + gamma(n_d) * terms.sum(1).mean()
        + gamma(n_q) * loss
    )
    p = torch.sigmoid(x)
    g = (p - y) * keep
    e = (p * (1 - p) * dx + C_EXP * U32 * p) * keep
    q_2, d_2 = float(torch.linalg.matrix_norm(q, 2)), float(torch.linalg.matrix_norm(d, 2))
    dq, dd = t / n_q * g @ d, t / n_q * g.T @ q
    r_rows = (g.abs() * d_norm[None, :]).sum(1)
    r_cols = (g.abs() * q_norm[:, None]).sum(0)
    dt = float((g * dots).sum()) / n_q
    bounds = Bounds(
        loss=loss_bound,
        dq=t / n_q * (float(e.norm()) * d_2 + gamma(n_d) * float(r_rows.norm())
                      + u_g * float(g.norm()) * d_2) + (u_out + u_g) * float(dq.norm()),
        dd=t / n_q * (float(e.norm()) * q_2 + gamma(n_q) * float(r_cols.norm())
                      + u_g * float(g.norm()) * q_2) + (u_out + u_g) * float(dd.norm()),
        dscale=float((e * dots.abs()).sum() + (gamma(dim) + 2 * u_in)
                     * (g.abs() * q_norm[:, None] * d_norm[None, :]).sum()
                     + gamma(n_q * n_d) * (g * dots).abs().sum()) / n_q + u_g * abs(dt),
    )  # fmt: skip
    bias_bound = float((e.sum() + (gamma(n_q * n_d) + u_g) * g.abs().sum()) / n_q)
    return bounds.scaled(SLACK), SLACK * bias_bound


def precision(dtype: torch.dtype, impl: str, device: str = "cpu") -> dict[str, float]:
    """u_in, u_g, u_out of an implementation (see tests/reference.py)."""
    sixteen = dtype in (torch.bfloat16, torch.float16)
    return dict(
        u_in=TF32 if impl == "triton" and device != "cpu" and dtype == torch.float32 else 0.0,
        u_g=UNIT_ROUNDOFF[dtype] if impl == "triton" and sixteen else 0.0,
        u_out=UNIT_ROUNDOFF.get(dtype, U32),
    )


def reference_distillation(q, docs, teacher, scale, teacher_temperature):
    """1/Bq sum_i KL(softmax(teacher_i / T_t) || softmax(s <q_i, group_i>)) in float64, the
    group of query i being documents i, Bq + i, 2 Bq + i, ... (positives first)."""
    n_q, width = teacher.shape
    groups = docs.double().reshape(width, n_q, -1).transpose(0, 1)
    student = scale.double() * torch.einsum("qd,qkd->qk", q.double(), groups)
    p_t = torch.softmax(teacher.double() / teacher_temperature, -1)
    return (p_t * (p_t.log() - torch.log_softmax(student, -1))).sum(-1).mean()


def reference_gcl_step(q, d, scale, u_query, u_document, indices, gamma_, symmetric, ids=None):
    """One FCCO step in float64: (InfoNCE value, surrogate whose gradient is the step's, new u
    of both directions). Row losses l_i = lse_i - S_ii (positives first: d[i] for query i),
    g = e^l, u <- (1 - gamma) u + gamma g (u = g for an unseen example, u == 0), and the
    surrogate 1/(dirs N) sum_i (g_i / u_i) l_i with the weights held fixed."""
    from reference import reference_row_losses

    n = q.shape[0]
    rows = torch.arange(n)
    losses = [reference_row_losses(q, d, scale, rows, ids)]
    if symmetric:
        pos_ids = None if ids is None else ids[:n]
        losses.append(reference_row_losses(d[:n], q, scale, rows, pos_ids))
    new_u, surrogate = [], 0.0
    for u, loss in zip((u_query, u_document), losses):
        g = loss.detach().exp()
        old = u.double()[indices]
        fresh = torch.where(old > 0, (1 - gamma_) * old + gamma_ * g, g)
        updated = u.double().clone()
        updated[indices] = fresh
        new_u.append(updated)
        surrogate = surrogate + ((g / fresh) * loss).sum()
    if not symmetric:
        new_u.append(u_document.double())  # one direction: the other state stays
    value = sum(loss.mean() for loss in losses) / len(losses)
    return value, surrogate / (n * len(losses)), new_u


def truncated(x: Tensor, k: int, normalize: bool = True) -> Tensor:
    """The first k dimensions of each row, re-normalised, in float64."""
    x = x.double()[:, :k]
    return F.normalize(x, dim=-1) if normalize else x


def distillation_bounds(q, docs, teacher, scale: float, teacher_temperature: float) -> Bounds:
    """The error model of the distillation loss on these inputs, times SLACK: each student
    logit S = s <q_i, d_ik> is off by dS = s g(D) |q| |d| + C_EXP u |S| (as InfoNCE's), so
    log softmax(S) by eps_i = 2 max_k dS_ik + g(k) + 2u, and the teacher's log softmax (in
    fp32) by eps_t = 2 C_EXP u max_k |t_ik / T| + g(k) + 2u. With G = p_s - p_t (dKL/dS) off by
    E = eps p_s + eps_t p_t per entry, the gradients' bounds follow as for InfoNCE."""
    q, docs = q.detach().double(), docs.detach().double()
    n_q, width = teacher.shape
    groups = docs.reshape(width, n_q, -1).transpose(0, 1)  # [Bq, k, D]
    dots = torch.einsum("qd,qkd->qk", q, groups)
    logits = scale * dots
    q_norm, g_norm = q.norm(dim=1), groups.norm(dim=2)
    d_s = scale * gamma(q.shape[1]) * q_norm[:, None] * g_norm + C_EXP * U32 * logits.abs()
    eps = 2 * d_s.amax(1) + gamma(width) + 2 * U32
    t = teacher.double() / teacher_temperature
    eps_t = 2 * C_EXP * U32 * t.abs().amax(1) + gamma(width) + 2 * U32
    p_s, p_t = torch.softmax(logits, -1), torch.softmax(t, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(logits, -1))).sum(-1)
    g = p_s - p_t
    e = eps[:, None] * p_s + eps_t[:, None] * p_t
    dq = scale / n_q * torch.einsum("qk,qkd->qd", g, groups)
    dd = scale / n_q * (g[:, :, None] * q[:, None, :])
    rounding = gamma(width) + U32  # the k-term sums and the returned fp32 gradient
    return Bounds(
        loss=float((eps + eps_t).mean() + gamma(n_q) * kl.mean() + C_EXP * U32 * kl.abs().mean()),
        dq=scale / n_q * float((e[:, :, None] * groups.abs()).sum(1).norm())
        + rounding * float(dq.norm()),
        dd=scale / n_q * float((e[:, :, None] * q.abs()[:, None, :]).norm())
        + rounding * float(dd.norm()),
        dscale=float((e * dots.abs()).sum() + gamma(q.shape[1]) * (g.abs() * q_norm[:, None]
                     * g_norm).sum() + gamma(n_q * width) * (g * dots).abs().sum()) / n_q,
    ).scaled(SLACK)  # fmt: skip


# -- InfoNCE's options (docs/objectives.md, "Loss options") --------------------------------------
#
# The reference builds every direction's logits in float64, as sentence-transformers'
# MultipleNegativesRankingLoss does, plus this package's masks (candidate ids, the false-negative
# margin) and the loss forms (label smoothing, debias).
#
# Its error model: every kept logit l_e = s_e X_e (s_e = s, or s + alpha for a hardness-weighted
# negative) is off by at most dS_e = s_e (g(k) + 2 u_in [+ 2 g(k) + 6 u when the prefix is
# normalised: its norms]) |x| |y| + C_EXP u |l_e|, and each row's logsumexp by g(K) + 2u more,
# which moves the row's terms as a uniform shift of that size would. To first order each
# gradient entry G_e = dL/dl_e (exact, from the float64 row loss) then moves by at most
# (|H| dS)_e, H the row loss's exact Hessian in its logits (torch.func): the same bound for
# every option, without a formula per option. The loss moves by sum |G| dS (+ the g(K) of
# label smoothing's mean logit), and the gradients of the embeddings follow as for InfoNCE:
# per block of terms, s (||E||_F ||V||_2 + g(n) ||r||_2 + u_g ||G||_F ||V||_2), E the entries'
# bounds; prefix normalisation multiplies by 1 / |x[:k]| and adds its own correction's error.


@dataclass(frozen=True)
class Options:
    """The options under test, in this package's argument names (``kwargs()``)."""

    directions: tuple = ("query_to_doc",)
    partition_mode: str = "joint"
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    margin: float | None = None
    debias: float = 0.0
    label_smoothing: float = 0.0
    dims: tuple | None = None
    weights: tuple | None = None
    normalize: bool = True

    def kwargs(self) -> dict:
        out = dict(directions=self.directions, partition_mode=self.partition_mode,
                   hardness_mode=self.hardness_mode, hardness_strength=self.hardness_strength,
                   false_negative_margin=self.margin, debias=self.debias,
                   label_smoothing=self.label_smoothing)  # fmt: skip
        if self.dims is not None:
            out.update(matryoshka_dims=list(self.dims), matryoshka_normalize=self.normalize)
            if self.weights is not None:
                out["matryoshka_weights"] = list(self.weights)
        return out

    def prefixes(self, dim: int) -> list[tuple[int, float, bool]]:
        """(size, weight, normalised) of each prefix the loss sums."""
        if self.dims is None:
            return [(dim, 1.0, False)]
        weights = self.weights or (1.0,) * len(self.dims)
        return [(k, float(w), self.normalize) for k, w in zip(self.dims, weights)]


@dataclass
class TermBlock:
    """One direction's terms: rows are query rows (the query, or its positive), columns the
    other side; ``row_side`` / ``col_side`` name which embedding ("q", "p", "d") each is."""

    name: str
    x: Tensor  # [Bq, n] similarities
    logits: Tensor  # [Bq, n], dropped terms at -inf
    slope: Tensor  # [Bq, n] dl/dX of the value (s, or s + alpha where hardness adds)
    row_side: str
    col_side: str


def option_terms(q, d, scale, labels, ids, owners, opts: Options, k: int, normalize: bool):
    """({direction: TermBlock}, positive logits [Bq], the prefix vectors {"q", "p", "d"}) in
    float64, on the first k dimensions. The masks:

    * query_to_doc  candidate_ids duplicates of the positive; hardness adds alpha * sg(X) to
      the negatives of the mode's class;
    * query_to_query  k != i, and not queries whose positives share an id;
    * doc_to_query  not queries k != i whose positives share p_i's id;
    * doc_to_doc  not query i's own candidates, nor duplicates of p_i;
    * false_negative_margin: every term with X > X_pos + margin, except labelled pairs (a
      query with its own positive)."""
    n_q, dev = q.shape[0], q.device  # any device: the GPU check runs it at 16k
    vecs = {"q": q.double()[:, :k], "d": d.double()[:, :k]}
    if normalize:
        vecs = {name: F.normalize(v, dim=-1) for name, v in vecs.items()}
    labels = labels.to(dev).long()
    vecs["p"] = vecs["d"][labels]
    s = (
        scale.double()
        if isinstance(scale, Tensor)
        else torch.tensor(float(scale), device=dev).double()
    )
    rows = torch.arange(n_q, device=dev)
    owners = torch.arange(d.shape[0], device=dev) % n_q if owners is None else owners.to(dev).long()
    sides = {
        "query_to_doc": ("q", "d"),
        "query_to_query": ("q", "q"),
        "doc_to_query": ("p", "q"),
        "doc_to_doc": ("p", "d"),
    }
    xpos = (vecs["q"] * vecs["p"]).sum(1)
    pos_ids = None if ids is None else ids.to(dev)[labels]
    blocks = {}
    for name in opts.directions:  # only the blocks asked for (the GPU check runs 16k x 32k)
        x = vecs[sides[name][0]] @ vecs[sides[name][1]].T
        labelled, drop = _labelled_and_dropped(name, labels, ids, pos_ids, owners, x.shape)
        slope = s * torch.ones_like(x)
        logits = s * x
        if name == "query_to_doc" and opts.hardness_mode is not None and opts.hardness_strength:
            own = owners[None, :] == rows[:, None]
            penalised = {
                "in_batch_negatives": ~own,
                "hard_negatives": own & ~labelled,
                "all_negatives": ~labelled,
            }[opts.hardness_mode]
            alpha = opts.hardness_strength * penalised
            logits = logits + alpha * x.detach()  # sg(X): no gradient through it
            slope = slope + alpha
        if opts.margin is not None:
            drop = drop | ((x > xpos[:, None] + opts.margin) & ~labelled)
        blocks[name] = TermBlock(name, x, logits.masked_fill(drop, float("-inf")), slope,
                                 *sides[name])  # fmt: skip
    return blocks, s * xpos, vecs


def _labelled_and_dropped(name, labels, ids, pos_ids, owners, shape) -> tuple[Tensor, Tensor]:
    """A direction's labelled pairs (a query with its own positive: never dropped by the
    margin) and the terms its masks drop, [Bq, n] each."""
    dev = labels.device
    rows = torch.arange(shape[0], device=dev)
    cols = torch.arange(shape[1], device=dev)
    none = torch.zeros(shape, dtype=torch.bool, device=dev)
    if name == "query_to_doc":
        labelled = cols[None, :] == labels[:, None]
        dropped = none if ids is None else (ids.to(dev)[None, :] == pos_ids[:, None]) & ~labelled
    elif name == "query_to_query":
        labelled = none
        dropped = rows[:, None] == cols[None, :]
        if ids is not None:
            dropped = dropped | (pos_ids[None, :] == pos_ids[:, None])
    elif name == "doc_to_query":
        labelled = labels[None, :] == labels[:, None]  # p_i is query k's positive
        dropped = none
        if ids is not None:
            dropped = (pos_ids[None, :] == pos_ids[:, None]) & (rows[:, None] != cols[None, :])
    else:  # doc_to_doc
        labelled = none
        dropped = owners[None, :] == rows[:, None]
        if ids is not None:
            dropped = dropped | (ids.to(dev)[None, :] == pos_ids[:, None])
    return labelled, dropped


def _block_value(logits: Tensor, pos: Tensor, opts: Options, scale) -> Tensor:
    """One softmax per row (over the last dimension): plain, label-smoothed (cross-entropy's
    convention over the kept terms) or debiased (Chuang et al. 2020 with M = 1, N the kept terms
    but the positive, its floor N e^-s)."""
    lse = torch.logsumexp(logits, -1)
    kept = torch.isfinite(logits)
    if opts.label_smoothing > 0:
        eps = opts.label_smoothing
        mean = torch.where(kept, logits, 0.0).sum(-1) / kept.sum(-1)
        return lse - (1 - eps) * pos - eps * mean
    if opts.debias > 0:
        n, tau = kept.sum(-1) - 1, opts.debias
        pi = torch.exp(pos - lse)  # relative to e^lse: no overflow
        estimate = (1 - pi - n * tau * pi) / (1 - tau)
        floor = n * torch.exp(-scale - lse)
        return lse + torch.log(pi + torch.maximum(estimate, floor)) - pos
    return lse - pos


def _row_value(logits: Tensor, pos: Tensor, sizes: list[int], opts: Options, scale) -> Tensor:
    """A row's loss from its terms laid out block after block (``sizes``)."""
    if opts.partition_mode == "joint":
        return _block_value(logits, pos, opts, scale)
    parts = torch.split(logits, sizes, dim=-1)
    return sum(_block_value(part, pos, opts, scale) for part in parts) / len(parts)


def reference_option_rows(q, d, scale, labels, ids=None, owners=None, opts=Options()) -> Tensor:
    """Per-row losses [NP, Bq] float64, one row per prefix (in ``opts.dims`` order)."""
    out = []
    for k, _, normalize in opts.prefixes(q.shape[1]):
        blocks, pos, _ = option_terms(q, d, scale, labels, ids, owners, opts, k, normalize)
        logits = torch.cat([b.logits for b in blocks.values()], 1)
        sizes = [b.logits.shape[1] for b in blocks.values()]
        out.append(_row_value(logits, pos, sizes, opts, scale))
    return torch.stack(out)


def reference_option_loss(q, d, scale, labels, ids=None, owners=None, opts=Options()) -> Tensor:
    rows = reference_option_rows(q, d, scale, labels, ids, owners, opts)
    weights = [w for _, w, _ in opts.prefixes(q.shape[1])]
    return (rows.mean(1) * torch.tensor(weights, dtype=torch.float64, device=rows.device)).sum()


def _row_derivatives(blocks, pos, opts, scale) -> tuple[Tensor, Tensor]:
    """Each row's exact gradient [Bq, K] and Hessian [Bq, K, K] in its K logits (dropped ones
    included, with zero derivatives)."""
    from torch.func import grad, hessian, vmap

    logits = torch.cat([b.logits for b in blocks.values()], 1).detach()
    sizes = [b.logits.shape[1] for b in blocks.values()]
    keep = torch.isfinite(logits)
    finite = torch.where(keep, logits, 0.0)
    at_pos = (finite == pos.detach()[:, None]) & keep  # the positive: query_to_doc's label
    first = at_pos.int().argmax(1)
    onehot = torch.zeros_like(keep).scatter_(1, first[:, None], True)
    s = scale.detach() if isinstance(scale, Tensor) else scale

    def value(row: Tensor, kept: Tensor, one: Tensor) -> Tensor:
        p = torch.where(one, row, 0.0).sum()
        return _row_value(torch.where(kept, row, float("-inf")), p, sizes, opts, s)

    return vmap(grad(value))(finite, keep, onehot), vmap(hessian(value))(finite, keep, onehot)


def option_bounds(q, d, scale: float, labels, ids=None, owners=None, opts=Options(), *,
                  u_in=0.0, u_g=0.0, u_out=U32) -> Bounds:  # fmt: skip
    """The error model above on these (rounded) inputs, in float64, times SLACK."""
    q, d = q.detach().double().cpu(), d.detach().double().cpu()
    labels = labels.cpu().long()
    n_q = q.shape[0]
    total = Bounds(0.0, 0.0, 0.0, 0.0)
    for k, weight, normalize in opts.prefixes(q.shape[1]):
        blocks, pos, vecs = option_terms(q, d, scale, labels, ids, owners, opts, k, normalize)
        g, h = _row_derivatives(blocks, pos, opts, scale)
        g, h = g * weight / n_q, h * weight / n_q
        dot_err = gamma(k) + 2 * u_in + ((2 * gamma(k) + 6 * U32) if normalize else 0.0)
        d_s = torch.cat([
            b.slope * dot_err * vecs[b.row_side].norm(dim=1)[:, None]
            * vecs[b.col_side].norm(dim=1)[None, :] + C_EXP * U32 * (b.slope * b.x).abs()
            for b in blocks.values()
        ], 1)  # fmt: skip
        kept = torch.cat([torch.isfinite(b.logits) for b in blocks.values()], 1)
        lse_err = gamma(int(kept.sum(1).max())) + 2 * U32
        shift = torch.where(kept, d_s + lse_err, 0.0)
        e = (h.abs() @ shift[:, :, None]).squeeze(2)  # |dG| per entry, first order
        loss = float((g.abs() * shift).sum())
        if opts.label_smoothing:  # the mean logit's sum of K terms
            logits = torch.cat([b.logits for b in blocks.values()], 1)
            loss += opts.label_smoothing * weight / n_q * float(
                (gamma(int(kept.sum(1).max())) * torch.where(kept, logits, 0.0).abs().sum(1)
                 / kept.sum(1)).sum())  # fmt: skip
        rows_value = reference_option_rows(q, d, scale, labels, ids, owners, opts)
        loss += gamma(n_q) * weight * float(rows_value.abs().mean())
        raw_norms = {"q": q[:, :k].norm(dim=1), "p": d[labels, :k].norm(dim=1),
                     "d": d[:, :k].norm(dim=1)}  # fmt: skip
        total = total + _gradient_bounds(blocks, g, e, d_s, vecs, raw_norms, labels, d.shape[0],
                                         normalize, float(scale), loss, u_g, u_out)  # fmt: skip
    return total.scaled(SLACK)


def _gradient_bounds(blocks, g, e, d_s, vecs, raw_norms, labels, n_d, normalize, s, loss, u_g,
                     u_out):  # fmt: skip
    """The embeddings' and the scale's bounds of one prefix from its entries' G and bounds E;
    ``raw_norms``: the prefix norms before normalisation."""
    n_q = labels.shape[0]
    err = {"q": torch.zeros(n_q), "p": torch.zeros(n_q), "d": torch.zeros(n_d)}  # per row
    dots = {name: torch.zeros_like(t) for name, t in err.items()}
    grads = {"q": torch.zeros_like(vecs["q"]), "p": torch.zeros_like(vecs["p"]),
             "d": torch.zeros_like(vecs["d"])}  # fmt: skip
    dscale, start = 0.0, 0
    for b in blocks.values():
        n = b.x.shape[1]
        gb, eb = g[:, start : start + n], e[:, start : start + n]
        dx = d_s[:, start : start + n] / b.slope
        start += n
        for side, other, gm, em in ((b.row_side, b.col_side, gb, eb),
                                    (b.col_side, b.row_side, gb.T, eb.T)):  # fmt: skip
            v = vecs[other]
            v2 = float(torch.linalg.matrix_norm(v, 2))
            r = (gm.abs() * v.norm(dim=1)[None, :]).sum(1)
            err[side] += s * (em.norm(dim=1) * v2 + gamma(gm.shape[1]) * r
                              + u_g * gm.norm(dim=1) * v2)  # fmt: skip
            grads[side] += s * gm @ v
            xm = b.x if gm is gb else b.x.T
            dxm = dx if gm is gb else dx.T
            dots[side] += (em * xm.abs() + gm.abs() * dxm).sum(1) + gamma(gm.shape[1]) * (
                gm * xm).abs().sum(1)  # fmt: skip
        gx = gb * b.x
        dscale += float((eb * b.x.abs() + gb.abs() * dx).sum()
                        + gamma(gb.numel()) * gx.abs().sum() + u_g * gx.sum().abs())  # fmt: skip
    out = {}
    for side in ("q", "p", "d"):
        bound = err[side]
        if normalize:  # a (the main term + the normalisation's correction s a (sum G X) x_hat)
            bound = (bound + s * dots[side]) / raw_norms[side].clamp_min(1e-12)
        out[side] = bound
    # Positives' rows land on their candidates (labels may repeat: add their squares).
    d_err = out["d"] ** 2
    d_err = d_err.index_add(0, labels, out["p"] ** 2)
    d_grad = grads["d"].index_add(0, labels, grads["p"])
    return Bounds(
        loss=loss,
        dq=float(out["q"].norm()) + (u_out + u_g) * float(grads["q"].norm()),
        dd=float(d_err.sum().sqrt()) + (u_out + u_g) * float(d_grad.norm()),
        dscale=dscale,
    )
