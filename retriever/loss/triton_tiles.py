"""Fused Triton kernels for tiled InfoNCE and its options: the GPU backend behind
``impl="triton"``.

Same contract as `torch_tiles` (the math is in `tile_pass`'s docstring); this file only changes
*where* the tiles live. Each option is a constexpr flag of the same two kernels, so a plain
loss compiles to the plain kernel.

Forward, `_pass_stats_kernel`: one program owns BLOCK_M rows and one slice of the columns. For
each BLOCK_N column tile it forms the dot products in registers (a K-loop over D in BLOCK_K
chunks, fp32 accumulation); with Matryoshka prefixes the loop stops at each prefix's end, so
every prefix's similarities come from one pass over the tile. Per prefix, the row terms fold
into a running max / running sum (online logsumexp, base 2: one ``exp2`` per term); only the
row statistics leave the chip. Column statistics (doc_to_query's softmax, the other half of a
self pass's pairs) come from the same tile: a column's terms are summed against a fixed
reference logit, the logit of the positive the column stands for (`TilePass.column_reference`;
its softmax holds e^pos, so terms that underflow against it do not count), and added
atomically; a column whose sum overflows (a term e^88 above its positive's) is recomputed
exactly by the PyTorch tiles. When the rows alone cannot fill the GPU, the columns are split
across programs and the partial row statistics merged (flash-decoding style).

Backward: the dq accumulator of a row block is [BLOCK_M, D] fp32, which for D = 768 is far more
than a register file, so the backward is not one fused GEMM chain as in flash-attention (whose
head dimension is <= 256). Instead `_pass_grad_kernel` recomputes S tile by tile and writes
G = dL/dl (row and column terms together: the symmetric loss's backward is one sweep) divided
by the largest coefficient, for a slab of [ROW_SLAB, COL_SLAB] logits in the input dtype, one
slab per prefix; cuBLAS GEMMs consume it:

    d_rows[slab rows, :k] += s * c_max * G_k @ C[slab cols, :k]      (fp32 accumulation)
    d_cols[slab cols, :k] += s * c_max * G_k^T @ R[slab rows, :k]
    row dots              += c_max * sum_k(R[:, :k] * (G_k @ C[:, :k]))   (= sum_j G X)

Dividing by c_max keeps G within a few units so fp16 never underflows for tiny row weights
(1 / Bq at a batch of a million). The slab is the only O(rows * cols)-shaped memory and its size
is fixed, so extra memory stays O(rows + cols). A self pass skips the slabs below its diagonal.

Element offsets are 64-bit (1M candidates x 7 negatives x D = 768 is 6.4e9 elements). fp32
inputs use TF32 on the matrix units (Triton's default for an fp32 `tl.dot`, and the slab GEMMs
run with TF32 enabled): expect relative errors near 1e-3 on GPU. Under TRITON_INTERPRET=1 the
same kernels run on CPU tensors in exact fp32, which is how CI tests them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from retriever.loss import torch_tiles
from retriever.loss.tile_configs import SPLIT_ALIGN, tile_config
from retriever.loss.tile_pass import Coefs, PassStats, Stats, TilePass, plain_pass
from retriever.loss.triton_mode import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The kernels may read only globals that are constexpr instances (an annotation is not enough).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)

ROW_SLAB = 16384
COL_SLAB = 16384
# Largest number of elements the sigmoid kernels may address in one input (32-bit offsets).
MAX_BLOCK_ELEMENTS = 2**31 - 1
EMPTY_ROW = float("-inf")  # a row's logsumexp before any block
merge_rows = torch.logaddexp  # row logsumexps of two column blocks (as torch_tiles)


# -- the tile ---------------------------------------------------------------------------------


@triton.jit
def tile_dot_range(q_ptr, c_ptr, rows, cols, row_ok, col_ok, k_start, k_end, stride_q,
                   stride_c, dot, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """dot += Q[rows, k_start:k_end] @ C[cols, k_start:k_end]^T in fp32, in BLOCK_K chunks; the
    last chunk is masked (D = 384, 1000 are not multiples of BLOCK_K), as are padding rows and
    columns. Row offsets are 64-bit."""
    k_offsets = tl.arange(0, BLOCK_K)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q
    c_rows = c_ptr + cols.to(tl.int64)[:, None] * stride_c
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + k_offsets
        k_ok = ks < k_end
        q = tl.load(q_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        c = tl.load(c_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies 16-bit floats as raw bits; fp32 is exact
            q, c = q.to(tl.float32), c.to(tl.float32)
        dot = tl.dot(q, tl.trans(c), dot)
    return dot


@triton.jit
def tile_dot(q_ptr, c_ptr, rows, cols, row_ok, col_ok, dim, stride_q, stride_c,
             UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):  # fmt: skip
    """dot = Q[rows] @ C[cols]^T in fp32 over the whole of D."""
    dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    return tile_dot_range(q_ptr, c_ptr, rows, cols, row_ok, col_ok, 0, dim, stride_q, stride_c,
                          dot, UPCAST, BLOCK_K)  # fmt: skip


@triton.jit
def _tile_masks(rows, cols, row_ok, col_ok, target, row_key, col_key, row_owner, col_owner,
                self_cols, HAS_KEYS: tl.constexpr, HAS_OWNERS: tl.constexpr,
                OWN_MASK: tl.constexpr, HARDNESS: tl.constexpr, SELF: tl.constexpr):  # fmt: skip
    """(target, dropped both ways, duplicate, hardness class) of a tile, as [BLOCK_M, BLOCK_N]
    masks (0/1 floats for the class): the same for every prefix."""
    is_target = cols[None, :] == target[:, None]
    dropped = ~(row_ok[:, None] & col_ok[None, :])
    same = is_target & False
    if HAS_OWNERS:
        same = col_owner[None, :] == row_owner[:, None]
        if OWN_MASK:
            dropped = dropped | same
    if SELF:  # each unordered pair once: (i, j) with j > i, seen from both ends
        dropped = dropped | ((cols[None, :] < self_cols) & (cols[None, :] <= rows[:, None]))
    duplicate = is_target & False
    if HAS_KEYS:
        duplicate = col_key[None, :] == row_key[:, None]
    penalised = is_target & False
    if HARDNESS == 1:  # in-batch: other queries' candidates
        penalised = ~same
    elif HARDNESS == 2:  # the row's own hard negatives
        penalised = same & ~is_target
    elif HARDNESS == 3:  # every negative
        penalised = ~is_target
    return is_target, dropped, duplicate, tl.where(penalised, 1.0, 0.0)


@triton.jit
def _kept(x, is_target, dropped, duplicate, row_thresh, col_thresh, HAS_KEYS: tl.constexpr,
          MARGIN: tl.constexpr):  # fmt: skip
    """(kept row terms, kept column terms) of one prefix's similarities."""
    keep = ~dropped
    keep_col = ~dropped
    if HAS_KEYS:
        keep = keep & (~duplicate | is_target)
        keep_col = keep_col & ~duplicate
    if MARGIN:
        keep = keep & ((x <= row_thresh[:, None]) | is_target)
        keep_col = keep_col & ((x <= col_thresh[None, :]) | is_target)
    return keep, keep_col


# -- forward ----------------------------------------------------------------------------------


@triton.jit
def _pass_stats_kernel(
    r_ptr, c_ptr, scale_ptr, dims_ptr,
    target_ptr, row_key_ptr, col_key_ptr, row_owner_ptr, col_owner_ptr,
    row_thresh_ptr, col_thresh_ptr, row_norm_ptr, col_norm_ptr, col_ref_ptr,
    lse2_ptr, pos_ptr, count_ptr, lsum_ptr,  # [NP, n_split, n_rows] out: per column split
    col_sum_ptr, col_count_ptr, col_lsum_ptr,  # [NP, n_stats] out, added atomically
    n_rows, n_cols, cols_per_split, n_stats, self_cols, alpha, stride_r, stride_c,
    NP: tl.constexpr, HAS_KEYS: tl.constexpr, HAS_OWNERS: tl.constexpr,
    OWN_MASK: tl.constexpr, HARDNESS: tl.constexpr, MARGIN: tl.constexpr,
    NORMALIZE: tl.constexpr, COUNTS: tl.constexpr, COL_STATS: tl.constexpr, SELF: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    scale = tl.load(scale_ptr)
    scale2 = scale * _LOG2E  # s * log2(e): exp(l) = exp2(l * log2 e)
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    row_key = target
    row_owner = target
    if HAS_KEYS:
        row_key = tl.load(row_key_ptr + rows, mask=row_ok, other=0)
    if HAS_OWNERS:
        row_owner = tl.load(row_owner_ptr + rows, mask=row_ok, other=-2)

    # One running state per prefix (tuples of [BLOCK_M] vectors, unrolled): the running max m
    # of l * log2 e, the running sum l of exp2(l * log2 e - m), X at the row's target, and the
    # kept terms' count and logit sum.
    none = tl.zeros([BLOCK_M], tl.float32)
    m, l, pos, count, lsum, row_thresh, row_norm = (), (), (), (), (), (), ()
    for p in tl.static_range(NP):
        m = m + (tl.full([BLOCK_M], float("-inf"), tl.float32),)
        l, pos, count, lsum = l + (none,), pos + (none,), count + (none,), lsum + (none,)
        thresh = none
        norm = none
        if MARGIN:
            thresh = tl.load(row_thresh_ptr + p * n_rows + rows, mask=row_ok, other=0.0)
        if NORMALIZE:
            norm = tl.load(row_norm_ptr + p * n_rows + rows, mask=row_ok, other=1.0)
        row_thresh, row_norm = row_thresh + (thresh,), row_norm + (norm,)

    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n_cols)
    if SELF:  # tiles wholly left of the diagonal hold no pair j > i
        col_start = tl.maximum(col_start, (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N)
    for n0 in range(col_start, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_end
        col_key = cols
        col_owner = cols
        if HAS_KEYS:
            col_key = tl.load(col_key_ptr + cols, mask=col_ok, other=0)
        if HAS_OWNERS:
            col_owner = tl.load(col_owner_ptr + cols, mask=col_ok, other=-3)
        is_target, dropped, duplicate, penalised = _tile_masks(
            rows, cols, row_ok, col_ok, target, row_key, col_key, row_owner, col_owner,
            self_cols, HAS_KEYS, HAS_OWNERS, OWN_MASK, HARDNESS, SELF)  # fmt: skip
        stat_ok = col_ok & (cols < n_stats)
        dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        k0 = 0
        next_m, next_l, next_pos, next_count, next_lsum = (), (), (), (), ()
        for p in tl.static_range(NP):
            k1 = tl.load(dims_ptr + p)
            # The prefixes' dot products accumulate as the K-loop advances.
            dot = tile_dot_range(r_ptr, c_ptr, rows, cols, row_ok, col_ok, k0, k1, stride_r,
                                 stride_c, dot, UPCAST, BLOCK_K)  # fmt: skip
            k0 = k1
            x = dot
            if NORMALIZE:
                col_norm = tl.load(col_norm_ptr + p * n_cols + cols, mask=col_ok, other=1.0)
                x = dot * row_norm[p][:, None] * col_norm[None, :]
            col_thresh = x
            if MARGIN:
                col_thresh = tl.load(col_thresh_ptr + p * n_cols + cols, mask=col_ok,
                                     other=float("inf"))  # fmt: skip
            keep, keep_col = _kept(x, is_target, dropped, duplicate, row_thresh[p], col_thresh,
                                   HAS_KEYS, MARGIN)  # fmt: skip
            logit2 = x * scale2
            if HARDNESS != 0:  # l = (s + alpha * pen) X: the hardness term enters the softmax
                logit2 = x * (scale2 + alpha * _LOG2E * penalised)
            s2 = tl.where(keep, logit2, float("-inf"))
            # Online logsumexp: m' = max(m, rowmax), l' = l * 2^(m - m') + rowsum(2^(s2 - m')).
            # A row that has seen only masked columns keeps m = -inf; shifting by 0 instead
            # keeps 2^(-inf - -inf) from turning into NaN.
            m_new = tl.maximum(m[p], tl.max(s2, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_new = l[p] * tl.exp2(m[p] - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), axis=1)
            next_m, next_l = next_m + (m_new,), next_l + (l_new,)
            at_target = tl.sum(tl.where(is_target & ~dropped, x, 0.0), axis=1)
            next_pos = next_pos + (pos[p] + at_target,)
            if COUNTS:
                kept_count = tl.sum(tl.where(keep, 1.0, 0.0), axis=1)
                kept_sum = tl.sum(tl.where(keep, logit2, 0.0), axis=1) * _LN2
                next_count = next_count + (count[p] + kept_count,)
                next_lsum = next_lsum + (lsum[p] + kept_sum,)
            else:
                next_count, next_lsum = next_count + (count[p],), next_lsum + (lsum[p],)
            if COL_STATS:
                if n0 < n_stats:
                    ref = tl.load(col_ref_ptr + p * n_stats + cols, mask=stat_ok, other=0.0)
                    kc = keep_col & stat_ok[None, :]
                    terms = tl.where(kc, tl.exp2(x * scale2 - ref[None, :] * _LOG2E), 0.0)
                    at = p * n_stats + cols
                    tl.atomic_add(col_sum_ptr + at, tl.sum(terms, axis=0), mask=stat_ok)
                    if COUNTS:
                        tl.atomic_add(col_count_ptr + at, tl.sum(tl.where(kc, 1.0, 0.0), axis=0),
                                      mask=stat_ok)  # fmt: skip
                        tl.atomic_add(col_lsum_ptr + at, tl.sum(tl.where(kc, x * scale, 0.0),
                                      axis=0), mask=stat_ok)  # fmt: skip
        m, l, pos, count, lsum = next_m, next_l, next_pos, next_count, next_lsum

    for p in tl.static_range(NP):
        out = (p * n_split + split) * n_rows + rows
        tl.store(lse2_ptr + out, m[p] + tl.log2(l[p]), mask=row_ok)  # l = 0 gives -inf
        tl.store(pos_ptr + out, pos[p] * scale, mask=row_ok)
        if COUNTS:
            tl.store(count_ptr + out, count[p], mask=row_ok)
            tl.store(lsum_ptr + out, lsum[p], mask=row_ok)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def column_splits(n_rows: int, n_cols: int, block_m: int, device: torch.device) -> tuple:
    """(row blocks, column splits, columns per split) of a forward launch: enough programs
    for two waves over the SMs, the columns split when the rows alone are too few."""
    n_row_blocks = triton.cdiv(n_rows, block_m)
    wanted_splits = triton.cdiv(2 * _num_sms(device), n_row_blocks)
    n_split = max(1, min(wanted_splits, triton.cdiv(n_cols, SPLIT_ALIGN)))
    cols_per_split = triton.cdiv(triton.cdiv(n_cols, n_split), SPLIT_ALIGN) * SPLIT_ALIGN
    return n_row_blocks, triton.cdiv(n_cols, cols_per_split), cols_per_split


def _flags(tp: TilePass) -> dict:
    """The constexpr flags of a pass (shared by both kernels)."""
    n_p = tp.n_prefixes
    return dict(
        NP=n_p,
        HAS_KEYS=tp.row.key is not None and tp.col.key is not None,
        HAS_OWNERS=tp.row.owner is not None and tp.col.owner is not None,
        OWN_MASK=tp.own_mask,
        HARDNESS=tp.hardness,
        MARGIN=tp.row.thresh is not None,
        NORMALIZE=tp.row.inv_norm is not None,
        COL_STATS=tp.col.n_stats > 0,
        SELF=tp.self_cols > 0,
        UPCAST=interpreting(),
    )


def _side_tensors(tp: TilePass) -> list:
    """The pass's metadata in kernel argument order; an absent one is replaced by a tensor the
    kernel never reads (its flag is off)."""
    row, col = tp.row, tp.col
    dummy = row.target
    col_thresh = col.thresh
    if row.thresh is not None and col_thresh is None:  # rows have a margin, columns none
        col_thresh = torch.full((tp.n_prefixes, col.cols.shape[0]), float("inf"),
                                device=dummy.device)  # fmt: skip
    return [
        row.target,
        row.key if row.key is not None else dummy,
        col.key if col.key is not None else dummy,
        row.owner if row.owner is not None else dummy,
        col.owner if col.owner is not None else dummy,
        row.thresh if row.thresh is not None else dummy,
        col_thresh if col_thresh is not None else dummy,
        row.inv_norm if row.inv_norm is not None else dummy,
        col.inv_norm if col.inv_norm is not None else dummy,
    ]


def forward_pass(tp: TilePass, scale: Tensor) -> PassStats:
    """Row (and the first n_stats columns') statistics of the pass; every [NP, n] fp32."""
    rows, cols = tp.row.rows, tp.col.cols
    n_rows, n_cols = rows.shape[0], cols.shape[0]
    n_p, n_stats, device = tp.n_prefixes, tp.col.n_stats, rows.device
    meta = tile_config(rows.dtype)
    n_row_blocks, n_split, cols_per_split = column_splits(n_rows, n_cols, meta["BLOCK_M"], device)
    split = [torch.empty(n_p, n_split, n_rows, device=device) for _ in range(4)]
    col_out = [torch.zeros(n_p, max(n_stats, 1), device=device) for _ in range(3)]
    col_ref = tp.column_reference(scale).contiguous() if n_stats else split[0]
    dims = torch.tensor(tp.dims, dtype=torch.int32, device=device)
    _pass_stats_kernel[(n_row_blocks, n_split)](
        rows, cols, scale, dims, *_side_tensors(tp), col_ref, *split, *col_out,
        n_rows, n_cols, cols_per_split, n_stats, tp.self_cols, float(tp.alpha),
        rows.stride(0), cols.stride(0), COUNTS=tp.counts, **_flags(tp), **meta,
    )  # fmt: skip
    lse2, pos, count, lsum = split
    # Partials are base 2: lse = ln(sum_splits e^(lse2 * ln 2)).
    row_stats = Stats(
        torch.logsumexp(lse2 * LN2, dim=1),
        count.sum(dim=1) if tp.counts else None,
        lsum.sum(dim=1) if tp.counts else None,
    )
    col_stats = _column_stats(tp, scale, col_out, col_ref) if n_stats else None
    return PassStats(row_stats, pos.sum(dim=1), col_stats)


def _column_stats(tp: TilePass, scale: Tensor, col_out: list, ref: Tensor) -> Stats:
    """The columns' sums against their reference, as logsumexps; those whose sum overflowed
    (a term e^88 above the positive's: the positive scores far below another row) recomputed
    exactly by the PyTorch tiles."""
    total, count, lsum = col_out
    stats = Stats(torch.log(total) + ref, count if tp.counts else None,
                  lsum if tp.counts else None)  # fmt: skip
    bad = torch.nonzero(torch.isinf(total).any(dim=0)).flatten()
    if bad.numel():
        exact = torch_tiles.forward_pass(tp.with_cols(tp.col.subset(bad)), scale).cols
        stats.lse[:, bad] = exact.lse
        if tp.counts:
            stats.count[:, bad], stats.lsum[:, bad] = exact.count, exact.lsum
    return stats


# -- backward ---------------------------------------------------------------------------------


@triton.jit
def _pass_grad_kernel(
    r_ptr, c_ptr, scale_ptr, dims_ptr,
    target_ptr, row_key_ptr, col_key_ptr, row_owner_ptr, col_owner_ptr,
    row_thresh_ptr, col_thresh_ptr, row_norm_ptr, col_norm_ptr,
    row_lse_ptr, row_p_ptr, row_u_ptr, row_y_ptr,  # [NP, n_rows]: row coefficients / c_max
    col_lse_ptr, col_p_ptr, col_u_ptr,  # [NP, n_stats]: column coefficients / c_max
    g_ptr,  # [NP, r1 - r0, c1 - c0] out, input dtype: G a b / c_max per prefix
    r0, r1, c0, c1, n_rows, n_cols, n_stats, self_cols, alpha, stride_r, stride_c, stride_g,
    stride_gp,
    NP: tl.constexpr, HAS_KEYS: tl.constexpr, HAS_OWNERS: tl.constexpr,
    OWN_MASK: tl.constexpr, HARDNESS: tl.constexpr, MARGIN: tl.constexpr,
    NORMALIZE: tl.constexpr, COL_STATS: tl.constexpr, SELF: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = r0 + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = c0 + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < r1
    col_ok = cols < c1
    scale = tl.load(scale_ptr)
    scale2 = scale * _LOG2E
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    row_key = target
    row_owner = target
    col_key = cols
    col_owner = cols
    if HAS_KEYS:
        row_key = tl.load(row_key_ptr + rows, mask=row_ok, other=0)
        col_key = tl.load(col_key_ptr + cols, mask=col_ok, other=0)
    if HAS_OWNERS:
        row_owner = tl.load(row_owner_ptr + rows, mask=row_ok, other=-2)
        col_owner = tl.load(col_owner_ptr + cols, mask=col_ok, other=-3)
    is_target, dropped, duplicate, penalised = _tile_masks(
        rows, cols, row_ok, col_ok, target, row_key, col_key, row_owner, col_owner, self_cols,
        HAS_KEYS, HAS_OWNERS, OWN_MASK, HARDNESS, SELF)  # fmt: skip
    stat_ok = col_ok & (cols < n_stats)
    g_out = g_ptr + (rows - r0)[:, None] * stride_g + (cols - c0)[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k0 = 0
    for p in tl.static_range(NP):
        k1 = tl.load(dims_ptr + p)
        dot = tile_dot_range(r_ptr, c_ptr, rows, cols, row_ok, col_ok, k0, k1, stride_r,
                             stride_c, dot, UPCAST, BLOCK_K)  # fmt: skip
        k0 = k1
        x = dot
        row_norm = tl.zeros([BLOCK_M], tl.float32)
        col_norm = tl.zeros([BLOCK_N], tl.float32)
        if NORMALIZE:
            row_norm = tl.load(row_norm_ptr + p * n_rows + rows, mask=row_ok, other=1.0)
            col_norm = tl.load(col_norm_ptr + p * n_cols + cols, mask=col_ok, other=1.0)
            x = dot * row_norm[:, None] * col_norm[None, :]
        row_thresh = x
        col_thresh = x
        if MARGIN:
            row_thresh = tl.load(row_thresh_ptr + p * n_rows + rows, mask=row_ok, other=0.0)
            col_thresh = tl.load(col_thresh_ptr + p * n_cols + cols, mask=col_ok, other=0.0)
        keep, keep_col = _kept(x, is_target, dropped, duplicate, row_thresh, col_thresh,
                               HAS_KEYS, MARGIN)  # fmt: skip
        logit2 = x * scale2
        if HARDNESS != 0:
            logit2 = x * (scale2 + alpha * _LOG2E * penalised)
        at = p * n_rows + rows
        lse2 = tl.load(row_lse_ptr + at, mask=row_ok, other=0.0) * _LOG2E
        coef_p = tl.load(row_p_ptr + at, mask=row_ok, other=0.0)
        coef_u = tl.load(row_u_ptr + at, mask=row_ok, other=0.0)
        coef_y = tl.load(row_y_ptr + at, mask=row_ok, other=0.0)
        # G = p P - u on kept row terms, - y at the target (P = exp(l - lse) <= 1 there).
        g = tl.where(keep, coef_p[:, None] * tl.exp2(logit2 - lse2[:, None]) - coef_u[:, None],
                     0.0)  # fmt: skip
        g -= tl.where(is_target & ~dropped, coef_y[:, None], 0.0)
        if COL_STATS:  # the columns' softmax from the same tile: one backward sweep
            if c0 + tl.program_id(1) * BLOCK_N < n_stats:  # (hard negatives' tiles have none)
                at_c = p * n_stats + cols
                c_lse2 = tl.load(col_lse_ptr + at_c, mask=stat_ok, other=float("inf")) * _LOG2E
                c_p = tl.load(col_p_ptr + at_c, mask=stat_ok, other=0.0)
                c_u = tl.load(col_u_ptr + at_c, mask=stat_ok, other=0.0)
                col_g = c_p[None, :] * tl.exp2(x * scale2 - c_lse2[None, :]) - c_u[None, :]
                g += tl.where(keep_col & stat_ok[None, :], col_g, 0.0)
        if NORMALIZE:
            g = g * row_norm[:, None] * col_norm[None, :]
        tl.store(g_out + p * stride_gp, g.to(g_ptr.dtype.element_ty), mask=out_ok)


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


def _coefficient_tensors(rows: Coefs, cols: Coefs | None, n_p: int, n_rows: int) -> tuple:
    """(c_max, the kernel's coefficient tensors / c_max): absent ones as zeros."""
    zeros = torch.zeros(n_p, n_rows, device=rows.p.device)
    parts = [rows.p, rows.u, rows.y] + ([] if cols is None else [cols.p, cols.u])
    c_max = torch.stack([t.abs().amax() for t in parts if t is not None and t.numel()])
    c_max = c_max.amax().clamp_min(torch.finfo(torch.float32).tiny)

    def rel(t: Tensor | None, like: Tensor) -> Tensor:
        return (torch.zeros_like(like) if t is None else t / c_max).contiguous()

    row_args = [rows.lse.contiguous(), rel(rows.p, zeros), rel(rows.u, zeros),
                rel(rows.y, zeros)]  # fmt: skip
    if cols is None:
        col_args = [zeros, zeros, zeros]
    else:
        col_args = [cols.lse.contiguous(), rel(cols.p, cols.lse), rel(cols.u, cols.lse)]
    return c_max, row_args + col_args


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
    ([NP, nr], [NP, nc])."""
    rows, cols = tp.row.rows, tp.col.cols
    n_rows, n_cols, n_p = rows.shape[0], cols.shape[0], tp.n_prefixes
    meta = tile_config(rows.dtype)
    flags = _flags(tp)
    c_max, coefs = _coefficient_tensors(row_coefs, col_coefs if tp.col.n_stats else None, n_p,
                                        n_rows)  # fmt: skip
    dims = torch.tensor(tp.dims, dtype=torch.int32, device=rows.device)
    side = _side_tensors(tp)

    def fill(g: Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
        grid = (triton.cdiv(r1 - r0, meta["BLOCK_M"]), triton.cdiv(c1 - c0, meta["BLOCK_N"]))
        _pass_grad_kernel[grid](
            rows, cols, scale, dims, *side, *coefs, g, r0, r1, c0, c1, n_rows,
            n_cols, tp.col.n_stats, tp.self_cols, float(tp.alpha), rows.stride(0),
            cols.stride(0), g.stride(1), g.stride(0), **flags, **meta,
        )  # fmt: skip

    skip = None
    if tp.self_cols:

        def skip(r0: int, r1: int, c0: int, c1: int) -> bool:
            return c1 <= tp.self_cols and c1 - 1 <= r0  # wholly on or below the diagonal

    row_dots, col_dots = prefix_slab_backward(
        rows, cols, tp.dims, scale, c_max, d_rows, d_cols, fill, skip,
        self_pass=tp.self_cols > 0, column_dots=tp.col.inv_norm is not None,
    )  # fmt: skip
    if col_dots is None:  # only prefix normalisation reads them
        col_dots = torch.zeros(n_p, n_cols, device=rows.device)
    return row_dots, col_dots


def prefix_slab_backward(
    rows: Tensor,
    cols: Tensor,
    dims: tuple[int, ...],
    scale: Tensor,
    c_max: Tensor,
    d_rows: Tensor,
    d_cols: Tensor,
    fill: Callable[[Tensor, int, int, int, int], None],
    skip: Callable[[int, int, int, int], bool] | None,
    self_pass: bool = False,
    column_dots: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The backward's slab loop: ``fill(g, r0, r1, c0, c1)`` writes the slabs G_k / c_max (one
    per prefix, already times the prefix's norms) of rows r0:r1 and columns c0:c1, and two GEMMs
    per prefix add s c_max G_k C[:, :k] into d_rows and its transpose's into d_cols. Returns
    each row's sum of G_k X ([NP, nr]) and, with ``column_dots``, each column's (else None). A
    slab ``skip`` names holds no term; a self pass takes quarter slabs (its diagonal's slabs
    are computed whole, so smaller ones waste less)."""
    n_prefixes = len(dims)
    n_rows, n_cols = rows.shape[0], cols.shape[0]
    device = rows.device
    shrink = 4 if self_pass else 1
    row_slab = max(256, ROW_SLAB // shrink // n_prefixes)
    col_slab = max(256, COL_SLAB // shrink)
    coef = scale * c_max
    row_dots = torch.zeros(n_prefixes, n_rows, device=device)
    col_dots = torch.zeros(n_prefixes, n_cols, device=device) if column_dots else None
    slab = torch.empty(n_prefixes, min(n_rows, row_slab), min(n_cols, col_slab), dtype=rows.dtype,
                       device=device)  # fmt: skip
    with _tf32_matmuls(rows.dtype == torch.float32 and rows.is_cuda):
        for r0 in range(0, n_rows, row_slab):
            r1 = min(r0 + row_slab, n_rows)
            r_part = rows[r0:r1]
            # G_k C[:, :k] of these rows over every column slab, in fp32.
            gc = [torch.zeros(r1 - r0, k, dtype=torch.float32, device=device) for k in dims]
            for c0 in range(0, n_cols, col_slab):
                c1 = min(c0 + col_slab, n_cols)
                if skip is not None and skip(r0, r1, c0, c1):
                    continue
                g = slab[:, : r1 - r0, : c1 - c0]
                fill(g, r0, r1, c0, c1)
                c_part = cols[c0:c1]
                for p, k in enumerate(dims):
                    gc[p] += g[p] @ c_part[:, :k]
                    gr = (g[p].T @ r_part[:, :k]).float()  # [c, k]
                    if col_dots is not None:
                        col_dots[p, c0:c1] += (c_part[:, :k].float() * gr).sum(1)
                    d_cols[c0:c1, :k] += gr.mul_(coef)
            for p, k in enumerate(dims):
                row_dots[p, r0:r1] = (r_part[:, :k].float() * gc[p]).sum(1)
                d_rows[r0:r1, :k] += gc[p].mul_(coef)
    return row_dots * c_max, None if col_dots is None else col_dots * c_max


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
    """The sigmoid loss's slab loop: ``fill(g, r0, r1, c0, c1, w_rel)`` writes the slab
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

    The sigmoid kernels form element offsets (row * D + k) in 32-bit integers, so they only
    ever see inputs of fewer than 2^31 elements. Larger inputs run piece by piece; column
    pieces' row statistics combine with ``merge`` (as the column splits do), positive logits
    add."""
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


# -- the plain InfoNCE of one candidate block -------------------------------------------------


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
