"""What the encoder does to a Hugging Face network: pooling token states, setting dropout, and
checking max lengths against its positions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from retriever.model.settings import POOLING_MODES

# Tokenizer outputs a Hugging Face encoder accepts (others, e.g. `length`, are dropped).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def pool(hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """Pool token states [B, T, D] into [B, D] under ``attention_mask`` [B, T] (1 = token).

    ``cls`` takes the first real token and ``last`` the last real one, so both are right for
    left and right padding; ``mean`` averages real tokens, accumulated in fp32.
    """
    mask = attention_mask.to(torch.bool)
    if mode == "cls":
        first = mask.int().argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), first]
    if mode == "last":
        last = hidden.size(1) - 1 - mask.flip(1).int().argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    if mode == "mean":
        acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1, dtype=acc)
        count = weights.sum(dim=1, dtype=acc).clamp(min=1e-9)
        return (summed / count).to(hidden.dtype)
    raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLING_MODES}")


# Float attributes through which transformers' attention modules pass a dropout probability
# to their attention kernel (BERT's goes through an nn.Dropout's p instead).
_ATTENTION_DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout_p", "attn_dropout_p")


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability of ``model``: its ``nn.Dropout`` modules and the attention
    dropout that transformers' attention modules keep as a float (e.g. Qwen2's)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        for name in _ATTENTION_DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, p)


def dropout_probability(model: nn.Module) -> float:
    """The largest dropout probability anywhere in ``model`` (0: it draws no random numbers)."""
    found = [0.0]
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            found.append(module.p)
        found += [
            getattr(module, name)
            for name in _ATTENTION_DROPOUT_ATTRIBUTES
            if isinstance(getattr(module, name, None), float)
        ]
    return max(found)


def max_length_problems(encoder: Any) -> list[tuple[str, int, int]]:
    """(side, max length, limit) for each side whose max length exceeds the positions the
    model has (a BERT's learned position table, say); models without a limit pass."""
    limit = getattr(getattr(encoder.model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return []
    sides = (("query", encoder.query_max_length), ("document", encoder.document_max_length))
    return [(side, length, limit) for side, length in sides if length > limit]


def pool_stream(hidden: Tensor, cu_seqlens: Tensor, texts: int, mode: str) -> Tensor:
    """Pool a token stream's states [T, D] into [texts, D]: text i is tokens
    ``cu_seqlens[i]:cu_seqlens[i + 1]`` (later bounds, a static shape's padded tail, are left
    out). ``cls`` takes a text's first token, ``last`` its last, ``mean`` averages its tokens
    (summed in fp32 for half-precision states)."""
    starts, ends = cu_seqlens[:texts].long(), cu_seqlens[1 : texts + 1].long()
    if mode == "cls":
        return hidden[starts]
    if mode == "last":
        return hidden[ends - 1]
    if mode == "mean":
        acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        lengths = ends - starts
        # Each token's text; the tail after the last text counts as text `texts`, dropped.
        text = torch.repeat_interleave(
            torch.arange(texts + 1, device=hidden.device),
            torch.cat([lengths, hidden.shape[0] - ends[-1:]]),
            output_size=hidden.shape[0],
        )
        sums = torch.zeros(texts + 1, hidden.shape[1], dtype=acc, device=hidden.device)
        sums = sums.index_add(0, text, hidden.to(acc))[:texts]
        return (sums / lengths.clamp(min=1)[:, None].to(acc)).to(hidden.dtype)
    raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLING_MODES}")
