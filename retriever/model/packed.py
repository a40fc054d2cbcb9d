"""A stock Hugging Face network run padding-free: a chunk's texts as one token stream.

The stream goes in as a batch of one, ``input_ids`` [1, T], with ``position_ids`` restarting at
every text (offset as the model numbers positions: RoBERTa's start after its padding index) and
the texts' bounds as transformers' flattened-attention arguments (``cu_seq_lens_q`` /
``max_length_q``, which its models pass on to their attention functions). Attention is a
function registered with transformers' ``AttentionInterface`` under ``retriever_packed_<inner>``
(inner: the implementation the model was loaded with): a call that carries the bounds runs
`retriever.model.varlen` (or, for ``flash_attention_2``, transformers' own flattened path), any
other call is handed to the inner implementation with its mask, so padded batches (evaluation,
mining) run as before. While a stream is embedded, the registered mask function returns no mask:
transformers would otherwise build a [T, T] block mask from the restarting position ids.

No modelling code is copied: a model qualifies when this works for it, and `packing_problem`
finds out by running it (two short texts packed against each text alone), so a transformers
version or model family whose layers do not pass the arguments on falls back to padded chunks.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from retriever.model.varlen import varlen_attention

PREFIX = "retriever_packed_"
_streaming: contextvars.ContextVar[bool] = contextvars.ContextVar("streaming", default=False)


def _inner_name(config: Any) -> str:
    name = config._attn_implementation or "eager"
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def _attention(inner: str):
    """The attention function registered for models loaded with ``inner`` attention."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        cu_seqlens = kw.get("cu_seq_lens_q")
        if cu_seqlens is None or inner.startswith("flash_attention"):
            # Padded batches, or transformers' own flattened path (it reads the bounds).
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            function = ALL_ATTENTION_FUNCTIONS[inner] if inner != "eager" else _eager(module)
            return function(module, query, key, value, attention_mask, dropout=dropout,
                            scaling=scaling, **kw)  # fmt: skip
        window = kw.get("sliding_window")
        if window is not None and window < kw["max_length_q"]:
            raise NotImplementedError(
                f"sliding-window attention ({window} tokens, shorter than the longest text) is "
                "not supported packed"
            )
        # [1, H, T, d] -> [T, H, d]: the stream's tokens first, as the varlen kernels take them.
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        causal = bool(getattr(module, "is_causal", False))
        out = varlen_attention(q, k, v, cu_seqlens, kw["max_length_q"], causal=causal,
                               scale=scaling, dropout=dropout)  # fmt: skip
        return out[None], None  # [1, T, H, d], as transformers' attention functions return it

    return attention


def _eager(module: nn.Module):
    """The model's own eager attention: its modelling file's ``eager_attention_forward``."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _mask(inner: str):
    """The mask function registered beside the attention: none for a stream (the bounds
    replace it), the inner implementation's for padded batches."""

    def mask(*args: Any, **kwargs: Any) -> Any:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        if _streaming.get() or inner not in ALL_MASK_ATTENTION_FUNCTIONS:
            return None
        return ALL_MASK_ATTENTION_FUNCTIONS[inner](*args, **kwargs)

    return mask


def use_packed_attention(model: nn.Module) -> str | None:
    """Make ``model`` (a transformers model, LoRA-wrapped or not) take token streams: register
    the packed attention for its implementation and switch it to it. Returns the name, or
    None for a model whose attention does not go through transformers' interface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not getattr(_base(model), "_supports_attention_backend", True):
        return None
    inner = _inner_name(model.config)
    name = PREFIX + inner
    AttentionInterface.register(name, _attention(inner))
    AttentionMaskInterface.register(name, _mask(inner))
    model.set_attn_implementation(name)
    return name


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def position_offset(model: nn.Module) -> int:
    """Where the model's positions start: RoBERTa-style embeddings number them from their
    padding index + 1 (they have ``create_position_ids_from_input_ids``), others from 0."""
    embeddings = getattr(_base(model), "embeddings", None)
    if embeddings is not None and hasattr(embeddings, "create_position_ids_from_input_ids"):
        return int(embeddings.padding_idx) + 1
    return 0


@contextlib.contextmanager
def streaming() -> Iterator[None]:
    token = _streaming.set(True)
    try:
        yield
    finally:
        _streaming.reset(token)


def stream_hidden(model: nn.Module, features: dict[str, Any]) -> Tensor:
    """[T, hidden] last hidden states of a token stream: ``input_ids`` [T], ``position_ids``
    [T] (restarting at 0 for each text), ``cu_seqlens`` [n + 1] int32, ``max_length`` (int)."""
    ids, cu_seqlens = features["input_ids"], features["cu_seqlens"]
    positions = features["position_ids"] + position_offset(model)
    inputs: dict[str, Any] = {"input_ids": ids[None], "position_ids": positions[None]}
    if getattr(model.config, "type_vocab_size", 0):  # BERT's buffered ids are [1, max positions]
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    longest = features["max_length"]
    bounds = {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
              "max_length_q": longest, "max_length_k": longest}  # fmt: skip
    with streaming():
        return model(**inputs, **bounds).last_hidden_state[0]


def packing_problem(model: nn.Module, vocab_size: int, max_length: int) -> str | None:
    """Why ``model`` cannot embed token streams of texts up to ``max_length`` tokens, or None:
    two short texts run packed must give the hidden states each gives alone (in eval mode,
    without gradients; the kernels told ``max_length``, so that a sliding window shorter than
    it is refused here, not in the middle of training). Call it after
    `use_packed_attention`."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    if not getattr(_base(model), "_supports_attention_backend", True):
        return (
            f"{kind}: its attention layers do not call transformers' attention functions, so "
            "they cannot take the texts' bounds"
        )
    device = next(model.parameters()).device
    lengths = [3, 5]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab_size - 1), vocab_size, (sum(lengths),), generator=g)
    ids = ids.to(device)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4], device=device)
    features = {"input_ids": ids, "cu_seqlens": cu, "position_ids": positions,
                "max_length": max(max_length, 5)}  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = stream_hidden(model, features)
            alone = [model(input_ids=ids[None, a:b]).last_hidden_state[0]
                     for a, b in ((0, 3), (3, 8))]  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - any failure means: not this model, say why
        return f"{kind}: running it packed failed ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
    want = torch.cat(alone).float()
    error = (packed.float() - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
    tolerance = 1e-4 if packed.dtype == torch.float32 else 3e-2
    if not error <= tolerance:
        return (
            f"{kind}: its packed forward differs from its padded one (relative error "
            f"{error:.1e}): its layers do not pass the texts' bounds to transformers' attention "
            "functions (or number positions differently)"
        )
    return None
