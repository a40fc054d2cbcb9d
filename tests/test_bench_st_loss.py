"""scripts/bench_st_loss.py's collator shortcut must build exactly the tensors the trainer's own
collator builds, or the benchmark would time a different batch."""

import sys
from pathlib import Path

import torch
from tiny_encoder import minilm_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_st_loss import tokenize_distinct_texts_once  # noqa: E402


def _collator(model):
    from sentence_transformers.sentence_transformer.data_collator import (
        SentenceTransformerDataCollator,
    )

    tokenize = getattr(model, "preprocess", None) or model.tokenize
    return SentenceTransformerDataCollator(tokenize)


def test_distinct_text_tokenization_builds_the_collators_batch():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path(), device="cpu")
    texts = ["a b c", "a much longer text than the others, with more tokens", "x", "a b c"]
    rows = [
        {"anchor": texts[i % 4], "positive": texts[(i + 1) % 4], "negative": texts[(i * 3) % 4]}
        for i in range(13)
    ]
    plain, shortcut = _collator(model), _collator(model)
    tokenize_distinct_texts_once(shortcut)
    want, got = plain(rows), shortcut(rows)
    assert list(got) == list(want)
    assert any(isinstance(v, torch.Tensor) for v in want.values())
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key
