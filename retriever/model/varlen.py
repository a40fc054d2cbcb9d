"""Attention over a packed stream: the texts of a chunk concatenated into one [tokens, heads,
head_dim] stream, ``cu_seqlens`` [n + 1] (int32, starting at 0) their bounds. Token t of text i
attends to the tokens of text i only (and, for a decoder, only to those at or before it):

    out_t = sum_{s in text(t), s <= t if causal} softmax_s(scale * <q_t, k_s>) v_s

so no token of one text ever sees another, and no padding enters a matrix product.

`varlen_attention` runs the first kernel that applies:

1. PyTorch's own `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16) where the installed
   torch has it (told apart by its signature: 2.10's takes no scale, 2.11's a ``window_size``)
   and no attention dropout is drawn: it has none;
2. flash-attn's `flash_attn_varlen_func` when that package is installed (CUDA, with dropout);
3. PyTorch's flash kernel through the aten operators varlen_attn itself calls, with dropout
   (`FlashVarlen`): the dropout mask comes from the CUDA generator's philox state, so the
   embedding cache's RNG replay draws it again bit for bit;
4. SDPA text by text (`per_text_attention`): the CPU and fallback path. The stream's texts
   are scattered into a [texts, max_length] batch, attend under a key mask (the padded path's
   cost, linear in the stream) and are gathered back.

`block_diagonal_attention` (SDPA over the whole stream under a block-diagonal mask, quadratic
in the stream) is the reference the tests hold the others to.

Grouped-query attention (decoders with fewer key/value heads) is native in the flash kernels;
the fallback repeats key/value heads as transformers' ``repeat_kv`` does (head h reads key/value
head ``h // (heads / kv_heads)``).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def segment_ids(cu_seqlens: Tensor, tokens: int) -> Tensor:
    """[tokens] the text each token of the stream belongs to (0-based)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    texts = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(texts, lengths, output_size=tokens)


def block_diagonal_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, causal: bool, scale: float | None,
    dropout: float,
) -> Tensor:  # fmt: skip
    """Reference varlen attention: SDPA over the whole stream with a mask that keeps pairs of
    the same text (and s <= t when causal). q [T, H, d], k and v [T, H_kv, d] -> [T, H, d]."""
    tokens = q.shape[0]
    text = segment_ids(cu_seqlens, tokens)
    mask = text[:, None] == text[None, :]
    if causal:
        mask = mask.tril()
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, dropout_p=dropout, scale=scale,
    )  # fmt: skip
    return out[0].transpose(0, 1)


def per_text_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_length: int, *, causal: bool,
    scale: float | None, dropout: float,
) -> Tensor:  # fmt: skip
    """Varlen attention as padded SDPA: token t (text i, position p) goes to row i, column p of
    a [texts, max_length] batch; keys past a text's length are masked. Returns [T, H, d]."""
    tokens, texts = q.shape[0], cu_seqlens.numel() - 1
    text = segment_ids(cu_seqlens, tokens)
    position = torch.arange(tokens, device=q.device) - cu_seqlens.long()[text]

    def scatter(x: Tensor) -> Tensor:  # [T, h, d] -> [texts, h, max_length, d]
        batch = x.new_zeros(texts, max_length, *x.shape[1:])
        return batch.index_put((text, position), x).transpose(1, 2)

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    keys = torch.arange(max_length, device=q.device)
    mask = keys[None, :] < lengths.clamp(min=1)[:, None]  # an empty text keeps key 0: no NaN
    mask = mask[:, None, None, :]
    if causal:
        mask = mask & (keys[None, :] <= keys[:, None])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(scatter(q), scatter(k), scatter(v), attn_mask=mask,
                                         dropout_p=dropout, scale=scale)  # fmt: skip
    return out.transpose(1, 2)[text, position]


class FlashVarlen(torch.autograd.Function):
    """Varlen attention with dropout on PyTorch's flash kernel (the aten operators behind
    `varlen_attn`, which fixes their dropout at 0). The forward returns the philox state it
    drew the mask from; the backward regenerates the same mask from it."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_length, causal, scale, dropout):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, dropout, causal, False,
            scale=scale,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.settings = (max_length, causal, scale, dropout)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu_seqlens, seed, offset = ctx.saved_tensors
        max_length, causal, scale, dropout = ctx.settings
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_length,
            max_length, dropout, causal, seed, offset, scale=scale,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None


def _torch_varlen() -> Callable[..., Tensor] | None:
    """PyTorch's ``varlen_attn`` adapted to one calling convention, or None where the installed
    torch has none: ``(q, k, v, cu_seqlens, max_length, causal, scale)``."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "scale" not in parameters:  # 2.10's takes no scale: the aten path serves that torch
        return None
    gqa = "enable_gqa" in parameters

    def call(q, k, v, cu_seqlens, max_length, causal, scale):
        kwargs: dict = {"scale": scale}
        if "window_size" in parameters:  # torch >= 2.11
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["is_causal"] = causal
        if k.shape[1] != q.shape[1]:
            if gqa:
                kwargs["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, **kwargs)

    return call


def _flash_attn_varlen() -> Callable[..., Tensor] | None:
    """flash-attn's ``flash_attn_varlen_func`` when the package is installed, else None."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:  # installed but built for another torch or CUDA
        return None
    return flash_attn_varlen_func


# Looked up once, at import: inside compiled layers the choice below is then plain attribute
# reads (a cached function there would make torch.compile trace the lookup, or break its graph).
TORCH_VARLEN = _torch_varlen()
FLASH_ATTN_VARLEN = _flash_attn_varlen()


def kernel_name(q: Tensor, dropout: float) -> str:
    """Which kernel `varlen_attention` runs for ``q`` and ``dropout`` (for logs and benchmarks)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return "sdpa-per-text"
    if dropout == 0 and TORCH_VARLEN is not None:
        return "torch-varlen_attn"
    if FLASH_ATTN_VARLEN is not None:
        return "flash-attn"
    if hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "torch-flash-dropout"
    return "sdpa-per-text"


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_length: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """Attention of q [T, H, d] over k, v [T, H_kv, d] within the texts ``cu_seqlens`` bounds
    (int32 [n + 1]); ``max_length``: a bound on a text's length (the kernels size their grid
    by it; any bound is right). Returns [T, H, d]."""
    kernel = kernel_name(q, dropout)
    if kernel == "torch-varlen_attn":
        return TORCH_VARLEN(q, k, v, cu_seqlens, max_length, causal, scale)
    if kernel == "flash-attn":
        return FLASH_ATTN_VARLEN(
            q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, dropout_p=dropout,
            softmax_scale=scale, causal=causal,
        )  # fmt: skip
    if kernel == "torch-flash-dropout":
        return FlashVarlen.apply(q, k, v, cu_seqlens, max_length, causal, scale, dropout)
    return per_text_attention(
        q, k, v, cu_seqlens, max_length, causal=causal, scale=scale, dropout=dropout
    )
