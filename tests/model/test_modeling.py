"""`Encoder` against sentence-transformers and against pooling computed by hand in float64."""

import numpy as np
import pytest
import torch
from reference import reference_pool
from sentence_transformers import SentenceTransformer, models
from tiny_encoder import minilm_path, save_tiny_bert

from retriever.model import Encoder, pool

TEXTS = [
    "A cell is the basic unit of life.",
    "short",
    "Dense retrieval embeds queries and documents into one vector space, then searches it "
    "with inner products; long inputs like this one are truncated at the max length.",
    "What is the capital of France?",
    "  padded  with spaces  ",
    "x " * 200,
]


@pytest.mark.parametrize("mode", ["cls", "mean", "last"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pool_matches_float64_loop(mode, side):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 7, 3]
    hidden = torch.randn(4, 7, 6, generator=g)
    mask = torch.zeros(4, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, 7 - n :] = 1
    expected = reference_pool(hidden.numpy(), mask.numpy(), mode)
    np.testing.assert_allclose(pool(hidden, mask, mode).double().numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["cls", "mean", "last"])
def test_forward_matches_hidden_states_pooled_by_hand(tiny_dir, mode):
    encoder = Encoder.from_pretrained(tiny_dir, pooling=mode, normalize=True, query_max_length=16)
    features = encoder.tokenize(TEXTS, "query")
    assert features["input_ids"].shape[1] <= 16
    with torch.no_grad():
        hidden = encoder.model(**features).last_hidden_state.numpy()
        got = encoder(features).double().numpy()
    expected = reference_pool(hidden, features["attention_mask"].numpy(), mode)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_forward_is_differentiable(tiny_dir):
    encoder = Encoder.from_pretrained(tiny_dir)
    encoder(encoder.tokenize(TEXTS[:3], "document")).sum().backward()
    assert encoder.model.embeddings.word_embeddings.weight.grad is not None


def _st_model(path: str, mode: str, normalize: bool, max_len: int) -> SentenceTransformer:
    transformer = models.Transformer(path, max_seq_length=max_len)
    st_mode = {"cls": "cls", "mean": "mean", "last": "lasttoken"}[mode]
    modules = [transformer, models.Pooling(32, pooling_mode=st_mode)]
    if normalize:
        modules.append(models.Normalize())
    return SentenceTransformer(modules=modules, device="cpu")


@pytest.mark.parametrize("mode,normalize", [("cls", False), ("mean", True), ("last", True)])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_encode_matches_sentence_transformers(tiny_dir, mode, normalize, padding_side):
    st = _st_model(tiny_dir, mode, normalize, max_len=24)
    st[0].tokenizer.padding_side = padding_side
    expected = st.encode(TEXTS, batch_size=4, convert_to_numpy=True)
    encoder = Encoder.from_pretrained(
        tiny_dir, pooling=mode, normalize=normalize, document_max_length=24
    )
    encoder.tokenizer.padding_side = padding_side
    got = encoder.encode(TEXTS, "document", batch_size=4, show_progress=False)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_minilm_matches_sentence_transformers():
    path = minilm_path()
    encoder = Encoder.from_pretrained(path)
    assert (encoder.pooling, encoder.normalize) == ("mean", True)
    assert encoder.query_max_length == encoder.document_max_length == 256
    st = SentenceTransformer(path, device="cpu")
    texts = TEXTS + ["word " * 400]  # truncation at 256 tokens
    expected = st.encode(texts, batch_size=3)
    for side in ("query", "document"):
        got = encoder.encode(texts, side, batch_size=3, show_progress=False)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_save_round_trips_through_sentence_transformers(tiny_dir, tmp_path):
    encoder = Encoder.from_pretrained(
        tiny_dir,
        pooling="cls",
        normalize=True,
        query_prefix="query: ",
        document_prefix="passage: ",
        query_max_length=12,
        document_max_length=20,
    )
    encoder.save(tmp_path / "saved")
    st = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    # encode_query / encode_document apply the side's prompt and (sentence-transformers >= 6)
    # the side's max length; a plain encode() would use max_seq_length for both.
    for side, st_encode in (("query", st.encode_query), ("document", st.encode_document)):
        ours = encoder.encode(TEXTS, side, show_progress=False)
        if side == "query" and "query_length" not in models.Transformer.config_keys:
            continue  # older sentence-transformers: one max length for both sides
        np.testing.assert_allclose(ours, st_encode(TEXTS, batch_size=2), atol=1e-5)
    reloaded = Encoder.from_pretrained(str(tmp_path / "saved"))
    assert (reloaded.pooling, reloaded.normalize) == ("cls", True)
    assert (reloaded.query_prefix, reloaded.document_prefix) == ("query: ", "passage: ")
    assert reloaded.document_max_length == 20
    np.testing.assert_allclose(
        reloaded.encode(TEXTS, "document", show_progress=False),
        encoder.encode(TEXTS, "document", show_progress=False),
        atol=1e-6,
    )


def test_unsupported_sentence_transformers_module_is_refused(tiny_dir, tmp_path):
    st = SentenceTransformer(
        modules=[
            models.Transformer(tiny_dir),
            models.Pooling(32, pooling_mode="max"),
        ],
        device="cpu",
    )
    st.save(str(tmp_path / "maxpool"))
    with pytest.raises(NotImplementedError, match="pooling"):
        Encoder.from_pretrained(str(tmp_path / "maxpool"))


def test_encode_empty_and_bad_side(tiny_dir):
    encoder = Encoder.from_pretrained(tiny_dir)
    assert encoder.encode([], "query", show_progress=False).shape == (0, 32)
    with pytest.raises(ValueError, match="side"):
        encoder.encode(["a"], "passage")


def test_from_pretrained_mode_is_consistent(tmp_path):
    encoder = Encoder.from_pretrained(str(save_tiny_bert(tmp_path / "bert")))
    # The wrapper and every submodule agree: eval after loading, train after .train().
    assert not encoder.training and not any(m.training for m in encoder.modules())
    encoder.train()
    assert all(m.training for m in encoder.modules())


def _cudnn_flags_seen_by(module: torch.nn.Module) -> list[bool]:
    """Record, on every call of `module`, whether SDPA may pick cuDNN attention."""
    seen: list[bool] = []
    module.register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled())
    )
    return seen


@pytest.mark.parametrize("cudnn", [False, True])
def test_forward_chooses_cudnn_attention_and_restores_it(tiny_dir, cudnn):
    encoder = Encoder.from_pretrained(tiny_dir, cudnn_attention=cudnn)
    seen = _cudnn_flags_seen_by(encoder.model)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    encoder(encoder.tokenize(TEXTS[:2], "query"))
    encoder.encode(TEXTS[:2], "document", show_progress=False)
    assert seen == [cudnn and before] * 2
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
