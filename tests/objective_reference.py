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
