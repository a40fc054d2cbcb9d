"""Fused Triton kernels for tiled InfoNCE: the GPU backend behind `impl="triton"`.

Same contract as `torch_tiles` (read its docstring for the math and the masking rule); this file
only changes *where* the tiles live.

Forward, `_row_lse_kernel`: one program owns BLOCK_M query rows and one slice of the candidate
columns.  For each BLOCK_N column tile it forms S = s * Q C^T in registers (a K-loop over D in
BLOCK_K chunks, fp32 accumulation) and folds it into a running max / running sum (online
logsumexp, in base 2 so that the exponential is one `exp2`).  Only lse leaves the chip.  When
the rows alone cannot fill the GPU (few row blocks), the columns are split across programs and
the partial lse are merged with a logsumexp (flash-decoding style).

Backward: the dq accumulator of a row block is [BLOCK_M, D] fp32, which for D = 768 is far more
than a register file, so the backward is not one fused GEMM chain as in flash-attention (whose
head dimension is <= 256).  Instead `_softmax_grad_kernel` recomputes S tile by tile and writes
G = (P - Y) * w / max|w| for a slab of [ROW_SLAB, COL_SLAB] logits in the input dtype, and two
cuBLAS GEMMs consume it:

    dq[slab rows] += s * max|w| * G @ C[slab cols]          (accumulated in fp32 per row slab)
    dc[slab cols] += s * max|w| * G^T @ Q[slab rows]
    ds            += max|w| * sum(Q * (G @ C))               (= sum_ij w_i (P-Y)_ij <q_i, c_j>)

Dividing w by max|w| keeps G within [-1, 1] so fp16 never underflows for tiny row weights
(w = 1/Bq at a batch of a million).  The slab is the only O(Bq*Bd)-shaped memory and its size
is fixed (COL_SLAB * ROW_SLAB elements), so extra memory stays O(Bq + Bd).

fp32 inputs use TF32 on the matrix units (Triton's default for an fp32 `tl.dot`, and the
slab GEMMs run with TF32 enabled): expect relative errors near 1e-3 on GPU.  Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors in exact fp32, which is how CI tests them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from retriever.loss.tile_configs import SPLIT_ALIGN, tile_config
from retriever.loss.triton_mode import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The kernels may read only globals that are constexpr instances (an annotation is not enough).
_LOG2E = tl.constexpr(LOG2E)

ROW_SLAB = 16384
COL_SLAB = 16384
# Largest number of elements the kernels may address in one input (32-bit offsets).
MAX_BLOCK_ELEMENTS = 2**31 - 1
EMPTY_ROW = float("-inf")  # a row's logsumexp before any block
merge_rows = torch.logaddexp  # row logsumexps of two column blocks (as torch_tiles)


@triton.jit
def tile_dot(q_ptr, c_ptr, rows, cols, row_ok, col_ok, dim, stride_q, stride_c,
              UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):  # fmt: skip
    """dot = Q[rows] @ C[cols]^T in fp32, over D in BLOCK_K chunks; the last chunk is masked
    (D = 384, 1000 are not multiples of BLOCK_K), as are padding rows and columns."""
    k_offsets = tl.arange(0, BLOCK_K)
    dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + k_offsets
        k_ok = ks < dim
        q = tl.load(
            q_ptr + rows[:, None] * stride_q + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        c = tl.load(
            c_ptr + cols[:, None] * stride_c + ks[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if UPCAST:  # the interpreter multiplies 16-bit floats as raw bits; fp32 is exact
            q, c = q.to(tl.float32), c.to(tl.float32)
        dot = tl.dot(q, tl.trans(c), dot)
    return dot


@triton.jit
def _row_lse_kernel(
    q_ptr, c_ptr, scale_ptr, labels_ptr, row_ids_ptr, col_ids_ptr,
    lse2_ptr,  # [n_split, n_rows] fp32 out: base-2 logsumexp over this split's columns
    pos_ptr,  # [n_split, n_rows] fp32 out: positive logit if it lies in this split, else 0
    n_rows, n_cols, dim, cols_per_split, stride_q, stride_c,
    HAS_IDS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    scale = tl.load(scale_ptr)
    scale2 = scale * _LOG2E  # s * log2(e): exp(S) = exp2(S * log2 e)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    if HAS_IDS:
        row_ids = tl.load(row_ids_ptr + rows, mask=row_ok, other=0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of S * log2 e
    l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(S * log2 e - m)
    pos = tl.zeros([BLOCK_M], tl.float32)  # <q_i, c_labels[i]>, found in whichever tile holds it
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n_cols)
    for n0 in range(col_start, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_end
        dot = tile_dot(q_ptr, c_ptr, rows, cols, row_ok, col_ok, dim, stride_q, stride_c,
                        UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip

        is_pos = (cols[None, :] == labels[:, None]) & col_ok[None, :]
        pos += tl.sum(tl.where(is_pos, dot, 0.0), axis=1)
        # Padding columns get -inf before the exponential: exp2(-inf) = 0, never 0 * inf.
        s2 = tl.where(col_ok[None, :], dot * scale2, float("-inf"))
        if HAS_IDS:
            col_ids = tl.load(col_ids_ptr + cols, mask=col_ok, other=0)
            duplicate = (col_ids[None, :] == row_ids[:, None]) & (cols[None, :] != labels[:, None])
            s2 = tl.where(duplicate, float("-inf"), s2)
        # Online logsumexp: m' = max(m, rowmax), l' = l * 2^(m - m') + rowsum(2^(s2 - m')).
        # A row that has seen only masked columns keeps m = -inf; shifting by 0 instead keeps
        # 2^(-inf - -inf) from turning into NaN.
        m_new = tl.maximum(m, tl.max(s2, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), axis=1)
        m = m_new

    out = split * n_rows + rows
    tl.store(lse2_ptr + out, m + tl.log2(l), mask=row_ok)  # l = 0 gives -inf, as it should
    tl.store(pos_ptr + out, pos * scale, mask=row_ok)


@triton.jit
def _softmax_grad_kernel(
    q_ptr, c_ptr, scale_ptr,
    lse2_ptr,  # [n_rows] fp32: final base-2 logsumexp of each row
    w_ptr,  # [n_rows] fp32: row weight dL/dloss_i divided by max|w|
    labels_ptr,  # [n_rows] positive's column within this slab (anything else if not in it)
    row_ids_ptr, col_ids_ptr,
    g_ptr,  # [n_rows, n_cols] out, input dtype: G = (P - Y) * w
    n_rows, n_cols, dim, stride_q, stride_c, stride_g,
    HAS_IDS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols

    dot = tile_dot(q_ptr, c_ptr, rows, cols, row_ok, col_ok, dim, stride_q, stride_c, UPCAST,
                    BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip

    scale2 = tl.load(scale_ptr) * _LOG2E
    # Padding rows read lse = +inf, so their P is exp2(finite - inf) = 0.
    lse2 = tl.load(lse2_ptr + rows, mask=row_ok, other=float("inf"))
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    # P_ij = exp(S_ij - lse_i) = exp2(S_ij log2 e - lse2_i)
    p = tl.exp2(dot * scale2 - lse2[:, None])
    is_pos = cols[None, :] == labels[:, None]
    if HAS_IDS:
        row_ids = tl.load(row_ids_ptr + rows, mask=row_ok, other=0)
        col_ids = tl.load(col_ids_ptr + cols, mask=col_ok, other=0)
        duplicate = (col_ids[None, :] == row_ids[:, None]) & ~is_pos
        p = tl.where(duplicate, 0.0, p)
    g = (p - tl.where(is_pos, 1.0, 0.0)) * w[:, None]
    tl.store(
        g_ptr + rows[:, None] * stride_g + cols[None, :],
        g.to(g_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool):
    """Let fp32 GEMMs use TF32 (as the Triton kernels do) for the duration of the block."""
    if not enabled:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def forward_block(
    q: Tensor,
    c: Tensor,
    scale: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None = None,
    col_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Row logsumexp over this candidate block and the positive logit; both fp32 [Bq]."""
    return in_addressable_pieces(
        _forward_block, merge_rows, q, c, scale, labels, row_pos_ids, col_ids
    )


def in_addressable_pieces(
    block_fn: Callable[..., tuple[Tensor, Tensor]],
    merge: Callable[[Tensor, Tensor], Tensor],
    q: Tensor,
    c: Tensor,
    scale: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None,
    col_ids: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``block_fn`` (a forward of (row statistic, positive logit)) on pieces of the inputs.

    The kernels form element offsets (row * D + k) in 32-bit integers, so they only ever see
    inputs of fewer than 2^31 elements: 1M candidates x 7 negatives x D = 768 is 6.4e9.
    Larger inputs run piece by piece; column pieces' row statistics combine with ``merge``
    (as the column splits do), positive logits add."""
    max_rows = max(1, MAX_BLOCK_ELEMENTS // q.shape[1])
    if q.shape[0] <= max_rows and c.shape[0] <= max_rows:
        return block_fn(q, c, scale, labels, row_pos_ids, col_ids)
    stat, pos = None, torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    for c0 in range(0, c.shape[0], max_rows):
        c_block = slice(c0, c0 + max_rows)
        stat_rows = []
        for r0 in range(0, q.shape[0], max_rows):
            rows = slice(r0, r0 + max_rows)
            part, pos_part = block_fn(
                q[rows],
                c[c_block],
                scale,
                labels[rows] - c0,
                None if row_pos_ids is None else row_pos_ids[rows],
                None if col_ids is None else col_ids[c_block],
            )
            stat_rows.append(part)
            pos[rows] += pos_part
        piece = torch.cat(stat_rows)
        stat = piece if stat is None else merge(stat, piece)
    return stat, pos


def column_splits(n_rows: int, n_cols: int, block_m: int, device: torch.device) -> tuple:
    """(row blocks, column splits, columns per split) of a forward launch: enough programs
    for two waves over the SMs, the columns split when the rows alone are too few."""
    n_row_blocks = triton.cdiv(n_rows, block_m)
    wanted_splits = triton.cdiv(2 * _num_sms(device), n_row_blocks)
    n_split = max(1, min(wanted_splits, triton.cdiv(n_cols, SPLIT_ALIGN)))
    cols_per_split = triton.cdiv(triton.cdiv(n_cols, n_split), SPLIT_ALIGN) * SPLIT_ALIGN
    return n_row_blocks, triton.cdiv(n_cols, cols_per_split), cols_per_split


def _forward_block(
    q: Tensor,
    c: Tensor,
    scale: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None,
    col_ids: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """forward_block for inputs of fewer than 2^31 elements each."""
    n_rows, dim = q.shape
    n_cols = c.shape[0]
    meta = tile_config(q.dtype)
    n_row_blocks, n_split, cols_per_split = column_splits(n_rows, n_cols, meta["BLOCK_M"], q.device)

    lse2 = torch.empty(n_split, n_rows, dtype=torch.float32, device=q.device)
    pos = torch.empty(n_split, n_rows, dtype=torch.float32, device=q.device)
    has_ids = row_pos_ids is not None and col_ids is not None
    _row_lse_kernel[(n_row_blocks, n_split)](
        q,
        c,
        scale,
        labels,
        row_pos_ids if has_ids else labels,
        col_ids if has_ids else labels,
        lse2,
        pos,
        n_rows,
        n_cols,
        dim,
        cols_per_split,
        q.stride(0),
        c.stride(0),
        HAS_IDS=has_ids,
        UPCAST=interpreting(),
        **meta,
    )
    # Partials are base 2: lse = ln(sum_splits e^(lse2 * ln 2)).
    return torch.logsumexp(lse2 * LN2, dim=0), pos.sum(dim=0)


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
    meta = tile_config(q.dtype)
    has_ids = row_pos_ids is not None and col_ids is not None
    lse2 = lse * LOG2E

    def fill(g: Tensor, r0: int, r1: int, c0: int, c1: int, w_rel: Tensor) -> None:
        grid = (triton.cdiv(r1 - r0, meta["BLOCK_M"]), triton.cdiv(c1 - c0, meta["BLOCK_N"]))
        _softmax_grad_kernel[grid](
            q[r0:r1], c[c0:c1], scale, lse2[r0:r1], w_rel[r0:r1], labels[r0:r1] - c0,
            row_pos_ids[r0:r1] if has_ids else labels, col_ids[c0:c1] if has_ids else labels,
            g, r1 - r0, c1 - c0, q.shape[1], q.stride(0), c.stride(0), g.stride(0),
            HAS_IDS=has_ids, UPCAST=interpreting(), **meta,
        )  # fmt: skip

    dot_sum, _ = slab_backward(q, c, row_weight, scale, dq, dc, fill)
    return dot_sum


def slab_backward(
    q: Tensor,
    c: Tensor,
    row_weight: Tensor,
    scale: Tensor,
    dq: Tensor,
    dc: Tensor,
    fill: Callable[[Tensor, int, int, int, int, Tensor], None],
    sum_g: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The backward's slab loop: ``fill(g, r0, r1, c0, c1, w_rel)`` writes the slab
    G = dL/dS / max|w| of rows r0:r1 and columns c0:c1 (S = scale * Q C^T), and two GEMMs per
    slab add s max|w| G C into dq and s max|w| G^T Q into dc. Returns sum_ij G_ij <q_i, c_j>
    and, with ``sum_g``, sum_ij G_ij (both times max|w|)."""
    n_rows, dim = q.shape
    n_cols = c.shape[0]
    w_max = row_weight.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    w_rel = row_weight / w_max
    coef = scale * w_max
    dot_sum = torch.zeros((), dtype=torch.float32, device=q.device)
    g_sum = torch.zeros((), dtype=torch.float32, device=q.device) if sum_g else None
    slab = torch.empty(min(n_rows, ROW_SLAB), min(n_cols, COL_SLAB), dtype=q.dtype, device=q.device)
    with _tf32_matmuls(q.dtype == torch.float32 and q.is_cuda):
        for r0 in range(0, n_rows, ROW_SLAB):
            r1 = min(r0 + ROW_SLAB, n_rows)
            q_rows = q[r0:r1]
            gc_rows = torch.zeros(r1 - r0, dim, dtype=torch.float32, device=q.device)
            for c0 in range(0, n_cols, COL_SLAB):
                c1 = min(c0 + COL_SLAB, n_cols)
                g = slab[: r1 - r0, : c1 - c0]
                fill(g, r0, r1, c0, c1, w_rel)
                gc_rows += g @ c[c0:c1]
                dc[c0:c1] += (g.T @ q_rows).float().mul_(coef).to(dc.dtype)
                if g_sum is not None:
                    g_sum += g.sum(dtype=torch.float32)
            dot_sum += (q_rows.float() * gc_rows).sum()
            dq[r0:r1] += gc_rows.mul_(coef).to(dq.dtype)
    return dot_sum * w_max, None if g_sum is None else g_sum * w_max
