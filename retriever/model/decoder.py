"""Decoder LLMs as embedders (e5-mistral, Qwen3-Embedding, NV-Embed): the last token's hidden
state, after an end-of-sequence token that every text ends with, is the embedding.

* :func:`is_decoder`: whether a model is a causal (decoder-only) language model, whose first
  token sees only itself, so ``cls`` pooling makes no sense for it and ``last`` is its default.
* :func:`append_eos`: makes the tokenizer itself append its EOS token to every text (Tevatron's
  ``append_eos_token``), after truncation, so the EOS is never cut off. The change is part of
  the tokenizer (its post-processor), so the token cache sees it in the tokenizer's
  fingerprint, and a saved model's tokenizer does the same in sentence-transformers.
"""

from __future__ import annotations

from typing import Any


def is_decoder(config: Any) -> bool:
    """A causal language model (Qwen2/3, Llama, Mistral, ...) rather than an encoder (BERT,
    RoBERTa, ...): it has a causal-LM head class and no masked-LM one."""
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", None)
    causal = model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return causal and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES


def ends_with_eos(tokenizer: Any) -> bool:
    """Whether the tokenizer already ends every text with its EOS token."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.eos_token_id is not None and bool(ids) and ids[-1] == tokenizer.eos_token_id


def append_eos(tokenizer: Any) -> None:
    """Make ``tokenizer`` (a fast tokenizer) end every text with its EOS token; nothing to do
    when it already does. Truncation to a max length keeps room for it."""
    from tokenizers import processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if eos is None or eos_id is None:
        raise ValueError("append_eos: the tokenizer has no EOS token to append")
    if backend is None:
        raise ValueError("append_eos: needs a fast (tokenizers) tokenizer")
    if ends_with_eos(tokenizer):
        return
    template = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, eos_id)]
    )
    old = backend.post_processor  # e.g. a BOS template: keep it, then add the EOS
    backend.post_processor = template if old is None else processors.Sequence([old, template])


def pooling_problem(config: Any, pooling: str) -> str | None:
    """Why ``pooling`` makes no sense for this model, or None."""
    if pooling == "cls" and is_decoder(config):
        return (
            f"pooling cls takes the first token, which in a decoder ({config.model_type}) sees "
            "only itself; use last (with model.append_eos) or mean"
        )
    return None
