"""LayerNorm in Triton: one fused kernel for the forward, one for the backward.

Why: a small encoder spends much of a training step outside its matrix products. In a profiled
all-MiniLM-L6-v2 step on an H100 (bf16, chunks of 512 x 128 tokens; docs/benchmarks.md) PyTorch's
LayerNorm took 20% of the GPU time: 95 us per forward call and 323 us per backward call on
[65,536, 384], where reading and writing the tensors once takes about 30 and 45 us. Most of
the backward went to the weight and bias gradients, column sums over 65,536 rows.

Forward, `_forward_kernel`: a program normalises BLOCK_M rows of x [M, N], held as one
[BLOCK_M, BLOCK_N] tile (BLOCK_N = N rounded up to a power of two), in fp32:

    mean = sum(x) / N,  rstd = 1 / sqrt(sum((x - mean)^2) / N + eps)
    y = (x - mean) * rstd * w + b

and keeps mean and rstd (fp32, one per row) for the backward. Two passes over the tile in
registers give the exact variance (no running update as in Welford's method).

Backward, `_backward_kernel`: with xhat = (x - mean) * rstd and g = w * dy,

    dx = rstd * (g - mean_N(g) - xhat * mean_N(g * xhat))
    dw = sum over rows of dy * xhat,  db = sum over rows of dy

dw and db sum over all M rows. Each of P programs (a few per SM) walks the row blocks pid,
pid + P, ..., accumulating its partial sums in fp32 registers, and writes one row of a [P, N]
buffer; a torch sum over P finishes them. Which program sums which rows is fixed, so results are
deterministic. The backward runs 2 warps per 8-row block: the column sums for dw and db then
stay within few warps, where 8 warps, one per row, made the kernel 4-5x slower (320 us against
70 us on [65,536, 384] bf16; dx alone takes 57 us).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor, nn
from torch.nn import functional as F

from retriever.loss.triton_mode import interpreting
from retriever.model.kernel_grid import reduction_programs, row_block

# Elements per [BLOCK_M, BLOCK_N] tile, warps per program, and backward programs per SM: from
# a sweep on an H100 with N = 384 (scripts/bench_layer_norm.py --sweep; docs/benchmarks.md).
FORWARD_TILE = 4096
FORWARD_WARPS = 4
BACKWARD_TILE = 4096
BACKWARD_WARPS = 2
BACKWARD_PROGRAMS_PER_SM = 4
# Smaller inputs keep PyTorch's LayerNorm. The kernels save about 13 us of GPU time per million
# elements (forward + backward) but their Python launch path costs the host some 100 us more
# per call than PyTorch's; a small encoder's step is bound by host time, so below ~8M elements
# (e.g. 512 rows of 32 tokens at width 384) the saving does not pay for it.
MIN_FUSED_ELEMENTS = 2**23


@triton.jit
def row_tile(block, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row block ``block`` of an [M, N] row-major tensor, all its columns: the rows, the
    columns, their masks, the tile's mask and the elements' 64-bit offsets."""
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    return rows, cols, row_ok, col_ok, mask, offsets


@triton.jit
def _forward_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    M,
    N,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, row_ok, col_ok, mask, offsets = row_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _backward_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dw_partial_ptr,
    db_partial_ptr,
    M,
    N,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows, _, row_ok, _, mask, offsets = row_tile(block, M, N, BLOCK_M, BLOCK_N)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)

        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        # dx = rstd * (g - mean_N(g) - xhat * mean_N(g * xhat)); padded columns hold zeros.
        mean_g = tl.sum(g, axis=1) / N
        mean_gx = tl.sum(g * xhat, axis=1) / N
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)

        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    if HAS_WEIGHT:
        tl.store(dw_partial_ptr + pid * N + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(db_partial_ptr + pid * N + cols, db, mask=col_ok)


def _block_m(tile: int, block_n: int) -> int:
    return max(1, tile // block_n)


class LayerNormFunction(torch.autograd.Function):
    """y = layer_norm(x, [x.shape[-1]], weight, bias, eps) with the kernels above.

    Under CUDA autocast the inputs are cast to fp32 (autocast runs LayerNorm in fp32 too)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        m = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block_n = triton.next_power_of_2(n)
        block_m = _block_m(FORWARD_TILE, block_n)
        _forward_kernel[(triton.cdiv(m, block_m),)](
            x2, y, weight, bias, mean, rstd, m, n, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=FORWARD_WARPS,
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy: Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(m, n).contiguous()
        dx = torch.empty_like(x2)
        block_n = triton.next_power_of_2(n)
        block_m = row_block(BACKWARD_TILE, block_n, x2.device)
        programs = reduction_programs(triton.cdiv(m, block_m), x2.device, BACKWARD_PROGRAMS_PER_SM)
        has_weight = weight is not None
        # dw's and db's partial sums in one buffer, so one torch sum finishes both.
        partial = torch.empty(2, programs, n, dtype=torch.float32, device=x2.device)
        _backward_kernel[(programs,)](
            x2, dy2, dx, weight, mean, rstd, partial[0], partial[1], m, n,
            HAS_WEIGHT=has_weight, HAS_BIAS=ctx.has_bias,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=BACKWARD_WARPS,
        )  # fmt: skip
        sums = partial.sum(1)
        dw = sums[0].to(weight.dtype) if has_weight else None
        db = sums[1].to(ctx.bias_dtype) if ctx.has_bias else None
        return dx.view(dy.shape), dw, db, None


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dimension of ``x`` (a CUDA tensor, or a CPU one under
    TRITON_INTERPRET=1) with the Triton kernels."""
    if not (x.is_cuda or interpreting()):
        raise ValueError(
            "the Triton LayerNorm needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
        )
    return LayerNormFunction.apply(x, weight, bias, eps)


class FusedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state dict) that runs the Triton kernels on CUDA
    tensors of at least `MIN_FUSED_ELEMENTS` elements and PyTorch's LayerNorm on others (CPU
    tensors run the kernels only under TRITON_INTERPRET=1, for tests). Made by
    `use_fused_layer_norm`."""

    def forward(self, x: Tensor) -> Tensor:
        fused = x.numel() >= MIN_FUSED_ELEMENTS if x.is_cuda else interpreting()
        if fused and len(self.normalized_shape) == 1:
            return LayerNormFunction.apply(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def use_fused_layer_norm(model: nn.Module) -> int:
    """Turn every ``nn.LayerNorm`` of ``model`` over its last dimension into a `FusedLayerNorm`,
    in place (parameters, state dict and hooks are kept). Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
            module.__class__ = FusedLayerNorm
            changed += 1
    return changed
