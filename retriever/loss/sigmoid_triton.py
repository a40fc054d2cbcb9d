"""Fused Triton kernels for the tiled sigmoid loss: the GPU backend of `sigmoid_loss`.

The block contract of `sigmoid_tiles` (read it for the math), on the machinery of
`triton_tiles`: the same tile dot product, column splits, tile shapes and backward slabs.

Forward, `_sigmoid_row_kernel`: one program owns BLOCK_M rows and one slice of the columns and
sums softplus(-z x) over its tiles, x = t <q_i, c_j> + b, in fp32. No running max is needed:
softplus is evaluated stably as max(y, 0) + log(1 + exp(-|y|)), and column splits simply add.

Backward, `_sigmoid_grad_kernel`: writes the slab G = (sigmoid(x) - Y) w / max|w| in the input
dtype; `triton_tiles.slab_backward` turns it into dq, dc (two GEMMs per slab), dt = sum G dot
and db = sum G.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from retriever.loss.tile_configs import tile_config
from retriever.loss.triton_mode import interpreting
from retriever.loss.triton_tiles import (
    column_splits,
    in_addressable_pieces,
    slab_backward,
    tile_dot,
)

EMPTY_ROW = 0.0  # a row's sum before any block
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


def merge_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row sums of two column blocks: they add."""
    return a + b


@triton.jit
def _pair_logits(q_ptr, c_ptr, params_ptr, labels_ptr, row_ids_ptr, col_ids_ptr, rows, cols,
                 row_ok, col_ok, dim, stride_q, stride_c, HAS_IDS: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
    """(x = t dot + b, the positive's indicator Y, the pairs that count) of one tile.
    Padding and duplicates of a row's positive do not count."""
    dot = tile_dot(q_ptr, c_ptr, rows, cols, row_ok, col_ok, dim, stride_q, stride_c,
                   UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    x = dot * tl.load(params_ptr) + tl.load(params_ptr + 1)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    is_pos = cols[None, :] == labels[:, None]
    counts = row_ok[:, None] & col_ok[None, :]
    if HAS_IDS:
        row_ids = tl.load(row_ids_ptr + rows, mask=row_ok, other=0)
        col_ids = tl.load(col_ids_ptr + cols, mask=col_ok, other=0)
        counts = counts & ~((col_ids[None, :] == row_ids[:, None]) & ~is_pos)
    return x, tl.where(is_pos, 1.0, 0.0), counts


@triton.jit
def _sigmoid_row_kernel(
    q_ptr, c_ptr, params_ptr, labels_ptr, row_ids_ptr, col_ids_ptr,
    out_ptr,  # [n_split, n_rows] fp32 out: sum over this split's columns of -log sigmoid(z x)
    n_rows, n_cols, dim, cols_per_split, stride_q, stride_c,
    HAS_IDS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    total = tl.zeros([BLOCK_M], tl.float32)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n_cols)
    for n0 in range(col_start, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        x, y, counts = _pair_logits(
            q_ptr, c_ptr, params_ptr, labels_ptr, row_ids_ptr, col_ids_ptr, rows, cols,
            row_ok, cols < col_end, dim, stride_q, stride_c, HAS_IDS, UPCAST,
            BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        # -log sigmoid(z x) = softplus(v), v = -z x = (1 - 2y) x; softplus(v) =
        # max(v, 0) + ln(1 + e^-|v|), in base 2 so the exponential is one exp2.
        v = x * (1.0 - 2.0 * y)
        softplus = tl.maximum(v, 0.0) + _LN2 * tl.log2(1.0 + tl.exp2(-tl.abs(v) * _LOG2E))
        total += tl.sum(tl.where(counts, softplus, 0.0), axis=1)
    tl.store(out_ptr + split * n_rows + rows, total, mask=row_ok)


@triton.jit
def _sigmoid_grad_kernel(
    q_ptr, c_ptr, params_ptr,
    w_ptr,  # [n_rows] fp32: row weight dL/dloss_i divided by max|w|
    labels_ptr,  # [n_rows] positive's column within this slab (anything else if not in it)
    row_ids_ptr, col_ids_ptr,
    g_ptr,  # [n_rows, n_cols] out, input dtype: G = (sigmoid(x) - Y) * w
    n_rows, n_cols, dim, stride_q, stride_c, stride_g,
    HAS_IDS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    x, y, counts = _pair_logits(
        q_ptr, c_ptr, params_ptr, labels_ptr, row_ids_ptr, col_ids_ptr, rows, cols, row_ok,
        col_ok, dim, stride_q, stride_c, HAS_IDS, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    sigmoid = 1.0 / (1.0 + tl.exp2(-x * _LOG2E))  # exp2 of +inf gives sigmoid = 0, not NaN
    g = tl.where(counts, (sigmoid - y) * w[:, None], 0.0)
    tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


def forward_block(
    q: Tensor,
    c: Tensor,
    params: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None = None,
    col_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(row sums of -log sigmoid(z x) over this block, zeros); both fp32 [Bq]."""
    return in_addressable_pieces(
        _forward_block, merge_rows, q, c, params.contiguous(), labels, row_pos_ids, col_ids
    )


def _forward_block(q, c, params, labels, row_pos_ids, col_ids) -> tuple[Tensor, Tensor]:
    n_rows, dim = q.shape
    meta = tile_config(q.dtype)
    n_row_blocks, n_split, cols_per_split = column_splits(
        n_rows, c.shape[0], meta["BLOCK_M"], q.device
    )
    out = torch.empty(n_split, n_rows, dtype=torch.float32, device=q.device)
    has_ids = row_pos_ids is not None and col_ids is not None
    _sigmoid_row_kernel[(n_row_blocks, n_split)](
        q, c, params, labels, row_pos_ids if has_ids else labels,
        col_ids if has_ids else labels, out, n_rows, c.shape[0], dim, cols_per_split,
        q.stride(0), c.stride(0), HAS_IDS=has_ids, UPCAST=interpreting(), **meta,
    )  # fmt: skip
    rows = out.sum(dim=0)
    return rows, torch.zeros_like(rows)


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
    """Add this block's gradients into dq [Bq, D] and dc [Bc, D]; return [dL/dt, dL/db]."""
    meta = tile_config(q.dtype)
    has_ids = row_pos_ids is not None and col_ids is not None
    params = params.contiguous()

    def fill(g: Tensor, r0: int, r1: int, c0: int, c1: int, w_rel: Tensor) -> None:
        grid = (triton.cdiv(r1 - r0, meta["BLOCK_M"]), triton.cdiv(c1 - c0, meta["BLOCK_N"]))
        _sigmoid_grad_kernel[grid](
            q[r0:r1], c[c0:c1], params, w_rel[r0:r1], labels[r0:r1] - c0,
            row_pos_ids[r0:r1] if has_ids else labels, col_ids[c0:c1] if has_ids else labels,
            g, r1 - r0, c1 - c0, q.shape[1], q.stride(0), c.stride(0), g.stride(0),
            HAS_IDS=has_ids, UPCAST=interpreting(), **meta,
        )  # fmt: skip

    dt, db = slab_backward(q, c, row_weight, params[0], dq, dc, fill, sum_g=True)
    return torch.stack([dt, db])
