"""The fused layer kernels (retriever.model.bias_gelu, residual_norm) against float64 references,
their dropout masks and RNG replay, and a tiny BERT with the fused modules (retriever.model.fused)
against the eager one, directly and through the embedding cache.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): sizes
are tiny. Error model for fp32 kernels against float64: an elementwise result is off by a few
ulps of its inputs' scale (one rounding per operation on O(1) values); a LayerNorm row by
about N ulps (sums over N terms); a column sum over M rows by about M ulps of the sum of its
terms' magnitudes (`_column_bound`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_helpers import (
    assert_cached_step_is_exact,
    make_tiny_model,
    text_groups,
    tiny_config,
)

from retriever.loss import InfoNCELoss
from retriever.loss.gradcache import RandContext
from retriever.model import Encoder
from retriever.model.bias_gelu import bias_gelu
from retriever.model.fused import FusedBiasGelu, FusedResidualNorm, unfuse, use_fused_kernels
from retriever.model.residual_norm import draw_seed, dropout_mask, residual_layer_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps
# One bf16 rounding, relative: half an ulp on the GPU (round to nearest), a whole one in
# Triton's interpreter (it truncates).
EPS_BF16 = torch.finfo(torch.bfloat16).eps


def _randn(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(DEVICE)


def _leaves(*tensors: torch.Tensor, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [t.to(dtype or t.dtype).detach().requires_grad_() for t in tensors]


def _column_bound(terms: torch.Tensor, ulps: float = 8.0) -> torch.Tensor:
    """How far an fp32 sum over rows of ``terms`` [..., N] may be from the exact one: about
    (rows + a few) ulps of the sum of the terms' magnitudes."""
    flat = terms.reshape(-1, terms.shape[-1]).abs()
    return (flat.shape[0] + ulps) * EPS32 * flat.sum(0) + 1e-30


def _assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float, name=""):
    error = (got.double() - want.double()).abs()
    worst = (error - bound).max().item()
    assert worst <= 0, f"{name}: {error.max().item():.3g} over the bound"


# --- bias + GELU ----------------------------------------------------------------------------


def _gelu_reference(y, b, dout):
    y64, b64 = _leaves(y, b, dtype=torch.float64)
    out = F.gelu(y64 + b64)
    out.backward(dout.double())
    return out, y64.grad, b64.grad


# Widths under one column block, not a power of two, and over one block (two blocks, the
# second partial); rows that do not fill the last block; a 3-D input.
@pytest.mark.parametrize("shape", [(37, 24), (5, 3, 40), (9, 300)])
def test_bias_gelu_matches_float64(shape):
    n = shape[-1]
    y, b = _leaves(_randn(*shape, seed=0, scale=2.0), _randn(n, seed=1))
    dout = _randn(*shape, seed=2)
    out = bias_gelu(y, b)
    out.backward(dout)
    out_ref, dy_ref, db_ref = _gelu_reference(y, b, dout)

    assert out.shape == y.shape and out.dtype == y.dtype
    scale = (y.detach().abs() + b.detach().abs() + 1).double()
    _assert_within(out, out_ref, 8 * EPS32 * scale, "out")
    _assert_within(y.grad, dy_ref, 8 * EPS32 * scale * dout.abs().double(), "dy")
    _assert_within(b.grad, db_ref, _column_bound(dy_ref), "db")


def test_bias_gelu_in_bfloat16_rounds_once():
    """bf16 in and out, fp32 inside: one bf16 rounding from the float64 result (the bias
    gradient in bf16 too: one rounding of its fp32 sum)."""
    y, b = _leaves(_randn(40, 48, seed=3, scale=2.0), _randn(48, seed=4), dtype=torch.bfloat16)
    dout = _randn(40, 48, seed=5).bfloat16()
    out = bias_gelu(y, b)
    out.backward(dout)
    out_ref, dy_ref, db_ref = _gelu_reference(y, b, dout)
    assert out.dtype == y.grad.dtype == b.grad.dtype == torch.bfloat16
    _assert_within(out, out_ref, EPS_BF16 * out_ref.abs() + 1e-6, "out")
    _assert_within(y.grad, dy_ref, EPS_BF16 * dy_ref.abs() + 1e-6, "dy")
    _assert_within(b.grad, db_ref, EPS_BF16 * db_ref.abs() + _column_bound(dy_ref), "db")


# --- bias + dropout + residual + LayerNorm --------------------------------------------------


def _inputs(shape, seed, dtype=torch.float32, residual_dtype=None):
    """y (a dense output without its bias), its bias, the residual, LayerNorm weight and bias:
    offsets and spreads, so that the mean and variance matter."""
    n = shape[-1]
    y = _randn(*shape, seed=seed, scale=2.0, shift=0.5)
    r = _randn(*shape, seed=seed + 1, scale=1.5, shift=-1.0)
    b, w, beta = (_randn(n, seed=seed + k) for k in (2, 3, 4))
    y, b, w, beta = _leaves(y, b, 1 + 0.3 * w, beta, dtype=dtype)
    (r,) = _leaves(r, dtype=residual_dtype or dtype)
    return y, b, r, w, beta


def _norm_reference(y, b, r, w, beta, dout, eps, keep=None, p=0.0):
    """The eager module in float64: LayerNorm(keep * (y + b) / (1 - p) + r); its output, the
    gradients of (y, b, r, w, beta), and the error model's bounds for fp32 kernels (`_bounds`)."""
    leaves = _leaves(y, b, r, w, beta, dtype=torch.float64)
    y64, b64, r64, w64, beta64 = leaves
    z = y64 + b64
    if keep is not None:
        z = torch.where(keep.view_as(z), z / (1 - p), 0.0)
    z = z + r64
    out = F.layer_norm(z, (y.shape[-1],), w64, beta64, eps)
    out.backward(dout.double())
    grads = [t.grad for t in leaves]
    return out, grads, _bounds(z.detach(), w64.detach(), dout.double(), grads, eps, p)


def _bounds(z, w, dout, grads, eps, p):
    """How far fp32 kernels may be from the float64 results: with xhat = (z - mean) * rstd and
    g = w * dout, every quantity gets (N + 8) ulps of the magnitudes it is summed from (a mean
    over N terms, a few roundings), times 4 (xhat's own error enters the gradients); column
    sums over M rows add their terms' bounds and M ulps of their terms' magnitudes."""
    n = z.shape[-1]
    ulps = 4 * (n + 8) * EPS32
    mean = z.mean(-1, keepdim=True)
    rstd = (z.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    xhat = (z - mean) * rstd
    xhat_scale = (z.abs() + z.abs().mean(-1, keepdim=True)) * rstd  # what xhat is computed from
    g = w * dout
    dz_scale = rstd * (g.abs() + g.abs().mean(-1, keepdim=True)
                       + xhat_scale * (g * xhat).abs().mean(-1, keepdim=True))  # fmt: skip
    dz = ulps * dz_scale
    dy = dz / (1 - p)
    dy_ref = grads[0]
    return {
        "out": ulps * (xhat_scale * w.abs() + 1e-30),
        "dy": dy, "dr": dz,
        "db": dy.reshape(-1, n).sum(0) + _column_bound(dy_ref),
        "dw": (ulps * xhat_scale * dout.abs()).reshape(-1, n).sum(0) + _column_bound(dout * xhat),
        "dbeta": _column_bound(dout),
    }  # fmt: skip


def _check_norm(got_out, got_grads, out_ref, grads_ref, bounds):
    _assert_within(got_out, out_ref, bounds["out"], "out")
    for name, got, want in zip(("dy", "db", "dr", "dw", "dbeta"), got_grads, grads_ref):
        _assert_within(got, want, bounds[name], name)


@pytest.mark.parametrize("shape", [(37, 24), (5, 7, 48), (1, 16), (6, 130)])
def test_residual_norm_matches_float64_without_dropout(shape):
    y, b, r, w, beta = _inputs(shape, seed=10)
    dout = _randn(*shape, seed=20)
    out = residual_layer_norm(y, b, r, w, beta, 1e-5)
    out.backward(dout)
    out_ref, grads_ref, bounds = _norm_reference(y, b, r, w, beta, dout, 1e-5)
    assert out.shape == y.shape and out.dtype == y.dtype
    _check_norm(out, [t.grad for t in (y, b, r, w, beta)], out_ref, grads_ref, bounds)


def test_residual_norm_with_dropout_uses_the_mask_of_its_seed():
    shape, p = (37, 24), 0.3
    y, b, r, w, beta = _inputs(shape, seed=30)
    dout = _randn(*shape, seed=31)
    torch.manual_seed(7)
    seed = draw_seed(y.device)
    keep = dropout_mask(seed, *shape, p)
    torch.manual_seed(7)  # the call draws the same seed
    out = residual_layer_norm(y, b, r, w, beta, 1e-5, p)
    out.backward(dout)
    out_ref, grads_ref, bounds = _norm_reference(y, b, r, w, beta, dout, 1e-5, keep, p)
    _check_norm(out, [t.grad for t in (y, b, r, w, beta)], out_ref, grads_ref, bounds)
    # Dropped elements pass no gradient to y; kept ones do.
    assert torch.equal(y.grad != 0, keep)


def test_dropout_masks_keep_one_minus_p_and_differ_by_seed():
    m, n, p = 96, 48, 0.25
    seeds = [torch.tensor([s], dtype=torch.int64, device=DEVICE) for s in (1, 2**40 + 3)]
    masks = [dropout_mask(seed, m, n, p).cpu() for seed in seeds]
    sigma = (p * (1 - p) / (m * n)) ** 0.5
    for keep in masks:
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
        # Each of the four Philox outputs (columns 4j + k) keeps its share too.
        for k in range(4):
            share = keep[:, k::4].float().mean().item()
            assert abs(share - (1 - p)) < 5 * sigma * 2
    agree = (masks[0] == masks[1]).float().mean().item()  # independent: p^2 + (1-p)^2
    assert abs(agree - (p**2 + (1 - p) ** 2)) < 5 * sigma * 2
    assert not torch.equal(masks[0][0], masks[0][1])  # rows draw their own numbers


def test_dropout_replays_bit_for_bit_under_rand_context():
    """The embedding cache replays a chunk by restoring torch's generators (RandContext): the
    kernel's seed, hence its mask, comes back; without the replay the next call differs."""
    y, b, r, w, beta = _inputs((20, 32), seed=40)
    devices = [y.device] if y.is_cuda else []
    state = RandContext(devices)
    first = residual_layer_norm(y, b, r, w, beta, 1e-5, 0.1)
    second = residual_layer_norm(y, b, r, w, beta, 1e-5, 0.1)
    with state:
        replayed = residual_layer_norm(y, b, r, w, beta, 1e-5, 0.1)
    assert torch.equal(first, replayed) and not torch.equal(first, second)


@pytest.mark.parametrize("residual_dtype", [torch.bfloat16, torch.float32])
def test_residual_norm_in_bfloat16(residual_dtype):
    """bf16 network: all bf16, one rounding of each result. Under autocast y is bf16 and the
    residual, weights fp32: the output and dr are fp32 (as autocast's LayerNorm gives), dy
    bf16."""
    shape = (33, 64)
    y, b, r, w, beta = _inputs(shape, seed=50, dtype=torch.bfloat16)
    (r,) = _leaves(r, dtype=residual_dtype)
    if residual_dtype == torch.float32:
        b, w, beta = _leaves(b, w, beta, dtype=torch.float32)
    dout = _randn(*shape, seed=51).to(residual_dtype)
    out = residual_layer_norm(y, b, r, w, beta, 1e-5)
    out.backward(dout)
    out_ref, grads_ref, bounds = _norm_reference(y, b, r, w, beta, dout, 1e-5)
    assert out.dtype == r.grad.dtype == residual_dtype and y.grad.dtype == torch.bfloat16
    got = [out] + [t.grad for t in (y, b, r, w, beta)]
    for name, value, want in zip(("out", "dy", "db", "dr", "dw", "dbeta"), got,
                                 [out_ref, *grads_ref]):  # fmt: skip
        rounding = EPS_BF16 * want.abs() if value.dtype == torch.bfloat16 else 0.0
        _assert_within(value, want, bounds[name] + rounding, name)


# --- the fused modules in a network ---------------------------------------------------------


def _bert(kind: str = "bert", act: str = "gelu") -> nn.Module:
    import transformers as hf

    config = dict(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=64, hidden_act=act,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    config, model = {
        "bert": (hf.BertConfig(**config), hf.BertModel),
        "roberta": (hf.RobertaConfig(**config, pad_token_id=1), hf.RobertaModel),
        "xlm-roberta": (hf.XLMRobertaConfig(**config, pad_token_id=1), hf.XLMRobertaModel),
    }[kind]
    torch.manual_seed(0)
    return model(config)


@pytest.mark.parametrize(("kind", "act", "expected"),
                         [("bert", "gelu", 6), ("roberta", "gelu", 6),
                          ("xlm-roberta", "gelu", 6), ("bert", "gelu_new", 4)])  # fmt: skip
def test_use_fused_kernels_swaps_bert_family_layers_in_place(kind, act, expected):
    model = _bert(kind, act)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fused_kernels(model) == expected  # tanh GELU: the intermediate stays eager
    mixins = [type(m).__mro__[1] for m in model.modules() if hasattr(m, "_unfused_class")]
    assert mixins.count(FusedResidualNorm) == 4
    assert mixins.count(FusedBiasGelu) == expected - 4
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert use_fused_kernels(model) == 0  # already fused
    assert unfuse(model) == expected and not any(
        hasattr(m, "_unfused_class") for m in model.modules()
    )


def test_modules_that_do_something_else_are_left_alone():
    from transformers import MPNetConfig, MPNetModel

    # MPNet's attention output is not a BertSelfOutput (its LayerNorm sits in MPNetAttention);
    # its MPNetIntermediate and MPNetOutput are.
    model = MPNetModel(MPNetConfig(vocab_size=50, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    assert use_fused_kernels(model) == 2
    assert use_fused_kernels(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))) == 0


def _embed_and_grads(encoder: Encoder, features: dict) -> tuple[torch.Tensor, dict]:
    encoder.zero_grad(set_to_none=True)
    embedding = encoder(features)
    embedding.pow(3).sum().backward()  # a gradient that is not uniform across rows
    grads = {n: p.grad.clone() for n, p in encoder.model.named_parameters() if p.grad is not None}
    return embedding.detach(), grads


@pytest.mark.parametrize("packed", [False, True])
def test_tiny_bert_with_fused_kernels_equals_the_eager_one(tiny_dir, packed):
    """Dropout off: embeddings and parameter gradients to fp32 rounding, padded and packed."""
    from retriever.train.batches import StreamChunk

    encoders = [Encoder.from_pretrained(tiny_dir, dropout=0.0, fused_kernels=fused).to(DEVICE)
                for fused in (False, True)]  # fmt: skip
    assert sum(hasattr(m, "_unfused_class") for m in encoders[1].model.modules()) == 6
    texts = ["a cell", "the unit of life is the cell", "proteins fold"]
    features = {k: v.to(DEVICE) for k, v in encoders[0].tokenize(texts, "query").items()}
    if packed:
        for encoder in encoders:
            assert encoder.use_padding_free() is None
        lengths = features["attention_mask"].sum(1).cpu()
        ids = features["input_ids"].cpu()[features["attention_mask"].cpu().bool()]
        features = StreamChunk(ids, lengths, 16).features(DEVICE)
    (e_plain, g_plain), (e_fused, g_fused) = (_embed_and_grads(e.train(), features)
                                              for e in encoders)  # fmt: skip
    torch.testing.assert_close(e_fused, e_plain, atol=1e-5, rtol=1e-5)
    assert g_plain.keys() == g_fused.keys()
    scale = max(g.abs().max().item() for g in g_plain.values())
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], atol=1e-5 * scale, rtol=1e-4,
                                   msg=name)  # fmt: skip


def _stream_batch(encoder: Encoder, groups, budget: int):
    """The trainer's batch of ``groups`` as padding-free streams of ``budget`` tokens."""
    from retriever.train.batches import Collator, Packing, TextPool

    pools = [TextPool(encoder.side_settings(side)) for side in ("query", "document")]
    rows = [(pools[0].add(q), pools[1].add(p), [pools[1].add(n) for n in negatives])
            for q, p, negatives in groups]  # fmt: skip
    for pool in pools:
        pool.tokenize(encoder.tokenizer, None, "tokenize", show_progress=False)
    packing = Packing(max(encoder.query_max_length, encoder.document_max_length))
    return Collator(*pools, encoder.tokenizer, budget, True, packing)(rows)


def test_cached_gradient_with_fused_kernels_equals_the_direct_one(tmp_path):
    """Dropout on (the kernels' masks): the embedding cache's second pass replays each
    stream's generator state, so its gradient is the direct one's."""
    encoder = Encoder.from_pretrained(make_tiny_model(tmp_path / "m", dropout=0.1),
                                      query_max_length=16, document_max_length=24,
                                      fused_kernels=True)  # fmt: skip
    assert encoder.use_padding_free() is None
    encoder.train()
    batch = _stream_batch(encoder, text_groups(7), budget=40)
    assert len(batch.document_chunks) > 1
    loss_fn = InfoNCELoss(scale=20.0, learnable_scale=True, impl="torch")
    assert_cached_step_is_exact(encoder, batch, loss_fn)


@pytest.mark.parametrize("option", [None, True, False])
def test_trainer_option_chooses_the_fused_kernels(tiny_dir, tmp_path, monkeypatch, option):
    """model.fused_kernels: null follows the GPU's presence; true and false are obeyed."""
    from retriever.train.builders import build_encoder

    def fused_modules() -> int:
        modules = build_encoder(config).model.modules()
        return sum(hasattr(m, "_unfused_class") for m in modules)

    model = {"fused_kernels": option, "fused_layer_norm": False}
    config = tiny_config(tiny_dir, "unused.jsonl", tmp_path, model=model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fused_modules() == (6 if option else 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fused_modules() == (0 if option is False else 6)


def test_small_inputs_keep_the_eager_path(monkeypatch):
    """Off the interpreter, CPU inputs (and CUDA inputs under MIN_FUSED_ELEMENTS) run the
    module's own forward: no kernel, same numbers."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _bert()
    plain = _bert()
    use_fused_kernels(model)
    ids = torch.tensor(np.arange(3, 15).reshape(2, 6))
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state,
                               plain(input_ids=ids).last_hidden_state, rtol=0, atol=0)  # fmt: skip
