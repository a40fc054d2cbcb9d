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


def test_split_special_tokens_is_kept(monkeypatch):
    """A tokenizer loaded with split_special_tokens=True encodes "[MASK]" as text: the copy of
    its backend must too (the flag is not part of the backend's serialisation)."""
    from transformers import AutoTokenizer

    monkeypatch.setattr(tokens, "TOKENIZE_BATCH", 1)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), split_special_tokens=True)
    texts = ["hello [MASK] world [SEP] x", "a [CLS] b"]
    settings = tokens.SideSettings("", 16)
    table = tokens.tokenize(tokenizer, texts, settings)
    want = tokenizer(texts, truncation="longest_first", max_length=16)["input_ids"]
    assert [table.row(i).tolist() for i in range(len(texts))] == want
    assert tokenizer.mask_token_id not in table.row(0).tolist()


def test_one_batch_copies_nothing(monkeypatch):
    """A text that dynamic mining brings in is tokenised with the plain call: no copy of the
    backend (which costs a whole tokenizer's serialisation) for a single text."""
    monkeypatch.setattr(tokens, "_truncating_backend", lambda *a: pytest.fail("copied"))
    table = tokens.tokenize(_tokenizer("bert"), ["a new negative"], tokens.SideSettings("", 8))
    assert len(table) == 1


def test_a_backend_that_does_not_serialise_takes_the_plain_path(monkeypatch):
    from tokenizers import pre_tokenizers

    class Words:  # a Python pre-tokenizer, as some tokenizers install (RoFormer's Jieba)
        def pre_tokenize(self, pretok):
            pretok.split(lambda i, s: s.split(" ", "removed"))

    monkeypatch.setattr(tokens, "TOKENIZE_BATCH", 2)
    tokenizer = _tokenizer("bert")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.PreTokenizer.custom(Words())
    table = tokens.tokenize(tokenizer, TEXTS, tokens.SideSettings("", 12))
    assert [table.row(i).tolist() for i in range(len(TEXTS))] == _direct(
        tokenizer, tokens.SideSettings("", 12)
    )
