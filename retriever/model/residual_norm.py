"""Bias + dropout + residual + LayerNorm in Triton: the tail of BERT's attention and feed-forward
blocks (``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dropout(dense(h)) + input)``), one
kernel forward and one backward.

Why: eagerly this tail is a bias add (the GEMM's epilogue), a dropout kernel that writes its
mask, a residual add, a LayerNorm, and in the backward a dropout-mask product, a bias-gradient
reduction, the LayerNorm backward and a gradient add: each one a pass over [tokens, hidden]
(docs/benchmarks.md, "Padding-free packed chunks": elementwise work was 39% of a packed MiniLM
step's GPU time). Fused, the forward reads y and r and writes the output once; the backward
reads dout, y and r and writes two gradients.

Forward, `_residual_norm_forward`: y [M, N] is the dense layer's output without its bias (the
caller runs ``F.linear(h, W)``), r [M, N] the residual. A program takes BLOCK_M whole rows
(BLOCK_N = N rounded up to a power of two) and computes in fp32:

    keep = u >= p,  u ~ U[0, 1) from Philox(seed, element)          (`_keep`)
    z = keep * (y + b) / (1 - p) + r
    mean = sum(z) / N,  rstd = 1 / sqrt(sum((z - mean)^2) / N + eps)
    out = (z - mean) * rstd * w + beta

and keeps mean and rstd (fp32, one per row). Nothing else is written: not z, not the mask.

Backward, `_residual_norm_backward`: the mask is drawn again from the same seed and z recomputed
from y and r (both kept alive anyway: y is this function's input, r the previous block's
output, which its matrix products saved), then with xhat = (z - mean) * rstd and g = w * dout:

    dz = rstd * (g - mean_N(g) - xhat * mean_N(g * xhat))     (LayerNorm's backward)
    dr = dz,  dy = keep * dz / (1 - p)
    dw = sum over rows of dout * xhat,  dbeta = sum over rows of dout,  db = sum over rows of dy

The three column sums are reduced as in `retriever.model.layer_norm`: P persistent programs
walk the row blocks pid, pid + P, ... and each writes one row of fp32 partial sums; one torch
sum finishes them (deterministic: which program sums which rows is fixed).

Dropout: the seed is one int64 drawn from torch's generator of the input's device at each call
(``torch.randint``, no host sync: the kernel loads it), so the embedding cache's RNG replay
(`retriever.loss.gradcache.RandContext` restores that generator) and activation checkpointing
draw the same seed, hence the same mask, in their second pass. One Philox call yields four
32-bit numbers: `_keep` draws [BLOCK_M, BLOCK_N / 4] counters (row * BLOCK_N / 4 + j) and
interleaves the four results into columns 4j .. 4j + 3, a quarter of the random-number work of
one call per element. The mask depends on (seed, row, column, BLOCK_N) only, never on the
program layout, so forward and backward may tile rows differently.

Dtypes: inputs are read as they are (bf16 network: all bf16; under autocast y is bf16 and r,
the weights fp32) and everything is computed in fp32; the output has r's and y's promoted dtype
(what the eager sum gives, and what autocast's fp32 LayerNorm returns), dr r's, dy y's. No
tensor is cast on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from retriever.model.kernel_grid import reduction_programs, row_block
from retriever.model.layer_norm import row_tile

# Elements per [BLOCK_M, BLOCK_N] tile, warps per program, backward programs per SM: the
# LayerNorm kernels' settings (a sweep on an H100 at N = 384), which these kernels resemble.
FORWARD_TILE = 4096
FORWARD_WARPS = 4
BACKWARD_TILE = 4096
BACKWARD_WARPS = 4
BACKWARD_PROGRAMS_PER_SM = 4
# Rows per program in Triton's interpreter, where the Philox rounds make each program slow:
# enough to keep tests short, few enough that they walk partial and repeated blocks.
INTERPRETER_FORWARD_ROWS = 16
INTERPRETER_BACKWARD_ROWS = 8
SEED_HIGH = 2**62  # seeds are drawn from [0, SEED_HIGH): Philox keys of 64 bits


@triton.jit
def _keep(seed, rows, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dropout mask of ``rows`` (int32 [BLOCK_M]), all BLOCK_N columns: True = kept."""
    QUARTER: tl.constexpr = BLOCK_N // 4
    counters = rows[:, None] * QUARTER + tl.arange(0, QUARTER)[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, counters)
    # join -> [BLOCK_M, QUARTER, 2, 2]; row-major reshape puts u0, u2, u1, u3 in 4j .. 4j + 3.
    u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (BLOCK_M, BLOCK_N))
    return u >= p


@triton.jit
def _residual(y_ptr, b_ptr, r_ptr, seed_ptr, rows, cols, col_ok, offsets, mask, p, scale,
              DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """z = keep * (y + b) * scale + r in fp32 (zero outside ``mask``), and the keep mask."""
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
    z = y + b.to(tl.float32)[None, :]
    keep = mask
    if DROPOUT:
        keep = _keep(tl.load(seed_ptr), rows, p, BLOCK_M, BLOCK_N) & mask
        z = tl.where(keep, z * scale, 0.0)
    r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, z + r, 0.0), keep


@triton.jit
def _residual_norm_forward(
    y_ptr, b_ptr, r_ptr, w_ptr, beta_ptr, out_ptr, mean_ptr, rstd_ptr, seed_ptr,
    M, N, eps, p, scale,
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, col_ok, mask, offsets = row_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    z, _ = _residual(y_ptr, b_ptr, r_ptr, seed_ptr, rows, cols, col_ok, offsets, mask, p,
                     scale, DROPOUT, BLOCK_M, BLOCK_N)  # fmt: skip
    mean = tl.sum(z, axis=1) / N
    centred = tl.where(mask, z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = centred * rstd[:, None] * w[None, :] + beta[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _residual_norm_backward(
    dout_ptr, y_ptr, b_ptr, r_ptr, w_ptr, mean_ptr, rstd_ptr, seed_ptr, dr_ptr, dy_ptr,
    partial_ptr, M, N, p, scale,
    DROPOUT: tl.constexpr, WRITE_DY: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    dbeta = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in range(pid, tl.cdiv(M, BLOCK_M), programs):
        rows, _, row_ok, _, mask, offsets = row_tile(block, M, N, BLOCK_M, BLOCK_N)
        z, keep = _residual(y_ptr, b_ptr, r_ptr, seed_ptr, rows, cols, col_ok, offsets, mask,
                            p, scale, DROPOUT, BLOCK_M, BLOCK_N)  # fmt: skip
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

        # dz = rstd * (g - mean_N(g) - xhat * mean_N(g * xhat)), g = w * dout (0 past N).
        g = dout * w[None, :]
        mean_g = tl.sum(g, axis=1) / N
        mean_gx = tl.sum(g * xhat, axis=1) / N
        dz = tl.where(mask, (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None], 0.0)
        tl.store(dr_ptr + offsets, dz.to(dr_ptr.dtype.element_ty), mask=mask)
        dy = dz
        if DROPOUT:  # dy = keep * dz / (1 - p): the dropped elements had no say in z
            dy = tl.where(keep, dz * scale, 0.0)
        if WRITE_DY:  # else dy is dz in dr's dtype, and the caller hands dr out for both
            tl.store(dy_ptr + offsets, dy.to(dy_ptr.dtype.element_ty), mask=mask)

        dw += tl.sum(dout * xhat, axis=0)
        dbeta += tl.sum(dout, axis=0)
        db += tl.sum(dy, axis=0)
    # partial sums [3, P, N]: dw, dbeta, db of this program's rows
    stride = programs * N
    tl.store(partial_ptr + pid * N + cols, dw, mask=col_ok)
    tl.store(partial_ptr + stride + pid * N + cols, dbeta, mask=col_ok)
    tl.store(partial_ptr + 2 * stride + pid * N + cols, db, mask=col_ok)


def _rows(x: Tensor, n: int) -> Tensor:
    return x.reshape(-1, n).contiguous()  # a view for the contiguous tensors layers produce


def _block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # _keep's quarters need 4 columns at least


def draw_seed(device: torch.device) -> Tensor:
    """One int64 seed on ``device`` from torch's generator there (replayable, no host sync)."""
    return torch.randint(SEED_HIGH, (1,), device=device, dtype=torch.int64)


class ResidualLayerNormFunction(torch.autograd.Function):
    """LayerNorm(dropout(y + bias, p) + residual) * weight + norm_bias, over the last dim."""

    @staticmethod
    def forward(ctx, y: Tensor, bias: Tensor, residual: Tensor, weight: Tensor,
                norm_bias: Tensor, eps: float, p: float) -> Tensor:  # fmt: skip
        n = y.shape[-1]
        y2, r2 = _rows(y, n), _rows(residual, n)
        m = y2.shape[0]
        if m * (_block_n(n) // 4) >= 2**31:
            raise ValueError(f"{m} rows: the dropout counters would pass 2^31")
        out = torch.empty(m, n, dtype=torch.promote_types(y.dtype, residual.dtype),
                          device=y.device)  # fmt: skip
        mean = torch.empty(m, dtype=torch.float32, device=y.device)
        rstd = torch.empty_like(mean)
        seed = draw_seed(y.device) if p > 0 else None
        block_n = _block_n(n)
        block_m = row_block(FORWARD_TILE, block_n, y.device, INTERPRETER_FORWARD_ROWS)
        _residual_norm_forward[(triton.cdiv(m, block_m),)](
            y2, bias, r2, weight, norm_bias, out, mean, rstd, seed, m, n, eps, p,
            1.0 / (1.0 - p), DROPOUT=p > 0, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=FORWARD_WARPS,
        )  # fmt: skip
        ctx.save_for_backward(y2, bias, r2, weight, mean, rstd, seed)
        ctx.p, ctx.norm_bias_dtype = p, norm_bias.dtype
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, dout: Tensor):
        y2, bias, r2, weight, mean, rstd, seed = ctx.saved_tensors
        m, n = y2.shape
        p = ctx.p
        dout2 = _rows(dout, n)
        dr = torch.empty_like(r2)
        write_dy = p > 0 or y2.dtype != r2.dtype
        dy = torch.empty_like(y2) if write_dy else dr
        block_n = _block_n(n)
        block_m = row_block(BACKWARD_TILE, block_n, y2.device, INTERPRETER_BACKWARD_ROWS)
        programs = reduction_programs(triton.cdiv(m, block_m), y2.device,
                                      BACKWARD_PROGRAMS_PER_SM)  # fmt: skip
        partial = torch.empty(3, programs, n, dtype=torch.float32, device=y2.device)
        _residual_norm_backward[(programs,)](
            dout2, y2, bias, r2, weight, mean, rstd, seed, dr, dy, partial, m, n, p,
            1.0 / (1.0 - p), DROPOUT=p > 0, WRITE_DY=write_dy, BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=BACKWARD_WARPS,
        )  # fmt: skip
        dw, dbeta, db = partial.sum(1)
        shape = dout.shape
        return (dy.view(shape), db.to(bias.dtype), dr.view(shape), dw.to(weight.dtype),
                dbeta.to(ctx.norm_bias_dtype), None, None)  # fmt: skip


def residual_layer_norm(
    y: Tensor, bias: Tensor, residual: Tensor, weight: Tensor, norm_bias: Tensor, eps: float,
    p: float = 0.0,
) -> Tensor:  # fmt: skip
    """``layer_norm(dropout(y + bias, p) + residual, [N], weight, norm_bias, eps)`` with the
    kernels above (``y`` the dense layer's output without its bias; CUDA tensors, or CPU ones
    under TRITON_INTERPRET=1). The dropout mask comes from torch's generator on ``y``'s
    device (`dropout_mask` draws it again from the same seed)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return ResidualLayerNormFunction.apply(y, bias, residual, weight, norm_bias, eps, p)


@triton.jit
def _dropout_mask_kernel(seed_ptr, keep_ptr, M, N, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, _, _, _, mask, offsets = row_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    keep = _keep(tl.load(seed_ptr), rows, p, BLOCK_M, BLOCK_N)
    tl.store(keep_ptr + offsets, keep.to(tl.int8), mask=mask)


def dropout_mask(seed: Tensor, m: int, n: int, p: float) -> Tensor:
    """The keep mask (bool [m, n]) the kernels draw for ``seed`` (`draw_seed`'s tensor): what
    tests and checks compare against."""
    keep = torch.empty(m, n, dtype=torch.int8, device=seed.device)
    block_n = _block_n(n)
    block_m = row_block(FORWARD_TILE, block_n, seed.device, INTERPRETER_FORWARD_ROWS)
    _dropout_mask_kernel[(triton.cdiv(m, block_m),)](seed, keep, m, n, p, BLOCK_M=block_m,
                                             BLOCK_N=block_n)  # fmt: skip
    return keep.bool()
