"""The token cache's tokenizer: batches encoded on a helper thread (the fast tokenizer's own
Rust backend, truncating as transformers does) give exactly the ids of the tokenizer's own call,
for every family the tests build, across batch boundaries and with either truncation side."""

from __future__ import annotations

import pytest
from tiny_encoder import _decoder_tokenizer, minilm_path

from retriever.model.decoder import append_eos
from retriever.train import tokens

TEXTS = [
    "A cell protein",
    "the GENE of cancer in the brain, heart and blood " * 6,
    "",
    "virus drug immune liver kidney lung bone skin",
    "x",
    "a question about the topic of the report " * 3,
    "muscle nerve enzyme tumor dose",
]


def _tokenizer(kind: str):
    if kind == "bert":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(minilm_path())
    tokenizer = _decoder_tokenizer(kind)
    append_eos(tokenizer)
    return tokenizer


def _direct(tokenizer, settings: tokens.SideSettings) -> list[list[int]]:
    return tokenizer(
        [settings.text(t) for t in TEXTS], truncation="longest_first",
        max_length=settings.max_length, padding=False,
    )["input_ids"]  # fmt: skip


@pytest.mark.parametrize("kind", ["bert", "qwen2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pipelined_batches_equal_the_tokenizer(monkeypatch, kind, side):
    monkeypatch.setattr(tokens, "TOKENIZE_BATCH", 3)  # 3 batches, the last one short
    tokenizer = _tokenizer(kind)
    tokenizer.truncation_side = side
    for settings in (tokens.SideSettings("Query: ", 9), tokens.SideSettings("", 64, True)):
        table = tokens.tokenize(tokenizer, TEXTS, settings)
        got = [table.row(i).tolist() for i in range(len(TEXTS))]
        assert got == _direct(tokenizer, settings), (kind, side, settings)
    # The caller's tokenizer is left as it was: its own calls still pad and do not truncate.
    padded = tokenizer(TEXTS[:2], padding=True)["input_ids"]
    assert len(padded[0]) == len(padded[1]) > 9


def test_a_slow_tokenizer_takes_the_plain_path(monkeypatch):
    monkeypatch.setattr(tokens, "TOKENIZE_BATCH", 2)
    tokenizer = _tokenizer("bert")
    monkeypatch.setattr(tokens, "_truncating_backend", lambda *a: None)
    settings = tokens.SideSettings("", 8)
    table = tokens.tokenize(tokenizer, TEXTS, settings)
    assert [table.row(i).tolist() for i in range(len(TEXTS))] == _direct(tokenizer, settings)


def test_no_texts():
    table = tokens.tokenize(_tokenizer("bert"), [], tokens.SideSettings("", 8))
    assert len(table) == 0
