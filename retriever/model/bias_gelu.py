"""Bias + GELU in Triton: BERT's intermediate activation (``BertIntermediate``:
``gelu(dense(h))``, erf GELU), one kernel forward and one backward.

Why: eagerly the forward is the GEMM's bias epilogue and a GELU kernel, the backward a GELU
backward kernel and a separate bias-gradient reduction over [tokens, intermediate], the widest
tensor of the layer (4x hidden). Fused, the backward reads dout and y once and writes dy once,
the bias gradient summed on the way.

Forward, `_bias_gelu_forward`: y [M, N] is the dense layer's output without its bias (the
caller runs ``F.linear(h, W)``); each program takes one [BLOCK_M, BLOCK_N] tile and computes in
fp32

    x = y + b,  out = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))

Only y is kept for the backward (as eager GELU keeps its input), not x or the output.

Backward, `_bias_gelu_backward`: with phi(x) = exp(-x^2 / 2) / sqrt(2 pi),

    dy = dout * (Phi(x) + x * phi(x)),  db = sum over rows of dy

The grid is (column blocks, P): the P programs of a column block walk its row blocks pid,
pid + P, ... and each writes one row of fp32 partial sums of db, which one torch sum finishes
(the reduction of `retriever.model.layer_norm`; deterministic).

Dtypes: y, b and dout are read as they are (bf16 network: bf16; under autocast y bf16, b fp32),
computed in fp32, written in y's dtype; db in b's. No tensor is cast on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from retriever.model.kernel_grid import reduction_programs, row_block

# Elementwise tiles of [BLOCK_M, BLOCK_N]; backward programs per SM over all column blocks.
BLOCK_N = 256
FORWARD_TILE = 8192
FORWARD_WARPS = 8
BACKWARD_TILE = 8192
BACKWARD_WARPS = 8
BACKWARD_PROGRAMS_PER_SM = 4
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def _tile(y_ptr, b_ptr, rows, cols, M, N):
    """x = y + b in fp32 for one tile, its element offsets and mask."""
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return y + b[None, :], offsets, mask


@triton.jit
def _bias_gelu_forward(y_ptr, b_ptr, out_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x, offsets, mask = _tile(y_ptr, b_ptr, rows, cols, M, N)
    out = 0.5 * x * (1.0 + tl.erf(x * _SQRT_HALF))
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward(dout_ptr, y_ptr, b_ptr, dy_ptr, partial_ptr, M, N,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid = tl.program_id(1)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(1)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        x, offsets, mask = _tile(y_ptr, b_ptr, rows, cols, M, N)
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # d gelu / dx = Phi(x) + x * phi(x)
        cdf = 0.5 * (1.0 + tl.erf(x * _SQRT_HALF))
        pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        dy = dout * (cdf + x * pdf)  # 0 outside the mask: dout is
        tl.store(dy_ptr + offsets, dy.to(dy_ptr.dtype.element_ty), mask=mask)
        db += tl.sum(dy, axis=0)
    tl.store(partial_ptr + pid * N + cols, db, mask=cols < N)


def _rows(x: Tensor, n: int) -> Tensor:
    return x.reshape(-1, n).contiguous()  # a view for the contiguous tensors layers produce


def _block_n(n: int) -> int:
    return min(BLOCK_N, triton.next_power_of_2(n))


class BiasGeluFunction(torch.autograd.Function):
    """gelu(y + bias) (erf GELU) over the last dimension of y."""

    @staticmethod
    def forward(ctx, y: Tensor, bias: Tensor) -> Tensor:
        n = y.shape[-1]
        y2 = _rows(y, n)
        m = y2.shape[0]
        out = torch.empty_like(y2)
        block_n = _block_n(n)
        block_m = row_block(FORWARD_TILE, block_n, y.device)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _bias_gelu_forward[grid](y2, bias, out, m, n, BLOCK_M=block_m, BLOCK_N=block_n,
                              num_warps=FORWARD_WARPS)  # fmt: skip
        ctx.save_for_backward(y2, bias)
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, dout: Tensor):
        y2, bias = ctx.saved_tensors
        m, n = y2.shape
        dy = torch.empty_like(y2)
        block_n = _block_n(n)
        block_m = row_block(BACKWARD_TILE, block_n, y2.device)
        column_blocks = triton.cdiv(n, block_n)
        programs = reduction_programs(triton.cdiv(m, block_m), y2.device,
                                      BACKWARD_PROGRAMS_PER_SM, column_blocks)  # fmt: skip
        partial = torch.empty(programs, n, dtype=torch.float32, device=y2.device)
        _bias_gelu_backward[(column_blocks, programs)](
            _rows(dout, n), y2, bias, dy, partial, m, n, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=BACKWARD_WARPS,
        )  # fmt: skip
        return dy.view(dout.shape), partial.sum(0).to(bias.dtype)


def bias_gelu(y: Tensor, bias: Tensor) -> Tensor:
    """``gelu(y + bias)`` (erf GELU, as BERT's ``gelu``) with the kernels above (``y`` the dense
    layer's output without its bias; CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    return BiasGeluFunction.apply(y, bias)
