"""Padding-free chunks on tiny random BERT, RoBERTa, Qwen2 and Llama networks in float64: a token
stream's embeddings and parameter gradients equal those of the padded forward, text by text,
for each pooling; the stream's bounds, positions and static tail; the varlen fallback against
a per-text loop; models that cannot run packed say why."""

from __future__ import annotations

import pytest
import torch

from retriever.model import Encoder, EncoderSettings
from retriever.model.varlen import block_diagonal_attention, varlen_attention
from retriever.train.batches import StreamChunk, TokenChunk

VOCAB = 120
LENGTHS = [5, 1, 7, 3, 6]


class _Tokenizer:
    """What Encoder needs of a tokenizer here: a pad token and a vocabulary size."""

    pad_token, eos_token, pad_token_id = "<pad>", "<pad>", 0

    def __len__(self) -> int:
        return VOCAB


def _network(kind: str) -> torch.nn.Module:
    import transformers as hf

    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    decoder = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    encoder = dict(num_attention_heads=2, max_position_embeddings=64, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)  # fmt: skip
    config, model = {
        "bert": (hf.BertConfig(**small, **encoder), hf.BertModel),
        "roberta": (hf.RobertaConfig(**small, **encoder, pad_token_id=1), hf.RobertaModel),
        "qwen2": (hf.Qwen2Config(**small, **decoder), hf.Qwen2Model),
        "llama": (hf.LlamaConfig(**small, **decoder), hf.LlamaModel),
    }[kind]
    torch.manual_seed(0)
    return model(config).double().train()


def _encoder(kind: str, pooling: str) -> Encoder:
    settings = EncoderSettings(pooling=pooling, normalize=pooling != "cls")
    return Encoder(_network(kind), _Tokenizer(), settings)


def _texts(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g, dtype=torch.int32) for n in LENGTHS]


def _padded(texts: list[torch.Tensor], left: bool) -> TokenChunk:
    width = max(len(t) for t in texts)
    ids = torch.zeros(len(texts), width, dtype=torch.int32)
    for row, t in enumerate(texts):
        if left:
            ids[row, width - len(t) :] = t
        else:
            ids[row, : len(t)] = t
    return TokenChunk(ids, torch.tensor([len(t) for t in texts]), left)


def _stream(texts: list[torch.Tensor], pad_to: int | None = None) -> StreamChunk:
    return StreamChunk(torch.cat(texts), torch.tensor([len(t) for t in texts]), 8, pad_to)


def _embed_and_grads(encoder: Encoder, chunk) -> tuple[torch.Tensor, list[torch.Tensor]]:
    encoder.zero_grad(set_to_none=True)
    embeddings = encoder(chunk.features("cpu"))
    weights = torch.linspace(-1, 1, embeddings.numel(), dtype=embeddings.dtype)
    (embeddings * weights.view_as(embeddings)).sum().backward()
    grads = [
        torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in encoder.parameters()
    ]
    return embeddings.detach(), grads


CASES = [(k, p) for k in ("bert", "roberta") for p in ("cls", "mean", "last")] + [
    (k, p) for k in ("qwen2", "llama") for p in ("mean", "last")
]


@pytest.mark.parametrize(("kind", "pooling"), CASES)
def test_a_stream_embeds_as_the_padded_chunk_with_the_same_gradients(kind, pooling):
    encoder = _encoder(kind, pooling)
    assert encoder.use_padding_free() is None
    texts = _texts()
    left = kind in ("qwen2", "llama")  # decoders pad on the left
    want, want_grads = _embed_and_grads(encoder, _padded(texts, left))
    got, got_grads = _embed_and_grads(encoder, _stream(texts))
    # transformers computes rotary tables in fp32 whatever the network's dtype, and a
    # left-padded text's positions start after its padding: the same relative positions,
    # rounded apart at fp32's 6e-8. BERT-family models have no such term: float64 rounding.
    tol = 1e-6 if left else 1e-10
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    scale = max(g.abs().max().item() for g in want_grads)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=tol * 10, atol=tol * scale)
    # Text by text: each alone, unpadded.
    for row, text in enumerate(texts):
        alone = encoder(_padded([text], left).features("cpu"))
        torch.testing.assert_close(got[row], alone[0].detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_a_static_tail_changes_no_embedding(kind):
    encoder = _encoder(kind, "mean")
    encoder.use_padding_free()
    texts = _texts(1)
    want = encoder(_stream(texts).features("cpu"))
    static = _stream(texts, pad_to=40)
    features = static.features("cpu")
    assert features["input_ids"].shape == (40,) and features["texts"] == len(texts)
    torch.testing.assert_close(encoder(features), want, rtol=1e-10, atol=1e-10)


def test_stream_features_bounds_and_positions():
    chunk = _stream([torch.tensor([7, 8, 9]), torch.tensor([4]), torch.tensor([5, 6])], pad_to=20)
    f = chunk.features("cpu")
    assert f["input_ids"][:6].tolist() == [7, 8, 9, 4, 5, 6] and f["input_ids"].shape == (20,)
    # Texts 3 + 1 + 2, then a tail of 14 as dummy texts of at most max_length (8): 8 + 6, then
    # empty bounds up to a multiple of 128.
    assert f["cu_seqlens"][:6].tolist() == [0, 3, 4, 6, 14, 20]
    assert f["cu_seqlens"].dtype == torch.int32 and len(f["cu_seqlens"]) == 128 + 1
    assert (f["cu_seqlens"][6:] == 20).all()
    assert f["position_ids"].tolist() == [0, 1, 2, 0, 0, 1, *range(8), *range(6)]
    assert f["max_length"] == 8 and f["texts"] == 3


def test_a_stream_splits_by_tokens_into_views():
    chunk = _stream(_texts())  # 5 + 1 + 7 + 3 + 6 tokens
    pieces = chunk.split(8)
    assert [p.lengths.tolist() for p in pieces] == [[5, 1], [7], [3], [6]]
    assert all(p.size <= 8 for p in pieces)
    assert torch.equal(torch.cat([p.ids for p in pieces]), chunk.ids)
    assert pieces[1].ids.untyped_storage().data_ptr() == chunk.ids.untyped_storage().data_ptr()
    # Texts longer than the budget get a chunk of their own.
    assert [p.lengths.tolist() for p in chunk.split(4)] == [[5], [1], [7], [3], [6]]


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_varlen_attention_is_attention_text_by_text(causal):
    """The CPU path (SDPA text by text) and the block-diagonal reference against a loop; an
    empty text (a static shape's bucket) changes nothing."""
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 4, 5, 11, 11], dtype=torch.int32)
    q = torch.randn(11, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(11, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got = varlen_attention(q, k, v, cu, 6, causal=causal, scale=0.3)  # CPU: the fallback
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qi = q[a:b].transpose(0, 1)
        ki, vi = (x[a:b].repeat_interleave(2, dim=1).transpose(0, 1) for x in (k, v))
        scores = 0.3 * qi @ ki.transpose(1, 2)
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores).triu(1).bool(), float("-inf"))
        want = (scores.softmax(-1) @ vi).transpose(0, 1)
        torch.testing.assert_close(got[a:b], want, rtol=1e-12, atol=1e-12)
    reference = block_diagonal_attention(q, k, v, cu, causal=causal, scale=0.3, dropout=0.0)
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)


def test_mpnet_falls_back_and_says_why():
    from transformers import MPNetConfig, MPNetModel

    config = MPNetConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    encoder = Encoder(MPNetModel(config), _Tokenizer())
    before = encoder.model.config._attn_implementation
    problem = encoder.use_padding_free()
    assert problem is not None and problem.startswith("mpnet:") and "attention" in problem
    assert encoder.model.config._attn_implementation == before  # left as it was


def test_padded_batches_run_as_before_after_the_switch():
    encoder = _encoder("bert", "mean")
    texts = _texts(2)
    want = encoder(_padded(texts, False).features("cpu"))
    assert encoder.use_padding_free() is None
    assert encoder.model.config._attn_implementation == "retriever_packed_sdpa"
    torch.testing.assert_close(encoder(_padded(texts, False).features("cpu")), want)


@pytest.mark.slow
def test_compiled_layers_equal_eager_and_keep_the_cached_gradient_exact():
    """torch.compile of the layers (Inductor's fused kernels; on CPU its C++ ones) against the
    eager network; with dropout, the cached gradient over streams against the direct one
    (the RNG replay under Inductor's generator). One compile (static shape) serves both."""
    from retriever.loss import InfoNCELoss
    from retriever.model.compiled import compile_layers
    from retriever.train.step import cached_step

    torch.manual_seed(0)
    encoder = _encoder("bert", "mean")
    encoder.model.float()
    encoder.use_padding_free()
    texts = _texts(3)
    queries, documents = _stream(texts[:2], pad_to=24), _stream(texts[2:], pad_to=24)
    want = torch.cat([encoder(c.features("cpu")) for c in (queries, documents)])
    compile_layers(encoder.model, "static")
    got = torch.cat([encoder(c.features("cpu")) for c in (queries, documents)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    from retriever.model.network import set_dropout
    from retriever.train.batches import Batch

    set_dropout(encoder.model, 0.2)
    batch = Batch([queries], [documents], torch.arange(2), torch.arange(3), torch.arange(3), 2, 0)
    loss_fn = InfoNCELoss(scale=5.0, impl="torch")

    def direct(seed):
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        e = torch.cat([encoder(c.features("cpu")) for c in (queries, documents)])
        loss_fn(e[:2], e[2:]).backward()
        return torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])

    same, other = direct(1), direct(2)
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    cached_step(encoder, batch, loss_fn)
    cached = torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
    torch.testing.assert_close(cached, same, rtol=1e-4, atol=1e-6)
    assert (other - same).abs().max() > 1e-3  # other masks: another gradient


def test_modernbert_runs_packed_within_its_local_window_and_falls_back_beyond():
    import transformers as hf

    config = hf.ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=3, num_attention_heads=2, local_attention=16,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                 sep_token_id=2)  # fmt: skip
    network = hf.ModernBertModel(config)
    short = Encoder(network, _Tokenizer(), EncoderSettings(query_max_length=8,
                                                           document_max_length=8))  # fmt: skip
    assert short.use_padding_free() is None
    texts = _texts(4)[:3]
    want = torch.cat([short(_padded([t], False).features("cpu")) for t in texts])
    torch.testing.assert_close(short(_stream(texts).features("cpu")), want, rtol=1e-5, atol=1e-5)
    long = Encoder(hf.ModernBertModel(config), _Tokenizer(), EncoderSettings())  # 128 / 256
    problem = long.use_padding_free()
    assert problem is not None and problem.startswith("modernbert:") and "sliding" in problem
