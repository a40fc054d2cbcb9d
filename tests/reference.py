"""Float64 InfoNCE written out from the design notes, and the rounding-error model that sets the
tolerance of every comparison between the package's fp32 (or 16-bit) loss and this reference;
below it, the other float64 references the tests share: CoSENT (a loop over pairs, and the same
loss as one differentiable logsumexp), pooling and LayerNorm. The objectives beside InfoNCE
(sigmoid, distillation, GCL, Matryoshka) are in tests/objective_reference.py.

Nothing here imports the package: the reference builds the full logits in float64, with both
directions written out directly (the column direction as a column logsumexp).

The error model
---------------
Notation: u = 2^-24 (fp32 unit roundoff); u_in the rounding of the operands on the matrix
units (0 for exact fp32, 2^-11 for TF32); u_g the rounding of the softmax-gradient slab G and
of the products that read it (0 when they stay fp32); u_out the rounding of the returned
gradient (fp32: u, bf16: 2^-8, fp16: 2^-11). Sums and dot products of n terms are bounded with
the probabilistic constant of Higham & Mary ("A new approach to probabilistic rounding error
analysis", SIAM J. Sci. Comput. 2019, Thm. 3.1),

    |fl(sum) - sum| <= g(n) * sum |terms|,   g(n) = LAMBDA * sqrt(n) * u,   LAMBDA = 6,

which fails with probability below 1e-7 per sum, whatever order a kernel adds in (tiles,
splits, the interpreter's numpy).  With S_max = s * max|q| * max|d|:

* every exponent S_ij = s <q_i, d_j> is off by at most
  dS = s * (g(D) + 2 u_in) * max|q| * max|d| + C_EXP * u * S_max, where C_EXP = 6 counts the
  roundings on the way to the exponential (times s, times log2 e, the max shift, minus lse,
  and the lse's base-e / base-2 round trip);
* each row's logsumexp is then off by at most dS + g(Bd) + 2u (the sum of Bd exponentials,
  each within 1 ulp, then one log), so S_ij - lse_i is off by eps = 2 dS + g(Bd) + 2u, and
  the softmax by |dP_ij| <= eps * P_ij (first order);
* loss: |dL| <= eps + g(Bq) * mean|loss_i|;
* dq = s/Bq (P - Y) D:  ||d dq||_F <= s/Bq * (eps ||P||_F ||D||_2 + g(Bd) ||r||_2
  + u_g ||P - Y||_F ||D||_2) + (u_out + u_g) ||dq||_F, with r_i = sum_j |P - Y|_ij |d_j|;
* dd = s/Bq (P - Y)^T Q: the same with the roles of rows and columns swapped;
* ds = 1/Bq sum_ij (P - Y)_ij <q_i, d_j>: |d ds| <= 1/Bq * (eps sum_ij P_ij |<q_i, d_j>|
  + (g(D) + 2 u_in) sum_ij |P - Y|_ij |q_i| |d_j| + g(Bq Bd) sum_ij |P - Y|_ij |<q_i, d_j>|)
  + u_g |ds|.

The symmetric loss averages the two directions, so its bounds are the mean of each
direction's.  Every bound is first order; SLACK = 2 covers the second-order terms.  A real
defect (a missing term, a wrong scale, a lost mask) is of the size of the quantity itself,
orders of magnitude above these bounds: tests/loss/test_loss.py checks that too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

U32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TF32 = 2.0**-11
LAMBDA = 6.0
C_EXP = 6
SLACK = 2.0


def gamma(n: int) -> float:
    """Probabilistic bound on the relative rounding error of an n-term fp32 sum."""
    return LAMBDA * math.sqrt(max(n, 1)) * U32


def duplicate_mask(labels: Tensor, ids: Tensor | None, n_candidates: int) -> Tensor | None:
    """[Bq, Bd] True where candidate j shares the id of row i's positive (and j != labels[i])."""
    if ids is None:
        return None
    dup = ids[None, :] == ids[labels][:, None]
    dup[torch.arange(len(labels)), labels] = False
    return dup


def direction_logits(q: Tensor, d: Tensor, scale: Tensor, labels: Tensor, ids: Tensor | None):
    """(masked row logits [Bq, Bd], positive logits [Bq], raw dot products [Bq, Bd]) in float64."""
    dots = q.double() @ d.double().T
    logits = scale.double() * dots
    positive = logits[torch.arange(len(labels)), labels]
    dup = duplicate_mask(labels, ids, d.shape[0])
    if dup is not None:
        logits = logits.masked_fill(dup, float("-inf"))
    return logits, positive, dots


def reference_row_losses(q, d, scale, labels, ids=None, symmetric=False):
    """Per-query InfoNCE losses [Bq] in float64 (with ``symmetric``, the mean of the row loss and
    the positive's column loss), as design notes section 2 defines them."""
    logits, positive, _ = direction_logits(q, d, scale, labels, ids)
    forward = torch.logsumexp(logits, 1) - positive
    if not symmetric:
        return forward
    # Column direction: positive i's column over all queries k, [k, i] = S_k,labels[i].
    columns = scale.double() * q.double() @ d.double()[labels].T
    if ids is not None:
        pos_ids = ids[labels]
        dup = pos_ids[:, None] == pos_ids[None, :]
        dup[torch.arange(len(labels)), torch.arange(len(labels))] = False
        columns = columns.masked_fill(dup, float("-inf"))
    reverse = torch.logsumexp(columns, 0) - positive
    return (forward + reverse) / 2


def reference_loss(q, d, scale, labels, ids=None, symmetric=False) -> Tensor:
    return reference_row_losses(q, d, scale, labels, ids, symmetric).mean()


@dataclass
class Bounds:
    """Absolute error bounds (Frobenius norm for gradients) per quantity."""

    loss: float
    dq: float
    dd: float
    dscale: float

    def __add__(self, other: Bounds) -> Bounds:
        return Bounds(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))

    def scaled(self, factor: float) -> Bounds:
        return Bounds(*(factor * v for v in vars(self).values()))


def _direction_bounds(q, d, scale, labels, ids, *, u_in, u_g, u_out) -> Bounds:
    """Bounds for one direction: rows q against candidates d (float64 inputs)."""
    n_q, dim = q.shape
    n_d = d.shape[0]
    s = float(scale)
    logits, positive, dots = direction_logits(q, d, torch.tensor(s), labels, ids)
    lse = torch.logsumexp(logits, 1, keepdim=True)
    p = torch.exp(logits - lse)
    y = torch.zeros_like(p)
    y[torch.arange(n_q), labels] = 1.0
    pmy = (p - y).abs()
    q_norm, d_norm = q.norm(dim=1), d.norm(dim=1)
    s_max = s * float(q_norm.max() * d_norm.max())
    d_s = s * (gamma(dim) + 2 * u_in) * float(q_norm.max() * d_norm.max()) + C_EXP * U32 * s_max
    eps = 2 * d_s + gamma(n_d) + 2 * U32
    row_loss = (torch.logsumexp(logits, 1) - positive).abs()
    p_f = float(p.norm())
    pmy_f = float(pmy.norm())
    q_2, d_2 = float(torch.linalg.matrix_norm(q, 2)), float(torch.linalg.matrix_norm(d, 2))
    dq = s / n_q * (p - y) @ d
    dd = s / n_q * (p - y).T @ q
    r_rows = (pmy * d_norm[None, :]).sum(1)
    r_cols = (pmy * q_norm[:, None]).sum(0)
    ds = float(((p - y) * dots).sum()) / n_q
    return Bounds(
        loss=eps + gamma(n_q) * float(row_loss.mean()),
        dq=s / n_q * (eps * p_f * d_2 + gamma(n_d) * float(r_rows.norm()) + u_g * pmy_f * d_2)
        + (u_out + u_g) * float(dq.norm()),
        dd=s / n_q * (eps * p_f * q_2 + gamma(n_q) * float(r_cols.norm()) + u_g * pmy_f * q_2)
        + (u_out + u_g) * float(dd.norm()),
        dscale=(
            eps * float((p * dots.abs()).sum())
            + (gamma(dim) + 2 * u_in) * float((pmy * q_norm[:, None] * d_norm[None, :]).sum())
            + gamma(n_q * n_d) * float((pmy * dots.abs()).sum())
        )
        / n_q
        + u_g * abs(ds),
    )


def error_bounds(
    q: Tensor,
    d: Tensor,
    scale: float,
    labels: Tensor,
    ids: Tensor | None = None,
    symmetric: bool = False,
    *,
    tf32: bool = False,
    gradient_slab_dtype: torch.dtype | None = None,
) -> Bounds:
    """What the model above allows between an implementation and the float64 reference on these
    (already rounded) inputs. ``gradient_slab_dtype``: the dtype of the Triton backward's G."""
    u = dict(
        u_in=TF32 if tf32 else 0.0,
        u_g=UNIT_ROUNDOFF[gradient_slab_dtype]
        if gradient_slab_dtype in (torch.bfloat16, torch.float16)
        else 0.0,
        u_out=UNIT_ROUNDOFF.get(q.dtype, U32),  # gradients come back in the input dtype
    )
    q, d = q.detach().double().cpu(), d.detach().double().cpu()
    labels = labels.cpu()
    ids = None if ids is None else ids.cpu()
    bounds = _direction_bounds(q, d, scale, labels, ids, **u)
    if symmetric:
        # Positive i against every query k; its own query is the target, and queries whose
        # positive shares positive i's id are masked (the reverse roles of the same tiles).
        pos_ids = None if ids is None else ids[labels]
        rows = torch.arange(len(labels))
        reverse = _direction_bounds(d[labels], q, scale, rows, pos_ids, **u)
        # d[labels] gathers: the reverse direction's candidate gradient lands on the queries and
        # its row gradient on the positives, so dq and dd swap.
        reverse = Bounds(reverse.loss, reverse.dd, reverse.dq, reverse.dscale)
        bounds = (bounds + reverse).scaled(0.5)
    return bounds.scaled(SLACK)


def reference_cosent(first, second, scores, scale):
    """log(1 + sum over pairs (i, j) with y_i > y_j of exp(s (cos_j - cos_i))), in float64."""
    first, second = first.double(), second.double()
    cosine = [float(torch.dot(a, b) / (a.norm() * b.norm())) for a, b in zip(first, second)]
    total = 1.0
    for i, yi in enumerate(scores.tolist()):
        for j, yj in enumerate(scores.tolist()):
            if yi > yj:
                total += math.exp(scale * (cosine[j] - cosine[i]))
    return math.log(total)


def reference_cosent_graph(first, second, scores, scale) -> Tensor:
    """The loss of :func:`reference_cosent` as one float64 logsumexp over 0 and every
    s (cos_j - cos_i) with y_i > y_j: a graph to differentiate (the loop gives a number)."""
    cos = F.cosine_similarity(first.double(), second.double())
    diff = scale * (cos[None, :] - cos[:, None])
    diff = diff.masked_fill(~(scores[:, None] > scores[None, :]), float("-inf"))
    return torch.logsumexp(torch.cat([torch.zeros(1, dtype=torch.float64), diff.flatten()]), 0)


def reference_pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Pooling written as a float64 loop over rows: the first ("cls") or last ("last") real
    token, or the mean of the real tokens, whichever side the padding is on."""
    out = []
    for h, m in zip(hidden.astype(np.float64), mask.astype(bool), strict=True):
        real = np.flatnonzero(m)
        if mode == "cls":
            out.append(h[real[0]])
        elif mode == "last":
            out.append(h[real[-1]])
        else:
            out.append(h[real].mean(axis=0))
    return np.stack(out)


def reference_layer_norm(x, w, b, dy, eps):
    """y and the gradients of x, w, b (None where absent) from PyTorch's LayerNorm in float64."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
    y = F.layer_norm(leaves[0], leaves[0].shape[-1:], leaves[1], leaves[2], eps)
    y.backward(dy.double())
    return y, [None if t is None else t.grad for t in leaves]
